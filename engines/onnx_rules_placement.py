"""Checker rules about where Q/DQ sit and what precision is left: graphs TensorRT builds, but slower
than the Q/DQ graph promises (a fusion defeated, an INT8 layer left in float, FP32 math).

All warnings: the engine is correct, only not the INT8 / FP16 engine the export was written for.
TensorRT's "Q/DQ Layer-Placement Recommendations": quantize all inputs of weighted ops, leave their
outputs unquantized, quantize the residual input of an Add so it fuses into the Conv; NVIDIA
ModelOpt's TensorRT graphs share one Q/DQ per tensor and compute in FP16 between FP32 I/O casts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from onnx import TensorProto

from . import onnx_rule_refs as ref
from .onnx_findings import Hit, Rule
from .onnx_graph_view import GraphView
from .onnx_rules_qdq import WEIGHTED_OPS

__all__ = ["RULES", "FP16_COMPUTE_OPS"]

FP16_COMPUTE_OPS = (*WEIGHTED_OPS, "GroupNormalization", "InstanceNormalization", "LayerNormalization",
                    "BatchNormalization")
"""Ops whose math runs in the type of their weights / input: left FP32 they cost most of the time."""
_FUSES_WITH_OUTPUT_QDQ = (*WEIGHTED_OPS, "Add", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool")
"""Consumers through which a Q/DQ on a GEMM's output still fuses: the next weighted op, a residual Add,
and the ops TensorRT runs in INT8 or moves Q/DQ across (Concat, pooling)."""


def _quantized_weight(view: GraphView, node) -> bool:
    """A weighted op whose weight (input 1) is dequantized from integer codes."""
    return node.op_type in WEIGHTED_OPS and len(node.input) > 1 and view.dequantize_feeding(node.input[1]) is not None


def _same_shape(a: list | None, b: list | None) -> bool:
    """Shapes that may be equal; False for a broadcast such as [N, C, 1, 1] against [N, C, ?, ?] (a dim of 1
    against an unknown one counts as a broadcast: a convolution output is rarely 1 pixel wide)."""
    if a is None or b is None:
        return True
    if len(a) != len(b):
        return False
    return all(x == y or (x is None and y != 1) or (y is None and x != 1) for x, y in zip(a, b))


def _duplicate_quantize(view: GraphView, target: str) -> Iterator[Hit]:
    by_tensor: dict[str, list] = defaultdict(list)
    for q in view.qdq_nodes():
        if q.is_quantize:
            by_tensor[q.data].append(q)
    for tensor, quantizers in by_tensor.items():
        for q in quantizers[1:]:
            yield q.name, (f"the tensor {tensor!r} is quantized by {len(quantizers)} QuantizeLinear nodes "
                           f"({', '.join(x.name for x in quantizers)}); TensorRT (and ModelOpt's graphs) want one "
                           "Q/DQ per tensor shared by its consumers, so give the tensor one scale and one Q/DQ pair.")


def _residual_add(view: GraphView, target: str) -> Iterator[Hit]:
    for node in view.nodes:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        for side, other in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
            conv = view.producer.get(side)
            if conv is None or conv.op_type not in ("Conv", "ConvTranspose") or not _quantized_weight(view, conv):
                continue
            if view.is_constant(other) or view.producer_op(other) == "DequantizeLinear":
                continue
            if not _same_shape(view.shape(other), view.shape(side)):  # a broadcast add (time embedding), no residual
                continue
            source = view.producer_op(other) or "a graph input"
            yield view.name(node), (f"Add adds the quantized {conv.op_type} {view.name(conv)!r} to {other!r} (from "
                                    f"{source}), which has no Q/DQ, so TensorRT cannot fuse the Add into the INT8 "
                                    "convolution; quantize that residual input with a QuantizeLinear/DequantizeLinear "
                                    "pair.")
            break


def _output_qdq(view: GraphView, target: str) -> Iterator[Hit]:
    for q in view.qdq_nodes():
        if not q.is_quantize or view.producer_op(q.data) not in WEIGHTED_OPS:
            continue
        dequantizers = [n for n in view.readers(q.node.output[0]) if n.op_type == "DequantizeLinear"]
        readers = [n for dq in dequantizers for n in view.readers(dq.output[0])]
        if not any(n.op_type in _FUSES_WITH_OUTPUT_QDQ for n in readers):
            gemm = view.producer[q.data]
            shown = ", ".join(sorted({n.op_type for n in readers})) or "nothing"
            yield q.name, (f"QuantizeLinear quantizes the output of {gemm.op_type} {view.name(gemm)!r}, but its "
                           f"DequantizeLinear feeds {shown}, no op that fuses with it, so TensorRT runs an extra "
                           "requantization; leave the output in float (quantize the next weighted op's input "
                           "instead).")


def _weight_only_conv(view: GraphView, target: str) -> Iterator[Hit]:
    for node in view.nodes:
        if node.op_type not in ("Conv", "ConvTranspose") or len(node.input) < 2:
            continue
        weight = view.dequantize_feeding(node.input[1])
        if weight is None or view.elem_type(weight.data) != TensorProto.INT8:
            continue
        if view.producer_op(node.input[0]) != "DequantizeLinear":
            yield view.name(node), (f"{node.op_type} has INT8 weights but an unquantized input, a weight-only INT8 "
                                    "convolution TensorRT does not document (its weight-only quantization is INT4 "
                                    "GEMMs); it runs in float at best: quantize its input too (--first-last w8a8) or "
                                    "keep the layer float.")


def _fp32_compute(view: GraphView, target: str) -> Iterator[Hit]:
    """An op computes in its input's type (ONNX makes weights match it); without an inferred input type,
    its float weights or dequantized inputs tell."""
    for node in view.nodes:
        if node.op_type not in FP16_COMPUTE_OPS or not node.input:
            continue
        compute = view.elem_type(node.input[0])
        why = f"its input {node.input[0]!r} is float32"
        for tensor in (t for t in node.input if t):
            dq = view.dequantize_feeding(tensor)
            if dq is not None and view.elem_type(dq.scale) == TensorProto.FLOAT:
                why = f"its input {tensor!r} is dequantized with a float32 scale"
            elif view.is_constant(tensor) and view.elem_type(tensor) == TensorProto.FLOAT:
                why = f"its weight {tensor!r} is float32"
            else:
                continue
            compute = compute if compute is not None else TensorProto.FLOAT
            break
        if compute == TensorProto.FLOAT:
            yield view.name(node), (f"{node.op_type} computes in float32 ({why}), and a strongly typed TensorRT "
                                    "build keeps that FP32; compute in FP16 inside the graph (FP16 weights and Q/DQ "
                                    "scales, Cast nodes at the FP32 inputs and outputs).")


RULES: tuple[Rule, ...] = (
    Rule("qdq-duplicate-quantize", "one tensor quantized by several QuantizeLinear nodes",
         ("tensorrt",), "warning", ref.TRT_QUANTIZED_TYPES, _duplicate_quantize),
    Rule("residual-add-not-quantized", "a quantized Conv's Add whose residual input has no Q/DQ",
         ("tensorrt",), "warning", ref.TRT_QUANTIZED_TYPES, _residual_add),
    Rule("qdq-on-gemm-output", "Q/DQ on a Conv / MatMul output that feeds nothing it fuses with",
         ("tensorrt",), "warning", ref.TRT_QUANTIZED_TYPES, _output_qdq),
    Rule("weight-only-int8-conv", "INT8 Conv weights with an unquantized input",
         ("tensorrt",), "warning", ref.TRT_QUANTIZED_TYPES, _weight_only_conv),
    Rule("fp32-compute", "Conv / MatMul / Gemm / normalizations left computing in FP32",
         ("tensorrt",), "warning", ref.TRT_PRECISION_CONTROL, _fp32_compute),
)
