"""TensorRT paths: real builds only where TensorRT exists; elsewhere the refusal message is pinned."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

from pqcad_deploy.engines.errors import BackendUnavailableError, BuildError
from pqcad_deploy.engines.tensorrt_build import build_tensorrt_engine

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is importable here; the missing-TensorRT message cannot be produced")
def test_build_without_tensorrt_says_what_to_do(make_tiny_onnx, tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailableError) as info:
        build_tensorrt_engine(make_tiny_onnx(), tmp_path / "engine")
    msg = str(info.value)
    assert msg.startswith("TensorRT is not installed on this machine: ")
    assert msg.endswith("use --backend onnxruntime, or build on a machine with TensorRT 10 (e.g. a Jetson with JetPack 6).")
    assert not (tmp_path / "engine").exists()


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is importable here")
def test_tensorrt_runner_without_tensorrt(make_tiny_onnx, make_manifest) -> None:
    from pqcad_deploy.engines.tensorrt_runner import TensorRTRunner

    runner = TensorRTRunner("model.plan", make_manifest())
    with pytest.raises(BackendUnavailableError, match=re.escape("TensorRT is not installed on this machine")):
        runner.activate()
    assert not runner.is_active


@pytest.mark.tensorrt
def test_tensorrt_build_and_run(make_tiny_onnx, tmp_path: Path, tiny_reference) -> None:
    pytest.importorskip("tensorrt", reason="TensorRT 10 is not installable in this workplace (README, introduction); runs on a Jetson / TensorRT machine")
    from pqcad_deploy.engines.manifest import verify_engine
    from pqcad_deploy.engines.tensorrt_runner import TensorRTRunner

    m = build_tensorrt_engine(make_tiny_onnx(), tmp_path / "engine", max_batch=4, opt_batch=2)
    assert verify_engine(tmp_path / "engine") == m and m.model_file == "model.plan" and m.backend == "tensorrt"
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8), dtype=np.float32)
    t = np.array([900, 500, 0], np.float32)
    with TensorRTRunner(tmp_path / "engine" / m.model_file, m.onnx) as runner:
        out = runner.infer({"sample": x, "timestep": t})["noise_pred"]
    np.testing.assert_allclose(out, tiny_reference(x, t), rtol=1e-3, atol=1e-3)


def _with_ort_target_nodes(tiny_model, make_manifest, path: Path, target: str) -> Path:
    """The tiny ONNX plus what export's ONNX Runtime targets write (unused side branches)."""
    import onnx
    from onnx import TensorProto, helper

    from pqcad_deploy.engines.manifest import write_onnx_manifest

    model = tiny_model()
    g = model.graph
    if target == "ort-x86":  # ConvInteger with uint8 weights and zero-point 128
        g.initializer.extend([helper.make_tensor("w", TensorProto.UINT8, [1, 3, 1, 1], [128, 129, 127]),
                              helper.make_tensor("wzp", TensorProto.UINT8, [], [128])])
        g.node.append(helper.make_node("ConvInteger", ["codes", "w", "", "wzp"], ["acc"], name="l/conv_integer"))
    elif target == "ort-qlinear":  # int32 bias codes dequantized per channel (QLinearConv's bias layout)
        g.initializer.extend([helper.make_tensor("b", TensorProto.INT32, [3], [1, -2, 3]),
                              helper.make_tensor("bs", TensorProto.FLOAT, [3], [0.1, 0.1, 0.1]),
                              helper.make_tensor("bzp", TensorProto.INT32, [3], [0, 0, 0])])
        g.node.append(helper.make_node("DequantizeLinear", ["b", "bs", "bzp"], ["bias"], name="l/bias_dequantize",
                                       axis=0))
    onnx.save(write_onnx_manifest(model, make_manifest(precision="w8a8")), str(path))
    return path


@pytest.mark.parametrize("target", ["ort-x86", "ort-qlinear"])
def test_build_refuses_an_onnx_exported_for_onnx_runtime(tiny_model, make_manifest, tmp_path: Path,
                                                         target: str) -> None:
    """Refused from the graph, before TensorRT is imported: the message names the target and the fix."""
    path = _with_ort_target_nodes(tiny_model, make_manifest, tmp_path / "ort.onnx", target)
    with pytest.raises(BuildError) as info:
        build_tensorrt_engine(path, tmp_path / "engine")
    msg = str(info.value)
    assert f"--target {target}" in msg and "export it again with --target qdq" in msg
    assert "converters' TensorRT check" not in msg
    assert not (tmp_path / "engine").exists()
