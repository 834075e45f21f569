"""--target tensorrt (converters.tensorrt): the FP16 graph with TensorRT's Q/DQ placement, held to the
static TensorRT rules (engines.onnx_check), to the PyTorch student within the stated FP16 tolerance,
and to its own placement promises (issue 16, items 1 and 2), on every fixture UNet at W8A8 and W4A8."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from _unets import UNET_CONFIGS
from pqcad_deploy.converters import tensorrt as T
from pqcad_deploy.converters.export_onnx import export_onnx
from pqcad_deploy.converters.parity import output_parity_verdict, parity_report
from pqcad_deploy.converters.targets import TENSORRT_OUTPUT_TOLERANCE
from pqcad_deploy.engines.onnx_check import check_onnx
from pqcad_deploy.engines.ort_session import ort_session
from pqcad_deploy.errors import ExportError

# every fixture UNet at W8A8, two of them at W4A8 (the export is the same code for both; W4A8 adds the
# INT4 paths, exercised at opset 21 on both)
CASES = [*((name, 8) for name in UNET_CONFIGS), ("c3_32_attn2_scaleshift", 4), ("c1_28_attn2_scaleshift", 4)]


@pytest.fixture(scope="module")
def trt(artifacts, tmp_path_factory):
    """(config, weight bits) -> (ExportResult at opset 19, ExportResult at opset 21), without the parity gate:
    on these random-weight UNets one rounding flip moves the output by ~10 % (below), so output parity is
    held on the trained builtin models instead (test_parity_on_both_builtin_models)."""
    root = tmp_path_factory.mktemp("onnx_tensorrt")
    return {key: (export_onnx(artifacts[key], root / f"{key[0]}_w{key[1]}.onnx", target="tensorrt"),
                  export_onnx(artifacts[key], root / f"{key[0]}_w{key[1]}_o21.onnx", target="tensorrt", opset=21)
                  if key[1] == 4 else None)
            for key in CASES}


@pytest.fixture(scope="module")
def builtin_trt(tmp_path_factory):
    """Both builtin models, min-max W8A8 at 20 steps (the fast preset), exported with the parity gate on."""
    from pqcad_deploy.compress import compress
    from pqcad_deploy.config import CompressConfig

    root = tmp_path_factory.mktemp("builtin_tensorrt")
    made = {}
    for model in ("builtin", "builtin:cifar10"):
        art = root / model.replace(":", "_")
        compress(CompressConfig(model=model, method="minmax", distill=False, teacher_steps=20, preset="fast"),
                 art, progress=False)
        made[model] = (art, export_onnx(art, root / f"{art.name}.onnx", target="tensorrt", parity=True))
    return made


def _graph(path):
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    producers = {o: n for n in model.graph.node for o in n.output}
    return model, producers


def _from_dq(name, producers) -> bool:
    return name in producers and producers[name].op_type == "DequantizeLinear"


@pytest.mark.parametrize("case", CASES, ids=[f"{n}-w{b}" for n, b in CASES])
def test_no_checker_finding_and_onnx_runtime_runs_it(trt, case) -> None:
    result, result21 = trt[case]
    assert result.opset == 19 and result.target == "tensorrt"
    for r in filter(None, (result, result21)):
        findings = check_onnx(r.path, "tensorrt")
        # opset 21 (blocked INT4) is past the opsets TensorRT 10.0-10.3's parser lists (9-20): a warning
        assert [(f.rule, f.severity) for f in findings] == ([] if r.opset == 19 else [("trt-opset-range", "warning")])
        model = onnx.load(str(r.path))
        out = ort_session(str(r.path)).run(None, {"sample": np.ones((2, *_shape(model)), np.float32),
                                                   "timestep": np.array([1.0, 900.0], np.float32)})[0]
        assert out.dtype == np.float32 and np.isfinite(out).all()


@pytest.mark.parametrize("model", ["builtin", "builtin:cifar10"])
def test_parity_on_both_builtin_models(builtin_trt, model) -> None:
    """The export gate passed (ONNX Runtime, CPU, the graph as written): output within 5e-2 relative L2 of the
    PyTorch student; no checker finding; and a rounding flip, not the rewrite, sets the error: the qdq graph
    (FP32, the student's exact arithmetic) of the same artifact is already off by most of it."""
    art, result = builtin_trt[model]
    assert result.parity.passed and "FP16 graph" in result.parity.reason, result.parity
    assert check_onnx(result.path, "tensorrt") == []
    trt_error = max(parity_report(art, result.path, n=4).sample_rel_errors)
    assert trt_error <= TENSORRT_OUTPUT_TOLERANCE / 2


@pytest.mark.parametrize("case", CASES, ids=[f"{n}-w{b}" for n, b in CASES])
def test_fp16_graph_with_fp32_io_and_tensorrt_placement(trt, artifacts, case) -> None:
    from pqcad_deploy.artifact import load_artifact

    model, producers = _graph(trt[case][0].path)
    graph = model.graph
    assert [(v.name, v.type.tensor_type.elem_type) for v in [*graph.input, *graph.output]] == [
        ("sample", TensorProto.FLOAT), ("timestep", TensorProto.FLOAT), ("noise_pred", TensorProto.FLOAT)]
    region = T._timestep_region(list(graph.node))
    region_inputs = {i for n in graph.node if id(n) in region for i in n.input}
    for init in graph.initializer:  # FP32 only where the timestep projection reads it
        if init.data_type == TensorProto.FLOAT:
            assert init.name in region_inputs or init.name.endswith(("/scales", "roi")), init.name
    scales = [i for i in graph.initializer if i.name.endswith("act_scale")]
    assert scales and all(i.data_type == TensorProto.FLOAT16 for i in scales)
    # one QuantizeLinear per tensor
    q_inputs = Counter(n.input[0] for n in graph.node if n.op_type == "QuantizeLinear")
    assert max(q_inputs.values()) == 1
    # every Conv the policy quantizes (8-bit input) reads DQ'd activation and weight
    layers = load_artifact(artifacts[case]).manifest.layers
    quantized = sum(1 for r in layers.values() if r.act_bits is not None)
    convs = [n for n in graph.node if n.op_type in ("Conv", "MatMul") and _from_dq(n.input[1], producers)]
    assert sum(_from_dq(n.input[0], producers) for n in convs) == quantized
    # every residual Add reading a quantized Conv reads DQ on its other input: TensorRT can fuse it; the
    # time-embedding Adds (other input computed from the timestep alone) stay FP16 on purpose
    from_sample = T._from_sample(list(graph.node))
    adds = [n for n in graph.node if n.op_type == "Add"
            and any(producers.get(i) is not None and producers[i].op_type == "Conv"
                    and _from_dq(producers[i].input[0], producers) for i in n.input)]
    residual = [n for n in adds if all(i in from_sample for i in n.input)]
    assert residual and all(any(_from_dq(i, producers) for i in n.input) for n in residual)
    assert all(not any(_from_dq(i, producers) for i in n.input) for n in adds if n not in residual)
    # 4-bit conv weights stay INT8 containers holding 4-bit codes
    for n in graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0].endswith("weight_codes"):
            codes = numpy_helper.to_array(next(i for i in graph.initializer if i.name == n.input[0]))
            assert codes.dtype == np.int8
            if case[1] == 4:
                assert codes.min() >= -8 and codes.max() <= 7


@pytest.mark.parametrize("case", [c for c in CASES if c[1] == 4], ids=lambda c: c[0])
def test_opset21_stores_4bit_matmul_weights_as_blocked_int4_and_convs_as_int8(trt, case) -> None:
    result = trt[case][1]
    model, producers = _graph(result.path)
    inits = {i.name: i for i in model.graph.initializer}
    consumers = {i: n for n in model.graph.node for i in n.input}
    blocked = 0
    for n in model.graph.node:
        if n.op_type != "DequantizeLinear" or not n.input[0].endswith("weight_codes"):
            continue
        user = consumers[n.output[0]].op_type
        codes = inits[n.input[0]]
        if user == "MatMul" and codes.dims[0] % min(T.INT4_BLOCK_SIZES):
            assert codes.data_type == TensorProto.INT8  # no block size divides its input features
            assert n.input[0].removesuffix(".weight_codes") in result.rewrite.int4_unblockable
        elif user == "MatMul":
            attrs = {a.name: a.i for a in n.attribute}
            rows = codes.dims[0]
            assert codes.data_type == TensorProto.INT4 and attrs["axis"] == 0
            assert attrs["block_size"] in T.INT4_BLOCK_SIZES and rows % attrs["block_size"] == 0
            assert list(inits[n.input[1]].dims) == [rows // attrs["block_size"], codes.dims[1]]
            blocked += 1
        else:
            assert codes.data_type == TensorProto.INT8, f"{n.name}: a conv weight must stay INT8"
    assert blocked == result.int4_weight_layers
    assert blocked + len(result.rewrite.int4_unblockable) > 0
    # the same values: ONNX Runtime runs it and matches the opset-19 graph (INT8 containers)
    x = np.random.default_rng(0).standard_normal((2, *_shape(model))).astype(np.float32)
    t = np.array([10.0, 500.0], np.float32)
    a = ort_session(str(result.path)).run(None, {"sample": x, "timestep": t})[0]
    b = ort_session(str(trt[case][0].path)).run(None, {"sample": x, "timestep": t})[0]
    assert np.abs(a - b).max() <= 1e-2 * np.abs(b).max()


def _shape(model) -> tuple[int, int, int]:
    return tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:])


def test_the_tolerance_catches_an_export_bug(builtin_trt, tmp_path) -> None:
    """A wrong scale on one layer's weights (an export bug) fails the output check on the trained model whose
    correct graph passes it (test_parity_on_both_builtin_models)."""
    art, result = builtin_trt["builtin"]
    model = onnx.load(str(result.path))
    scale = next(i for i in model.graph.initializer if i.name == "down_blocks.0.resnets.0.conv1.weight_scale")
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float16(1.5), scale.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    verdict = output_parity_verdict(parity_report(art, broken, n=4), TENSORRT_OUTPUT_TOLERANCE)
    assert not verdict.passed and "threshold 5e-02" in verdict.reason


def test_shared_qdq_takes_the_largest_scale_and_resize_reuses_its_conv_scale(trt) -> None:
    model, producers = _graph(trt[("c1_32_attn1_default", 8)][0].path)
    graph = model.graph
    for n in graph.node:
        if n.op_type == "Resize":
            q = producers[producers[n.input[0]].input[0]]
            assert q.op_type == "QuantizeLinear"
            after = next(m for m in graph.node if m.op_type == "QuantizeLinear" and m.input[0] == n.output[0])
            assert list(q.input[1:]) == list(after.input[1:])  # the same scale and zero-point tensors


def test_fp_export_is_an_fp16_graph_close_to_fp32(artifacts, tmp_path) -> None:
    art = artifacts[("c3_32_attn2_scaleshift", 8)]
    fp16 = export_onnx(art, tmp_path / "fp16.onnx", fp=True, target="tensorrt")
    fp32 = export_onnx(art, tmp_path / "fp32.onnx", fp=True, target="qdq")
    assert fp16.target == "tensorrt" and fp16.opset == 19
    assert check_onnx(fp16.path, "tensorrt") == []
    assert fp16.size_bytes < 0.6 * fp32.size_bytes
    x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
    t = np.array([999.0, 3.0], np.float32)
    a = ort_session(str(fp16.path)).run(None, {"sample": x, "timestep": t})[0]
    b = ort_session(str(fp32.path)).run(None, {"sample": x, "timestep": t})[0]
    assert np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(b)


def test_refuses_low_opsets_and_4bit_activations(artifacts, unet_dirs, tmp_path) -> None:
    from pqcad_deploy.compress import compress
    from pqcad_deploy.config import CompressConfig

    with pytest.raises(ExportError, match="--target tensorrt needs --opset 19 or newer; got 17"):
        export_onnx(artifacts[("c1_32_attn1_default", 8)], tmp_path / "a.onnx", target="tensorrt", opset=17)
    with pytest.raises(ExportError, match="TensorRT has no 4-bit activations"):
        T.check_tensorrt({"conv1": 8, "conv2": 4})
    # a W4A4 artifact is refused for what TensorRT lacks, not sent to --opset 21 first
    w4a4 = tmp_path / "w4a4"
    compress(CompressConfig(model=str(unet_dirs["c1_32_attn1_default"]), method="minmax", distill=False,
                            weight_bits=4, act_bits=4, teacher_steps=4, preset="fast"), w4a4, progress=False)
    for opset in (None, 21):
        with pytest.raises(ExportError, match=r"^--target tensorrt needs 8-bit \(or float\) activations: TensorRT "
                                              r"has no 4-bit activations, and \d+ layers have them"):
            export_onnx(w4a4, tmp_path / "a.onnx", target="tensorrt", opset=opset)
    assert not (tmp_path / "a.onnx").exists()


def test_fold_float_input_weights_writes_the_dequantized_weight(artifacts, tmp_path) -> None:
    """A float-input layer's weight DQ becomes its float weight (the student's values)."""
    art = artifacts[("c1_32_attn1_default", 8)]
    path = export_onnx(art, tmp_path / "q.onnx", target="qdq", opset=19).path
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    expected = inits["conv_in.weight_codes"].astype(np.float32) * inits["conv_in.weight_scale"].reshape(-1, 1, 1, 1)
    assert T.fold_float_input_weights(model, {"conv_in": None}) == ["conv_in"]
    folded = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert "conv_in.weight_codes" not in folded
    np.testing.assert_array_equal(folded["conv_in.weight"], expected)
    conv = next(n for n in model.graph.node if n.op_type == "Conv" and "conv_in.weight" in n.input)
    assert conv.input[1] == "conv_in.weight"
