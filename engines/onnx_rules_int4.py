"""Checker rules about 4-bit Q/DQ: where ONNX allows them (opset 21) and where TensorRT does (weight-only,
2-D GEMM weights, block-quantized along the input dimension).

A 4-bit convolution weight still deploys to TensorRT exactly: store its codes in an INT8 container
with the same scale (``--weight-storage int8``), which these messages point to.
"""

from __future__ import annotations

from collections.abc import Iterator

from . import onnx_rule_refs as ref
from .onnx_findings import Hit, Rule
from .onnx_graph_view import FOUR_BIT_TYPES, GraphView, QdqNode, dtype_name
from .onnx_rules_qdq import quantized_type

__all__ = ["RULES", "INT4_BLOCK_SIZES", "INT4_OPSET"]

INT4_OPSET = 21
"""ONNX adds int4 / uint4 and the block_size attribute to QuantizeLinear / DequantizeLinear in opset 21."""
INT4_BLOCK_SIZES = (32, 64, 128)
"""The block lengths this project's INT4 GEMM weights use (those of NVIDIA ModelOpt's INT4 recipes)."""
_INT8_CONTAINER = "store its 4-bit codes in an INT8 container with the same scale (export --weight-storage int8), which is exact"


def _four_bit(view: GraphView) -> Iterator[tuple[QdqNode, int]]:
    for q in view.qdq_nodes():
        qtype = quantized_type(view, q)
        if qtype in FOUR_BIT_TYPES:
            yield q, qtype


def _input_dim_axis(consumer) -> int:
    """The weight axis that runs along the GEMM's input (reduction) dimension: MatMul [in, out] -> 0;
    Gemm: 1 with transB ([out, in]), else 0."""
    if consumer.op_type == "Gemm":
        return 1 if next((a.i for a in consumer.attribute if a.name == "transB"), 0) else 0
    return 0


def _int4_opset(view: GraphView, target: str) -> Iterator[Hit]:
    if view.opset is None or view.opset >= INT4_OPSET:
        return
    for q, qtype in _four_bit(view):
        yield q.name, (f"{q.node.op_type} uses {dtype_name(qtype)}, which ONNX allows only from opset {INT4_OPSET} "
                       f"(opset {view.opset} here); export at --opset {INT4_OPSET}, or {_INT8_CONTAINER}.")


def _int4_activation(view: GraphView, target: str) -> Iterator[Hit]:
    for q, qtype in _four_bit(view):
        if q.is_quantize and not view.is_constant(q.data):
            yield q.name, (f"QuantizeLinear quantizes the activation {q.data!r} to {dtype_name(qtype)}, but TensorRT's "
                           "INT4 is weight-only; keep this layer's activations at 8 bits (--act-bits 8) for "
                           "--backend tensorrt.")


def _int4_gemm_weight(view: GraphView, target: str) -> Iterator[Hit]:
    for q, qtype in _four_bit(view):
        if q.is_quantize or not view.is_constant(q.data):
            continue  # a 4-bit activation: int4-activation
        data = view.shape(q.data)
        readers = [(c, k) for c, k in view.consumers.get(q.node.output[0], [])]
        bad = [c for c, k in readers if c.op_type not in ("MatMul", "Gemm") or k != 1]
        if bad or data is None or len(data) != 2:
            where = f"{bad[0].op_type} {view.name(bad[0])!r}" if bad else f"a rank-{len(data or [])} weight"
            yield q.name, (f"the {dtype_name(qtype)} weight {q.data!r} feeds {where}, but TensorRT takes INT4 only as "
                           f"the 2-D weight (input B) of MatMul / Gemm; {_INT8_CONTAINER}.")


def _int4_block_layout(view: GraphView, target: str) -> Iterator[Hit]:
    for q, qtype in _four_bit(view):
        if q.is_quantize or not view.is_constant(q.data):
            continue
        gemms = [c for c, k in view.consumers.get(q.node.output[0], []) if c.op_type in ("MatMul", "Gemm") and k == 1]
        data, scale = view.shape(q.data), view.shape(q.scale)
        if not gemms or data is None or len(data) != 2 or scale is None:
            continue  # placement is int4-gemm-weight's; a missing shape cannot be judged
        want_axis = _input_dim_axis(gemms[0])
        axis = q.axis + 2 if q.axis < 0 else q.axis
        if len(scale) != 2 or q.block_size <= 0:
            yield q.name, (f"the {dtype_name(qtype)} weight of {gemms[0].op_type} {view.name(gemms[0])!r} is not "
                           f"block-quantized (scale shape {scale}, block_size {q.block_size}); TensorRT's INT4 "
                           f"weights are blocked: re-export with block_size in {list(INT4_BLOCK_SIZES)} on axis "
                           f"{want_axis} (the input dimension).")
        elif axis != want_axis or q.block_size not in INT4_BLOCK_SIZES:
            yield q.name, (f"the {dtype_name(qtype)} weight of {gemms[0].op_type} {view.name(gemms[0])!r} is blocked "
                           f"on axis {q.axis} with block_size {q.block_size}; block it along the input dimension "
                           f"(axis {want_axis}) with block_size in {list(INT4_BLOCK_SIZES)}.")
        elif data[1] is not None and data[1] % 2:
            yield q.name, (f"the {dtype_name(qtype)} weight has shape {data} with an odd last dimension, which "
                           "TensorRT's INT4 packing (two codes a byte) refuses; pad it to an even size or "
                           f"{_INT8_CONTAINER}.")


RULES: tuple[Rule, ...] = (
    Rule("int4-opset", "4-bit Q/DQ below opset 21",
         ("tensorrt", "onnxruntime"), "error", ref.ONNX_DEQUANTIZE_LINEAR, _int4_opset),
    Rule("int4-activation", "activations quantized to 4 bits (TensorRT's INT4 is weight-only)",
         ("tensorrt",), "error", ref.TRT_QUANTIZED_TYPES, _int4_activation),
    Rule("int4-gemm-weight", "4-bit weights anywhere but a 2-D MatMul / Gemm weight (e.g. a Conv)",
         ("tensorrt",), "error", ref.TRT_QUANTIZED_TYPES, _int4_gemm_weight),
    Rule("int4-block-layout", "4-bit GEMM weights not blocked 32/64/128 along the input dimension, or odd",
         ("tensorrt",), "error", ref.TRT_EXPLICIT_QUANTIZATION, _int4_block_layout),
)
