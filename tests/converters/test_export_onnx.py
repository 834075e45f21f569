"""export_onnx: graph contents, parity with the PyTorch fake-quant model, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from _unets import UNET_CONFIGS
from pqcad_deploy.converters.export_onnx import export_onnx
from pqcad_deploy.converters.parity import parity_report
from pqcad_deploy.engines.manifest import read_onnx_manifest
from pqcad_deploy.artifact import load_artifact
from pqcad_deploy.errors import ArtifactError, ExportError, OutputPathError

# Parity tolerances (stated in README and docs/RESULTS.md):
#  - a sample whose activation codes all agree must match to 1e-5 relative L2;
#  - the first layer whose codes differ may differ only by isolated rounding-boundary flips:
#    at most 1e-3 of its codes, each by one step. An export bug (scale, axis, rounding, range)
#    changes a large share of the first affected layer's codes.
EXACT_REL_TOL = 1e-5
FLIP_FRACTION_TOL = 1e-3

CASES = [(name, wbits) for name in UNET_CONFIGS for wbits in (8, 4)]


def assert_parity(report) -> None:
    """The parity tolerances every export target is held to (also used by test_export_targets).

    Inputs whose codes all agree must match to EXACT_REL_TOL. When every input has a rounding flip
    (one flip spreads through a random-weight UNet; with the conftest's 32 calibration pairs the
    3-level c3_32_attn2_scaleshift model flipped in all 8 inputs on this project's Intel VMs, with
    today's 8 pairs it keeps 2-4 clean inputs), the codes decide alone, with 10x less room than the gate.
    """
    if report.samples_without_flips:
        assert report.max_rel_error_without_flips < EXACT_REL_TOL
    else:
        assert report.first_divergence is not None, report
        assert report.first_divergence.fraction <= FLIP_FRACTION_TOL / 10, f"every sample flipped: {report}"
    if report.first_divergence is not None:
        assert report.first_divergence.fraction <= FLIP_FRACTION_TOL, report.first_divergence
        assert report.first_divergence.max_code_difference == 1


@pytest.mark.parametrize("name,wbits", CASES)
def test_parity_with_fake_quant_model(artifacts, exported, name, wbits):
    assert_parity(parity_report(artifacts[(name, wbits)], exported[(name, wbits)], n=8, seed=1))


@pytest.mark.parametrize("name,wbits", [("c1_32_attn1_default", 8), ("c3_32_attn2_scaleshift", 4)])
def test_graph_structure(artifacts, exported, name, wbits):
    artifact = load_artifact(artifacts[(name, wbits)])
    model = onnx.load(str(exported[(name, wbits)]))
    onnx.checker.check_model(model, full_check=True)
    nodes = {n.name: n for n in model.graph.node}
    inits = {i.name: i for i in model.graph.initializer}
    assert [i.name for i in model.graph.input] == ["sample", "timestep"]
    assert [o.name for o in model.graph.output] == ["noise_pred"]
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value
    for layer, record in artifact.manifest.layers.items():
        q, dq, wdq = (nodes[f"{layer}/input_quantize"], nodes[f"{layer}/input_dequantize"],
                      nodes[f"{layer}/weight_dequantize"])
        assert q.op_type == "QuantizeLinear" and dq.op_type == "DequantizeLinear" and dq.input[0] == q.output[0]
        codes = onnx.numpy_helper.to_array(inits[f"{layer}.weight_codes"])
        stored = artifact.student_tensors[f"{layer}.weight_codes"].numpy()
        axis = {a.name: a.i for a in wdq.attribute}["axis"]
        if record.kind == "linear":  # MatMul weight is [in, out], quantized per column
            assert axis == 1 and np.array_equal(codes, stored.T)
        else:
            assert axis == 0 and np.array_equal(codes, stored)
        qmax = 2 ** (record.weight_bits - 1) - 1
        assert codes.dtype == np.int8 and np.abs(codes).max() <= qmax
        scale = onnx.numpy_helper.to_array(inits[f"{layer}.weight_scale"])
        assert np.array_equal(scale, artifact.student_tensors[f"{layer}.weight_scale"].numpy())
        act = onnx.numpy_helper.to_array(inits[f"{layer}.act_scale"])
        assert act.shape == () and act == artifact.student_tensors[f"{layer}.act_scale"].numpy()
        zp = onnx.numpy_helper.to_array(inits[f"{layer}.act_zero_point"])
        assert zp.dtype == np.int8 and zp == 0
        consumer = [n for n in model.graph.node if wdq.output[0] in n.input]
        assert len(consumer) == 1 and consumer[0].op_type == ("MatMul" if record.kind == "linear" else "Conv")
        assert dq.output[0] in consumer[0].input
    manifest = read_onnx_manifest(exported[(name, wbits)])
    assert manifest.precision == f"w{wbits}a8"
    assert list(manifest.student_timesteps) == artifact.manifest.student_timesteps
    assert manifest.weight_bits == {str(wbits): len(artifact.manifest.layers)}


def test_fp_export_matches_teacher(artifacts, tmp_path):
    import torch

    art = artifacts[("c3_28_attn1_default", 8)]
    path = export_onnx(art, tmp_path / "fp.onnx", fp=True).path
    model = onnx.load(str(path))
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    assert read_onnx_manifest(path).precision == "fp32"
    import onnxruntime as ort

    teacher = load_artifact(art).build_teacher()
    x = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([900.0, 400.0, 10.0])
    with torch.no_grad():
        ref = teacher(x, t).sample.numpy()
    out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"sample": x.numpy(), "timestep": t.numpy()})[0]
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-5


def test_four_bit_activations_need_opset_21(unet_dirs, tmp_path):
    from pqcad_deploy.compress import compress
    from pqcad_deploy.config import CompressConfig

    art = tmp_path / "w4a4"
    compress(CompressConfig(model=str(unet_dirs["c1_32_attn1_default"]), method="minmax", distill=False,
                            weight_bits=4, act_bits=4, teacher_steps=10, preset="fast"), art, progress=False)
    with pytest.raises(ExportError, match="--opset 21"):
        export_onnx(art, tmp_path / "a4.onnx")
    assert not (tmp_path / "a4.onnx").exists()
    path = export_onnx(art, tmp_path / "a4.onnx", opset=21).path
    model = onnx.load(str(path))
    assert model.opset_import[0].version == 21
    zp = [i for i in model.graph.initializer if i.name.endswith(".act_zero_point")]
    assert zp and all(i.data_type == onnx.TensorProto.INT4 for i in zp)
    report = parity_report(art, path, n=4)
    assert report.samples_without_flips and report.max_rel_error_without_flips < EXACT_REL_TOL


def test_bad_inputs(artifacts, tmp_path):
    art = artifacts[("c1_32_attn1_default", 8)]
    with pytest.raises(ArtifactError, match="does not exist"):
        export_onnx(tmp_path / "missing", tmp_path / "x.onnx")
    with pytest.raises(ExportError, match="--opset must be one of 13..21"):
        export_onnx(art, tmp_path / "x.onnx", opset=12)
    (tmp_path / "exists.onnx").write_bytes(b"x")
    with pytest.raises(OutputPathError, match="--overwrite"):
        export_onnx(art, tmp_path / "exists.onnx")
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(OutputPathError, match="not a writable directory"):
        export_onnx(art, blocker / "x.onnx")
    bad = tmp_path / "bad_art"
    bad.mkdir()
    (bad / "artifact.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ArtifactError, match="not a pqcad-deploy artifact"):
        export_onnx(bad, tmp_path / "y.onnx")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
