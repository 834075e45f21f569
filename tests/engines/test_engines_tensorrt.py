"""TensorRT paths: real builds only where TensorRT exists; elsewhere the refusal message is pinned."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

from engines.errors import BackendUnavailableError
from engines.tensorrt_build import build_tensorrt_engine

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
    from engines.tensorrt_runner import TensorRTRunner

    runner = TensorRTRunner("model.plan", make_manifest())
    with pytest.raises(BackendUnavailableError, match=re.escape("TensorRT is not installed on this machine")):
        runner.activate()
    assert not runner.is_active


@pytest.mark.tensorrt
def test_tensorrt_build_and_run(make_tiny_onnx, tmp_path: Path, tiny_reference) -> None:
    pytest.importorskip("tensorrt", reason="TensorRT 10 is not installable in this workplace (docs/tensorrt.md); runs on a Jetson / TensorRT machine")
    from engines.manifest import verify_engine
    from engines.tensorrt_runner import TensorRTRunner

    m = build_tensorrt_engine(make_tiny_onnx(), tmp_path / "engine", max_batch=4, opt_batch=2)
    assert verify_engine(tmp_path / "engine") == m and m.model_file == "model.plan" and m.backend == "tensorrt"
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8), dtype=np.float32)
    t = np.array([900, 500, 0], np.float32)
    with TensorRTRunner(tmp_path / "engine" / m.model_file, m.onnx) as runner:
        out = runner.infer({"sample": x, "timestep": t})["noise_pred"]
    np.testing.assert_allclose(out, tiny_reference(x, t), rtol=1e-3, atol=1e-3)
