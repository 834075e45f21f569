"""The static ONNX checker: one broken tiny graph per rule, the clean TensorRT form, the CLI and the
build-engine refusal.

Every graph starts from one clean tiny UNet-like block in the TensorRT form ModelOpt writes (FP32
inputs and outputs with Casts, FP16 compute, symmetric int8 Q/DQ with FP16 scales on the Conv's input
and weight, the same Q/DQ shared by the Conv and the residual Add, a Q/DQ'd time-embedding MatMul)
and breaks one thing, so a test can say that exactly its rule fires.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from _cli_runner import run_cli
from pqcad_deploy.engines.errors import BuildError
from pqcad_deploy.engines.manifest import write_onnx_manifest
from pqcad_deploy.engines.onnx_check import RULES, OnnxCheckError, check_onnx, format_human, rules_for
from pqcad_deploy.engines.tensorrt_build import build_tensorrt_engine, check_tensorrt_target

ROOT = Path(__file__).resolve().parents[2]
C, H, W, K = 4, 8, 8, 32  # channels, image size, time-embedding width
F16, F32, I8 = TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.INT8


# ------------------------------------------------------------------------------------------ graphs

def _t(name: str, dtype: int, values, dims: list[int] | None = None) -> onnx.TensorProto:
    arr = np.asarray(values)
    return helper.make_tensor(name, dtype, list(arr.shape) if dims is None else dims, arr.flatten().tolist())


def tiny_block(ft: int = F16, opset: int = 19) -> onnx.ModelProto:
    """The clean graph: noise_pred = Cast32(Conv(QDQ(x)) + QDQ(x) + Reshape(MatMul(QDQ(temb), DQ(W)))).

    ``ft`` is the compute type (FLOAT16: the TensorRT form; FLOAT: the same graph left in FP32).
    """
    rng = np.random.default_rng(0)
    inits = [
        _t("x_scale", ft, np.float32(0.05), []), _t("zp", I8, np.int8(0), []),
        _t("w_codes", I8, rng.integers(-127, 128, (C, C, 3, 3))),
        _t("w_scale", ft, [0.25, 0.5, 0.125, 0.0625]), _t("w_zp", I8, np.zeros(C, np.int8)),
        _t("bias", ft, np.zeros(C, np.float32)),
        _t("shape_t", TensorProto.INT64, [-1, 1]), _t("freqs", ft, rng.random((1, K)).astype(np.float32)),
        _t("t_scale", ft, np.float32(0.125), []),
        _t("m_codes", I8, rng.integers(-127, 128, (K, C))),
        _t("m_scale", ft, [0.5, 0.25, 0.125, 0.5]), _t("m_zp", I8, np.zeros(C, np.int8)),
        _t("shape4", TensorProto.INT64, [-1, C, 1, 1]),
    ]
    nodes = [
        helper.make_node("Cast", ["sample"], ["x16"], name="cast_in", to=ft),
        helper.make_node("QuantizeLinear", ["x16", "x_scale", "zp"], ["x_q"], name="x_quantize"),
        helper.make_node("DequantizeLinear", ["x_q", "x_scale", "zp"], ["x_dq"], name="x_dequantize"),
        helper.make_node("DequantizeLinear", ["w_codes", "w_scale", "w_zp"], ["w"], name="conv_weight_dequantize", axis=0),
        helper.make_node("Conv", ["x_dq", "w", "bias"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c", "x_dq"], ["h"], name="residual_add"),
        helper.make_node("Reshape", ["timestep", "shape_t"], ["t2"], name="t_reshape"),
        helper.make_node("Cast", ["t2"], ["t16"], name="t_cast", to=ft),
        helper.make_node("Mul", ["t16", "freqs"], ["temb"], name="t_freqs"),
        helper.make_node("QuantizeLinear", ["temb", "t_scale", "zp"], ["t_q"], name="t_quantize"),
        helper.make_node("DequantizeLinear", ["t_q", "t_scale", "zp"], ["t_dq"], name="t_dequantize"),
        helper.make_node("DequantizeLinear", ["m_codes", "m_scale", "m_zp"], ["m"], name="proj_weight_dequantize", axis=1),
        helper.make_node("MatMul", ["t_dq", "m"], ["p"], name="proj"),
        helper.make_node("Reshape", ["p", "shape4"], ["p4"], name="proj_reshape"),
        helper.make_node("Add", ["h", "p4"], ["y"], name="temb_add"),
        helper.make_node("Cast", ["y"], ["noise_pred"], name="cast_out", to=F32),
    ]
    graph = helper.make_graph(
        nodes, "tiny_block",
        [helper.make_tensor_value_info("sample", F32, ["batch", C, H, W]),
         helper.make_tensor_value_info("timestep", F32, ["batch"])],
        [helper.make_tensor_value_info("noise_pred", F32, ["batch", C, H, W])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9 if opset < 21 else 10
    return model


def node(model: onnx.ModelProto, name: str):
    return next(n for n in model.graph.node if n.name == name)


def put(model: onnx.ModelProto, *tensors: onnx.TensorProto) -> None:
    """Add initializers, replacing those of the same name."""
    names = {t.name for t in tensors}
    keep = [t for t in model.graph.initializer if t.name not in names]
    del model.graph.initializer[:]
    model.graph.initializer.extend([*keep, *tensors])


def set_opset(model: onnx.ModelProto, opset: int) -> None:
    for o in model.opset_import:
        if o.domain == "":
            o.version = opset
    model.ir_version = 9 if opset < 21 else 10


def set_attr(n, name: str, value) -> None:
    for a in list(n.attribute):
        if a.name == name:
            n.attribute.remove(a)
    n.attribute.append(helper.make_attribute(name, value))


def with_manifest(model: onnx.ModelProto, make_manifest, image_shape=(C, H, W)) -> onnx.ModelProto:
    return write_onnx_manifest(model, make_manifest(precision="w8a8", image_shape=image_shape))


# ------------------------------------------------------------------------------------------ the broken graphs

def _conv_integer(m):
    put(m, _t("a_u8", TensorProto.UINT8, np.zeros((1, C, H, W), np.uint8)),
        _t("w_u8", TensorProto.UINT8, np.full((C, C, 1, 1), 128, np.uint8)))
    m.graph.node.append(helper.make_node("ConvInteger", ["a_u8", "w_u8"], ["acc"], name="l/conv_integer"))


def _matmul_nbits(m):
    put(m, _t("nbits_w", TensorProto.UINT8, np.zeros((C, 1, 16), np.uint8)), _t("nbits_s", F16, np.ones(C, np.float32)))
    m.graph.node.append(helper.make_node("MatMulNBits", ["t_dq", "nbits_w", "nbits_s"], ["nb"], name="nbits",
                                         domain="com.microsoft", K=K, N=C, bits=4, block_size=32))
    m.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def _int32_bias(m):
    put(m, _t("b32", TensorProto.INT32, [1, -2, 3, 4]), _t("b_scale", F16, [0.5, 0.5, 0.5, 0.5]))
    m.graph.node.append(helper.make_node("DequantizeLinear", ["b32", "b_scale"], ["b_f"], name="l/bias_dequantize", axis=0))


def _uint8_zero_point(m):
    put(m, _t("zp", TensorProto.UINT8, np.uint8(0), []))


def _no_zero_point(m):
    for name in ("x_quantize", "x_dequantize"):
        del node(m, name).input[2]


def _trt_custom_op(m):
    m.graph.node.append(helper.make_node("TRT_INT4DequantizeLinear", ["m_codes", "m_scale"], ["m4"], name="trt_dq",
                                         domain="trt", axis=1))
    m.opset_import.append(helper.make_opsetid("trt", 1))


def _opset_21(m):
    set_opset(m, 21)


def _dynamic_hw(m):
    dims = m.graph.input[0].type.tensor_type.shape.dim
    dims[2].ClearField("dim_value"), dims[3].ClearField("dim_value")
    dims[2].dim_param, dims[3].dim_param = "height", "width"


def _computed_scale(m):
    put(m, _t("x_base", F16, np.float32(0.025), []), _t("two", F16, np.float32(2.0), []))
    m.graph.node.insert(0, helper.make_node("Mul", ["x_base", "two"], ["x_scale_c"], name="scale_mul"))
    for name in ("x_quantize", "x_dequantize"):
        node(m, name).input[1] = "x_scale_c"


def _nonzero_zero_point(m):
    put(m, _t("w_zp", I8, [0, 3, 0, 0]))


def _negative_scale(m):
    put(m, _t("w_scale", F16, [0.25, -0.5, 0.125, 0.0625]))


def _inf_scale(m):
    put(m, _t("t_scale", F16, np.float32(np.inf), []))


def _scale_count(m):
    put(m, _t("w_scale", F16, [0.25, 0.5]), _t("w_zp", I8, [0, 0]))


def _zero_point_shape(m):
    put(m, _t("w_zp", I8, np.int8(0), []))


def _fp32_weight_scale(m):
    put(m, _t("w_scale", F32, [0.25, 0.5, 0.125, 0.0625]))


def _opset_17_fp16_scales(m):
    set_opset(m, 17)


def _conv_axis_1(m):
    set_attr(node(m, "conv_weight_dequantize"), "axis", 1)


def _conv_transpose(axis: int):
    def mutate(m):
        conv = node(m, "conv")
        conv.op_type = "ConvTranspose"
        set_attr(node(m, "conv_weight_dequantize"), "axis", axis)
    return mutate


def _matmul_axis_0(m):
    put(m, _t("m_scale", F16, np.full(K, 0.5, np.float32)), _t("m_zp", I8, np.zeros(K, np.int8)))
    set_attr(node(m, "proj_weight_dequantize"), "axis", 0)


def _gemm_trans_b(m):
    put(m, _t("m_codes", I8, np.ones((C, K), np.int8)), _t("m_scale", F16, np.full(K, 0.5, np.float32)),
        _t("m_zp", I8, np.zeros(K, np.int8)))
    proj = node(m, "proj")
    proj.op_type = "Gemm"
    proj.attribute.append(helper.make_attribute("transB", 1))


def _activation_per_channel(m):
    put(m, _t("x_scale", F16, [0.05, 0.05, 0.1, 0.1]), _t("x_zp", I8, np.zeros(C, np.int8)))
    for name in ("x_quantize", "x_dequantize"):
        n = node(m, name)
        n.input[2] = "x_zp"
        set_attr(n, "axis", 1)


def _int4_matmul_weight(block_size: int = 32, opset: int = 21, per_channel: bool = False):
    def mutate(m):
        set_opset(m, opset)
        codes = helper.make_tensor("m_codes", TensorProto.INT4, [K, C], np.tile([1, -2, 3, -4], K).tolist())
        if per_channel:
            put(m, codes, _t("m_scale", F16, [0.5, 0.25, 0.125, 0.5]))
            del node(m, "proj_weight_dequantize").input[2]
            return
        put(m, codes, _t("m_scale", F16, np.full((K // block_size, C), 0.5, np.float32)))
        dq = node(m, "proj_weight_dequantize")
        del dq.input[2]
        set_attr(dq, "axis", 0)
        set_attr(dq, "block_size", block_size)
    return mutate


def _int4_activation(m):
    set_opset(m, 21)
    put(m, helper.make_tensor("t_zp4", TensorProto.INT4, [], [0]))
    for name in ("t_quantize", "t_dequantize"):
        node(m, name).input[2] = "t_zp4"


def _int4_conv_weight(m):
    set_opset(m, 21)
    put(m, helper.make_tensor("w_codes", TensorProto.INT4, [C, C, 3, 3], [1] * (C * C * 9)),
        helper.make_tensor("w_zp", TensorProto.INT4, [C], [0] * C))


def _weight_only_conv(m):
    node(m, "conv").input[0] = "x16"


def _second_quantize(m):
    m.graph.node.extend([
        helper.make_node("QuantizeLinear", ["x16", "x_scale", "zp"], ["x_q2"], name="x_quantize_2"),
        helper.make_node("DequantizeLinear", ["x_q2", "x_scale", "zp"], ["x_dq2"], name="x_dequantize_2"),
    ])
    node(m, "residual_add").input[1] = "x_dq2"


def _float_residual(m):
    node(m, "residual_add").input[1] = "x16"


def _output_qdq(m):
    put(m, _t("c_scale", F16, np.float32(0.5), []))
    idx = list(m.graph.node).index(node(m, "conv")) + 1
    for k, n in enumerate([
        helper.make_node("QuantizeLinear", ["c", "c_scale", "zp"], ["c_q"], name="conv_out_quantize"),
        helper.make_node("DequantizeLinear", ["c_q", "c_scale", "zp"], ["c_dq"], name="conv_out_dequantize"),
        helper.make_node("Sigmoid", ["c_dq"], ["c_sig"], name="conv_sigmoid"),
    ]):
        m.graph.node.insert(idx + k, n)
    node(m, "residual_add").input[0] = "c_sig"


@dataclass(frozen=True)
class Case:
    """A broken graph: the rule it must trip (and the message it must say), on which target."""

    rule: str
    mutate: Callable[[onnx.ModelProto], None]
    fragment: str
    target: str = "tensorrt"
    also: frozenset[str] = field(default_factory=frozenset)
    """Rules the breakage trips too, by necessity (a standard INT4 graph needs opset 21, above 10.3's 20)."""
    base: Callable[[], onnx.ModelProto] = tiny_block
    image_shape: tuple[int, int, int] = (C, H, W)


OPSET_21 = frozenset({"trt-opset-range"})
CASES: dict[str, Case] = {
    "conv-integer": Case("trt-unsupported-op", _conv_integer,
                         "ConvInteger is an ONNX Runtime integer kernel (--target ort-x86 writes it) that TensorRT's "
                         "ONNX parser does not import; export it again with --target tensorrt for --backend tensorrt, or "
                         "build this one with --backend onnxruntime."),
    "matmul-nbits": Case("trt-unsupported-op", _matmul_nbits,
                         "MatMulNBits of domain com.microsoft is an ONNX Runtime contrib op that TensorRT's ONNX "
                         "parser does not import"),
    "int32-bias": Case("trt-int32-bias-dequantize", _int32_bias,
                       "DequantizeLinear of int32 values (the bias --target ort-qlinear writes for QLinearConv, or "
                       "the ConvInteger accumulator --target ort-x86 rescales) is not imported by TensorRT, which "
                       "dequantizes only INT8, FP8 and INT4"),
    "uint8-zero-point": Case("trt-uint8-qdq", _uint8_zero_point,
                             "uses uint8 codes (what --target ort-x86 writes for ONNX Runtime's x86 kernels), but "
                             "TensorRT's Q/DQ are signed int8 and its parser refuses uint8"),
    "no-zero-point": Case("trt-uint8-qdq", _no_zero_point,
                          "QuantizeLinear has no zero-point, so ONNX quantizes to uint8 while TensorRT quantizes to "
                          "int8 (different codes); give it an int8 zero-point of 0."),
    "trt-custom-op": Case("ort-unsupported-op", _trt_custom_op,
                          "TRT_INT4DequantizeLinear is a TensorRT custom op (onnx-tensorrt's TRT_ ops) that ONNX "
                          "Runtime has no kernel for", target="onnxruntime"),
    "opset-21": Case("trt-opset-range", _opset_21,
                     "opset 21 is outside the opsets 9-20 onnx-tensorrt documents for the TensorRT 10.3 of JetPack 6"),
    "dynamic-hw": Case("trt-input-profile", _dynamic_hw,
                       "graph input 'sample' has shape [?, 4, ?, ?] with a dynamic dimension other than the batch"),
    "manifest-shape": Case("trt-input-profile", lambda m: None,
                           "graph input 'sample' has shape [?, 4, 8, 8], but its manifest's image_shape is "
                           "[4, 16, 16]", image_shape=(C, 16, 16)),
    "computed-scale": Case("qdq-scale-not-constant", _computed_scale,
                           "the scale 'x_scale_c' of QuantizeLinear is computed by a Mul node, not a constant; "
                           "TensorRT needs scales and zero-points as build-time constants"),
    "computed-scale-ort": Case("qdq-scale-not-constant", _computed_scale,
                               "ONNX Runtime fuses Q/DQ into integer kernels only with constant scales",
                               target="onnxruntime"),
    "nonzero-zero-point": Case("qdq-zero-point-nonzero", _nonzero_zero_point,
                               "the zero-point 'w_zp' of DequantizeLinear has 1 non-zero value(s) (e.g. 3), but "
                               "TensorRT only supports symmetric quantization"),
    "negative-scale": Case("qdq-scale-not-positive", _negative_scale,
                           "the scale 'w_scale' of DequantizeLinear has 1 value(s) that are not positive and finite "
                           "(e.g. -0.5)"),
    "inf-scale-ort": Case("qdq-scale-not-positive", _inf_scale, "not positive and finite (e.g. inf)",
                          target="onnxruntime"),
    "scale-count": Case("qdq-scale-shape", _scale_count,
                        "DequantizeLinear has 2 per-channel scales but its input's axis 0 has 4 channels"),
    "zero-point-shape": Case("qdq-scale-shape", _zero_point_shape,
                             "DequantizeLinear's zero-point has shape [] but its scale has shape [4]"),
    "fp32-weight-scale": Case("qdq-scale-dtype", _fp32_weight_scale,
                              "DequantizeLinear returns a float32 weight (its scale's type) to Conv 'conv', whose "
                              "input is float16; store the weight scale as float16."),
    "opset-17-fp16": Case("qdq-scale-dtype", _opset_17_fp16_scales,
                          "scale is float16, but before opset 19 ONNX takes float32 scales only",
                          also=frozenset({"fp32-compute"})),  # DequantizeLinear-13 returns float32 whatever the scale
    "conv-axis": Case("qdq-weight-axis", _conv_axis_1,
                      "the per-channel weight of Conv 'conv' is quantized on axis 1, but TensorRT needs axis 0 for a Conv weight; "
                      "re-export with axis=0."),
    "conv-transpose-trt": Case("qdq-weight-axis", _conv_transpose(1),
                               "of ConvTranspose 'conv' is quantized on axis 1, but TensorRT needs axis 0"),
    "conv-transpose-ort": Case("qdq-weight-axis", _conv_transpose(0),
                               "of ConvTranspose 'conv' is quantized on axis 0, but ONNX Runtime needs axis 1",
                               target="onnxruntime"),
    "matmul-axis": Case("qdq-weight-axis", _matmul_axis_0,
                        "the per-channel weight of MatMul 'proj' is quantized on axis 0, but TensorRT needs axis 1"),
    "gemm-trans-b": Case("qdq-weight-axis", _gemm_trans_b,
                         "the per-channel weight of Gemm 'proj' is quantized on axis 1, but TensorRT needs axis 0"),
    "activation-per-channel": Case("qdq-activation-per-channel", _activation_per_channel,
                                   "QuantizeLinear quantizes the activation 'x16' with 4 scales, but activations "
                                   "are quantized per tensor only in TensorRT; use one scalar scale."),
    "int4-opset-19": Case("int4-opset", _int4_matmul_weight(opset=19),
                          "DequantizeLinear uses int4, which ONNX allows only from opset 21 (opset 19 here)"),
    "int4-opset-19-ort": Case("int4-opset", _int4_matmul_weight(opset=19), "export at --opset 21",
                              target="onnxruntime"),
    "int4-activation": Case("int4-activation", _int4_activation,
                            "QuantizeLinear quantizes the activation 'temb' to int4, but TensorRT's INT4 is "
                            "weight-only", also=OPSET_21),
    "int4-conv": Case("int4-gemm-weight", _int4_conv_weight,
                      "the int4 weight 'w_codes' feeds Conv 'conv', but TensorRT takes INT4 only as the 2-D weight "
                      "(input B) of MatMul / Gemm; store its 4-bit codes in an INT8 container", also=OPSET_21),
    "int4-block-16": Case("int4-block-layout", _int4_matmul_weight(block_size=16),
                          "the int4 weight of MatMul 'proj' is blocked on axis 0 with block_size 16", also=OPSET_21),
    "int4-per-channel": Case("int4-block-layout", _int4_matmul_weight(per_channel=True),
                             "the int4 weight of MatMul 'proj' is not block-quantized (scale shape [4], block_size 0)",
                             also=OPSET_21),
    "weight-only-conv": Case("weight-only-int8-conv", _weight_only_conv,
                             "Conv has INT8 weights but an unquantized input"),
    "duplicate-quantize": Case("qdq-duplicate-quantize", _second_quantize,
                               "the tensor 'x16' is quantized by 2 QuantizeLinear nodes (x_quantize, x_quantize_2)"),
    "float-residual": Case("residual-add-not-quantized", _float_residual,
                           "Add adds the quantized Conv 'conv' to 'x16' (from Cast), which has no Q/DQ, so TensorRT "
                           "cannot fuse the Add into the INT8 convolution"),
    "output-qdq": Case("qdq-on-gemm-output", _output_qdq,
                       "QuantizeLinear quantizes the output of Conv 'conv', but its DequantizeLinear feeds Sigmoid"),
    "fp32-graph": Case("fp32-compute", lambda m: None,
                       "Conv computes in float32 (its input 'x_dq' is dequantized with a float32 scale)",
                       base=lambda: tiny_block(ft=F32)),
}


def broken(case: Case, make_manifest) -> onnx.ModelProto:
    model = case.base()
    case.mutate(model)
    return with_manifest(model, make_manifest, case.image_shape)


# ------------------------------------------------------------------------------------------ rule tests

@pytest.mark.parametrize("target", ["tensorrt", "onnxruntime"])
@pytest.mark.parametrize("ft", [F16, F32], ids=["fp16", "fp32"])
def test_the_tensorrt_form_is_clean(make_manifest, target: str, ft: int) -> None:
    """The TensorRT form has no finding; the same graph in FP32 only draws fp32-compute (Conv, MatMul)."""
    model = with_manifest(tiny_block(ft), make_manifest)
    onnx.checker.check_model(model, full_check=True)  # a valid ONNX graph, types and shapes included
    findings = check_onnx(model, target)
    if ft == F32 and target == "tensorrt":
        assert [(f.rule, f.node) for f in findings] == [("fp32-compute", "conv"), ("fp32-compute", "proj")]
    else:
        assert findings == []


@pytest.mark.parametrize("name", list(CASES))
def test_each_broken_graph_trips_its_rule(name: str, make_manifest) -> None:
    case = CASES[name]
    findings = check_onnx(broken(case, make_manifest), case.target)
    assert {f.rule for f in findings} == {case.rule} | case.also, [f.line() for f in findings]
    mine = [f for f in findings if f.rule == case.rule]
    assert any(case.fragment in f.message for f in mine), [f.message for f in mine]
    rule = RULES[case.rule]
    assert all(f.severity == rule.severity and f.reference == rule.reference_for(case.target) for f in mine)


@pytest.mark.parametrize("rule_id", list(RULES))
def test_every_rule_has_a_broken_graph(rule_id: str) -> None:
    """A new rule without a broken graph in CASES fails here."""
    assert any(case.rule == rule_id for case in CASES.values()), f"add a broken graph for {rule_id} to CASES"


def test_rules_are_a_registry_with_documented_references() -> None:
    assert len(RULES) >= 15
    for rule_id, rule in RULES.items():
        assert rule.id == rule_id and re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", rule_id)
        assert rule.reference.startswith("https://") and rule.title
    assert [r.id for r in rules_for("onnxruntime")] == [
        "ort-unsupported-op", "qdq-scale-not-constant", "qdq-scale-not-positive", "qdq-scale-shape",
        "qdq-scale-dtype", "qdq-weight-axis", "qdq-activation-per-channel", "int4-opset"]
    assert len(rules_for("tensorrt")) == len(RULES) - 1
    # a finding cites its own target's documentation where the rule has one
    assert RULES["qdq-scale-not-constant"].reference_for("onnxruntime") == \
        "https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html"
    assert RULES["qdq-scale-not-constant"].reference_for("tensorrt") == \
        "https://docs.nvidia.com/deeplearning/tensorrt/operators/docs/Quantize.html"


def test_the_docs_table_lists_exactly_the_registry() -> None:
    text = (ROOT / "docs" / "CHECKER.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([a-z0-9-]+)` \| ([a-z, ]+) \|", text, flags=re.MULTILINE)
    assert [r for r, _ in rows] == list(RULES)
    for rule_id, targets in rows:
        assert tuple(t.strip() for t in targets.split(",")) == RULES[rule_id].targets, rule_id


def test_an_unknown_target_and_a_missing_file_are_refused(tmp_path: Path, make_manifest) -> None:
    with pytest.raises(OnnxCheckError, match=re.escape("target must be one of tensorrt, onnxruntime; got 'trt'.")):
        check_onnx(tiny_block(), "trt")
    with pytest.raises(OnnxCheckError, match="does not exist or is not a file"):
        check_onnx(tmp_path / "missing.onnx", "tensorrt")


def test_the_human_report(make_manifest) -> None:
    findings = check_onnx(broken(CASES["negative-scale"], make_manifest), "tensorrt")
    assert format_human(findings, "tensorrt", "m.onnx").splitlines() == [
        "qdq-scale-not-positive error conv_weight_dequantize: the scale 'w_scale' of DequantizeLinear has 1 "
        "value(s) that are not positive and finite (e.g. -0.5); a zero, negative, inf or nan scale gives garbage or "
        "division by zero: recalibrate that layer's scale. (see "
        "https://docs.nvidia.com/deeplearning/tensorrt/operators/docs/Dequantize.html)",
        f"m.onnx: 1 error(s), 0 warning(s) ({len(RULES) - 1} tensorrt rules checked).",
    ]


# ------------------------------------------------------------------------------------------ CLI

run_main = run_cli  # tests/_cli_runner.py


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def test_check_cli_clean_graph_exits_0(tmp_path: Path, make_manifest) -> None:
    path = save(with_manifest(tiny_block(), make_manifest), tmp_path / "clean.onnx")
    result = run_main("check", path, "--target", "tensorrt")
    assert result.code == 0 and result.err == ""
    assert result.out == f"{path}: 0 error(s), 0 warning(s) ({len(RULES) - 1} tensorrt rules checked).\n"


def test_check_cli_warnings_exit_0_errors_exit_1(tmp_path: Path, make_manifest) -> None:
    warned = save(broken(CASES["float-residual"], make_manifest), tmp_path / "warned.onnx")
    result = run_main("check", warned, "--target", "tensorrt")
    assert result.code == 0
    assert result.out.splitlines()[0].startswith("residual-add-not-quantized warning residual_add: Add adds the "
                                                 "quantized Conv 'conv' to 'x16' (from Cast)")
    assert result.out.splitlines()[-1].endswith(": 0 error(s), 1 warning(s) (21 tensorrt rules checked).")

    refused = save(broken(CASES["conv-integer"], make_manifest), tmp_path / "refused.onnx")
    result = run_main("check", refused, "--target", "tensorrt")
    assert result.code == 1 and result.err == ""
    lines = result.out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("trt-unsupported-op error l/conv_integer: ConvInteger is an ONNX")
    assert lines[0].endswith("(see https://github.com/onnx/onnx-tensorrt/blob/release/10.1-GA/docs/operators.md)")
    assert run_main("check", refused, "--target", "onnxruntime").code == 0  # ONNX Runtime runs ConvInteger


def test_check_cli_json(tmp_path: Path, make_manifest) -> None:
    path = save(broken(CASES["scale-count"], make_manifest), tmp_path / "m.onnx")
    result = run_main("check", path, "--target", "onnxruntime", "--json")
    assert result.code == 1
    data = json.loads(result.out)
    assert data["model"] == str(path)
    assert data["summary"] == {"target": "onnxruntime", "errors": 1, "warnings": 0, "rules_checked": 8,
                               "findings_per_rule": {"qdq-scale-shape": 1}}
    (finding,) = data["findings"]
    assert finding == {
        "rule": "qdq-scale-shape", "severity": "error", "node": "conv_weight_dequantize",
        "message": "DequantizeLinear has 2 per-channel scales but its input's axis 0 has 4 channels; set axis to "
                   "the output-channel axis or fix the scale.",
        "reference": "https://onnx.ai/onnx/operators/onnx__DequantizeLinear.html",
    }


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p, "does not exist or is not a file; pass an ONNX model file."),
    (lambda p: (p.write_text("not onnx at all\n"), p)[1], "is not a readable ONNX model (DecodeError"),
    (lambda p: (p.mkdir(), p)[1], "does not exist or is not a file"),
])
def test_check_cli_unreadable_file_is_one_error_line(tmp_path: Path, make, fragment: str) -> None:
    path = make(tmp_path / "m.onnx")
    result = run_main("check", path, "--target", "tensorrt")
    assert result.code == 1 and result.out == ""
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path} ") and fragment in lines[0]


def test_check_cli_help_and_usage_errors() -> None:
    result = run_main("check", "--help")
    assert result.code == 0
    for text in ("Usage: pqcad-deploy check [OPTIONS] ONNX", "--target [tensorrt|onnxruntime]", "--json"):
        assert text in result.out
    result = run_main("check", "m.onnx")
    assert result.code == 2 and result.err.startswith("error: Missing option '--target'")


# ------------------------------------------------------------------------------------------ build-engine refusal

def test_build_engine_refuses_with_the_rule_message(tmp_path: Path, make_manifest) -> None:
    """Refused before TensorRT is imported: testable without it, same message on the Jetson."""
    model = broken(CASES["nonzero-zero-point"], make_manifest)
    put(model, _t("w_scale", F16, [0.25, -0.5, 0.125, 0.0625]))  # a second error, in a later rule
    path = save(model, tmp_path / "m.onnx")
    first = check_onnx(path, "tensorrt")[0]
    expected = (f"{path} breaks TensorRT rule qdq-zero-point-nonzero at conv_weight_dequantize: {first.message} "
                f"(1 other error(s) too; `pqcad-deploy check {path} --target tensorrt` lists every finding.)")
    with pytest.raises(BuildError) as info:
        check_tensorrt_target(path)
    assert str(info.value) == expected
    with pytest.raises(BuildError) as info:
        build_tensorrt_engine(path, tmp_path / "engine")
    assert str(info.value) == expected
    assert not (tmp_path / "engine").exists()


def test_build_engine_passes_warnings_and_clean_graphs(tmp_path: Path, make_manifest) -> None:
    for name, model in (("clean", with_manifest(tiny_block(), make_manifest)),
                        ("warned", broken(CASES["float-residual"], make_manifest))):
        assert check_tensorrt_target(save(model, tmp_path / f"{name}.onnx")) is None
