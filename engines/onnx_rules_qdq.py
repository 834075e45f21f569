"""Checker rules about each QuantizeLinear / DequantizeLinear on its own: its quantized type, zero-point,
scale (constness, values, shape, dtype) and per-channel axis.

TensorRT states these as hard limits of its Quantize / Dequantize layers (symmetric signed
quantization, build-time constant positive scales, per-channel only for weights); ONNX Runtime
shares the scale rules (its QDQ fusions need constant scales, and the ONNX spec fixes the types).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from onnx import TensorProto

from . import onnx_rule_refs as ref
from .onnx_findings import Hit, Rule
from .onnx_graph_view import FOUR_BIT_TYPES, GraphView, QdqNode, dtype_name

__all__ = ["RULES", "quantized_type", "expected_weight_axis", "WEIGHTED_OPS"]

WEIGHTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
"""Ops whose input 1 is a weight TensorRT and ONNX Runtime quantize per output channel."""


def quantized_type(view: GraphView, q: QdqNode) -> int | None:
    """The integer type a Q produces or a DQ reads (ONNX: a Q without zero-point or output_dtype is uint8)."""
    if not q.is_quantize:
        return view.elem_type(q.data)
    if q.zero_point:
        return view.elem_type(q.zero_point)
    output_dtype = next((a.i for a in q.node.attribute if a.name == "output_dtype"), 0)
    return int(output_dtype) or TensorProto.UINT8


def expected_weight_axis(consumer, rank: int, target: str) -> int | None:
    """The per-channel axis a weight (input 1) of ``consumer`` must be quantized on for ``target``.

    Conv KCRS: 0. ConvTranspose CKRS: 0 for TensorRT (its Q/DQ layers take axis 0), 1 (output
    channels) for ONNX Runtime. MatMul [.., in, out]: the last axis. Gemm: 0 with transB, else 1.
    """
    op = consumer.op_type
    if op == "Conv":
        return 0
    if op == "ConvTranspose":
        return 0 if target == "tensorrt" else 1
    if op == "MatMul":
        return rank - 1
    if op == "Gemm":
        trans_b = next((a.i for a in consumer.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return None


def _kind(q: QdqNode) -> str:
    return "QuantizeLinear" if q.is_quantize else "DequantizeLinear"


def _normal_axis(axis: int, rank: int) -> int | None:
    return axis + rank if -rank <= axis < 0 else (axis if 0 <= axis < rank else None)


def _trt_uint8(view: GraphView, target: str) -> Iterator[Hit]:
    for q in view.qdq_nodes():
        qtype = quantized_type(view, q)
        if qtype != TensorProto.UINT8:
            continue
        if q.is_quantize and not q.zero_point and not any(a.name == "output_dtype" for a in q.node.attribute):
            yield q.name, ("QuantizeLinear has no zero-point, so ONNX quantizes to uint8 while TensorRT quantizes to "
                           "int8 (different codes); give it an int8 zero-point of 0.")
        else:
            yield q.name, (f"{_kind(q)} uses uint8 codes (what --target ort-x86 writes for ONNX Runtime's x86 kernels), "
                           "but TensorRT's Q/DQ are signed int8 and its parser refuses uint8; export it again with "
                           "--target tensorrt for --backend tensorrt, or build this one with --backend onnxruntime.")


def _scale_constant(view: GraphView, target: str) -> Iterator[Hit]:
    runtime = "TensorRT needs scales and zero-points as build-time constants" if target == "tensorrt" else \
        "ONNX Runtime fuses Q/DQ into integer kernels only with constant scales and zero-points"
    for q in view.qdq_nodes():
        for role, tensor in (("scale", q.scale), ("zero-point", q.zero_point)):
            if tensor and not view.is_constant(tensor):
                source = view.producer_op(tensor)
                made = f"computed by a {source} node" if source else "a graph input"
                yield q.name, (f"the {role} {tensor!r} of {_kind(q)} is {made}, not a constant; {runtime}: store it "
                               "as an initializer.")


def _zero_point(view: GraphView, target: str) -> Iterator[Hit]:
    for q in view.qdq_nodes():
        if not q.zero_point:
            continue
        values = view.constant_array(q.zero_point)
        if values is not None and values.dtype.kind in "iu" and np.any(values != 0):
            nonzero = int(np.count_nonzero(values))
            yield q.name, (f"the zero-point {q.zero_point!r} of {_kind(q)} has {nonzero} non-zero value(s) "
                           f"(e.g. {values.flat[np.flatnonzero(values)[0]]}), but TensorRT only supports symmetric "
                           "quantization; re-export with zero-points of 0 (symmetric scales).")


def _scale_positive(view: GraphView, target: str) -> Iterator[Hit]:
    for q in view.qdq_nodes():
        values = view.constant_array(q.scale)
        if values is None or values.dtype.kind != "f":
            continue
        values = values.astype(np.float64)
        bad = ~np.isfinite(values) | (values <= 0)
        if np.any(bad):
            example = values.flat[np.flatnonzero(bad)[0]]
            yield q.name, (f"the scale {q.scale!r} of {_kind(q)} has {int(np.count_nonzero(bad))} value(s) that are "
                           f"not positive and finite (e.g. {example:g}); a zero, negative, inf or nan scale gives "
                           "garbage or division by zero: recalibrate that layer's scale.")


def _scale_shape(view: GraphView, target: str) -> Iterator[Hit]:
    for q in view.qdq_nodes():
        scale = view.shape(q.scale)
        data = view.shape(q.data)
        if scale is None:
            continue
        size = math.prod(scale)
        if q.zero_point:
            zp = view.shape(q.zero_point)
            if zp is not None and zp != scale:
                yield q.name, (f"{_kind(q)}'s zero-point has shape {zp} but its scale has shape {scale}; ONNX and "
                               "TensorRT need them equal: give the zero-point the scale's shape.")
                continue
        if len(scale) == 0 or (len(scale) == 1 and size == 1):
            continue  # per-tensor
        if data is None:
            continue
        rank = len(data)
        axis = _normal_axis(q.axis, rank)
        if axis is None:
            yield q.name, f"{_kind(q)}'s axis {q.axis} is outside its rank-{rank} input; set axis to the channel axis."
        elif len(scale) == 1:
            if data[axis] is not None and data[axis] != size:
                yield q.name, (f"{_kind(q)} has {size} per-channel scales but its input's axis {axis} has "
                               f"{data[axis]} channels; set axis to the output-channel axis or fix the scale.")
        elif len(scale) == rank:
            yield from _blocked_scale(view, q, scale, data, axis, target)
        else:
            yield q.name, (f"{_kind(q)}'s scale has shape {scale}: neither a scalar (per-tensor), 1-D (per-channel) "
                           f"nor rank {rank} (blocked); reshape it to one of those.")


def _blocked_scale(view: GraphView, q: QdqNode, scale: list, data: list, axis: int, target: str) -> Iterator[Hit]:
    if target == "tensorrt" and quantized_type(view, q) not in FOUR_BIT_TYPES:
        yield q.name, (f"{_kind(q)} is block-quantized (scale shape {scale}) with "
                       f"{dtype_name(quantized_type(view, q))} codes, but TensorRT 10.3 blocks only INT4; use a "
                       "1-D per-channel scale.")
        return
    if q.block_size <= 0:
        yield q.name, (f"{_kind(q)}'s scale has the input's rank ({scale}) but no block_size attribute; set block_size "
                       "(ONNX opset 21) to the block length along the blocked axis.")
        return
    for d, (s, x) in enumerate(zip(scale, data)):
        want = x if d != axis else (None if x is None else -(-x // q.block_size))
        if want is not None and s != want:
            yield q.name, (f"{_kind(q)}'s blocked scale has shape {scale}, but input shape {data} with block_size "
                           f"{q.block_size} on axis {axis} needs {want} along axis {d}; fix the scale's shape.")
            return


def _scale_dtype(view: GraphView, target: str) -> Iterator[Hit]:
    for q in view.qdq_nodes():
        s_type = view.elem_type(q.scale)
        if s_type is None:
            continue
        if view.opset is not None and view.opset < 19:
            if s_type != TensorProto.FLOAT:
                yield q.name, (f"{_kind(q)}'s scale is {dtype_name(s_type)}, but before opset 19 ONNX takes float32 "
                               "scales only; export at --opset 19 or newer for float16 scales, or store float32 scales.")
            continue
        if q.is_quantize:
            x_type = view.elem_type(q.data)
            if x_type is not None and x_type != s_type:
                yield q.name, (f"QuantizeLinear quantizes a {dtype_name(x_type)} tensor with a {dtype_name(s_type)} "
                               "scale, but ONNX (opset 19+) needs the scale in the input's type; store the scale as "
                               f"{dtype_name(x_type)}.")
            continue
        source = view.producer.get(q.data)
        if source is not None and source.op_type == "QuantizeLinear" and len(source.input) > 1:
            q_type = view.elem_type(source.input[1])
            if q_type is not None and q_type != s_type:
                yield q.name, (f"DequantizeLinear returns {dtype_name(s_type)} (its scale's type) but its "
                               f"QuantizeLinear took {dtype_name(q_type)}; give the pair scales of one type.")
                continue
        for consumer, k in view.consumers.get(q.node.output[0], []):
            if consumer.op_type in WEIGHTED_OPS and k == 1:
                act = view.elem_type(consumer.input[0])
                if act is not None and act != s_type:
                    yield q.name, (f"DequantizeLinear returns a {dtype_name(s_type)} weight (its scale's type) to "
                                   f"{consumer.op_type} {view.name(consumer)!r}, whose input is {dtype_name(act)}; "
                                   f"store the weight scale as {dtype_name(act)}.")
                    break


def _weight_axis(view: GraphView, target: str) -> Iterator[Hit]:
    for q in view.qdq_nodes():
        if q.is_quantize or not view.is_constant(q.data):
            continue
        scale, data = view.shape(q.scale), view.shape(q.data)
        if scale is None or data is None or len(scale) != 1 or math.prod(scale) <= 1:
            continue  # per-tensor (or blocked: the INT4 rules)
        axis = _normal_axis(q.axis, len(data))
        for consumer, k in view.consumers.get(q.node.output[0], []):
            want = expected_weight_axis(consumer, len(data), target) if k == 1 else None
            if want is not None and axis != want:
                runtime = "TensorRT" if target == "tensorrt" else "ONNX Runtime"
                yield q.name, (f"the per-channel weight of {consumer.op_type} {view.name(consumer)!r} is quantized on "
                               f"axis {q.axis}, but {runtime} needs axis {want} for a {consumer.op_type} weight; "
                               f"re-export with axis={want}.")
                break


def _activation_per_channel(view: GraphView, target: str) -> Iterator[Hit]:
    runtime = "TensorRT" if target == "tensorrt" else "ONNX Runtime's integer kernels"
    for q in view.qdq_nodes():
        if not q.is_quantize or view.is_constant(q.data):
            continue
        scale = view.shape(q.scale)
        if scale is not None and math.prod(scale) > 1:
            yield q.name, (f"QuantizeLinear quantizes the activation {q.data!r} with {math.prod(scale)} scales, but "
                           f"activations are quantized per tensor only in {runtime}; use one scalar scale.")


RULES: tuple[Rule, ...] = (
    Rule("trt-uint8-qdq", "uint8 (or default-uint8) Q/DQ where TensorRT is signed int8",
         ("tensorrt",), "error", ref.ONNX_TRT_OPERATORS, _trt_uint8),
    Rule("qdq-scale-not-constant", "scales or zero-points computed at run time",
         ("tensorrt", "onnxruntime"), "error", ref.TRT_QUANTIZE_OP, _scale_constant,
         (("onnxruntime", ref.ORT_QUANTIZATION),)),
    Rule("qdq-zero-point-nonzero", "asymmetric quantization (non-zero zero-points)",
         ("tensorrt",), "error", ref.TRT_QUANTIZE_OP, _zero_point),
    Rule("qdq-scale-not-positive", "scales that are zero, negative, inf or nan",
         ("tensorrt", "onnxruntime"), "error", ref.TRT_DEQUANTIZE_OP, _scale_positive,
         (("onnxruntime", ref.ORT_QUANTIZATION),)),
    Rule("qdq-scale-shape", "scale / zero-point shapes that fit neither per-tensor, per-channel nor blocked",
         ("tensorrt", "onnxruntime"), "error", ref.ONNX_DEQUANTIZE_LINEAR, _scale_shape),
    Rule("qdq-scale-dtype", "scale dtypes that differ from the tensor they quantize",
         ("tensorrt", "onnxruntime"), "error", ref.ONNX_QUANTIZE_LINEAR, _scale_dtype),
    Rule("qdq-weight-axis", "per-channel weight scales on the wrong axis for the op and target",
         ("tensorrt", "onnxruntime"), "error", ref.ORT_QDQ_CONV_AXES, _weight_axis,
         (("tensorrt", ref.TRT_QUANTIZED_TYPES),)),
    Rule("qdq-activation-per-channel", "activations quantized per channel",
         ("tensorrt", "onnxruntime"), "error", ref.TRT_QUANTIZED_TYPES, _activation_per_channel,
         (("onnxruntime", ref.ORT_QUANTIZATION),)),
)
