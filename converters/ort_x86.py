"""The `ort-x86` export target: the same codes and scales, laid out for ONNX Runtime's x86 CPU kernels.

ONNX Runtime's CPU provider turns Q/DQ around Conv/MatMul into integer kernels only in shapes it
knows (onnxruntime/core/optimizer/qdq_transformer/selectors_actions; measured in
docs/measurements/issue6_ort_integer_kernels.md):

- Conv -> QLinearConv needs a QuantizeLinear on the Conv *output*. Our Conv outputs stay float (they
  feed Add / GroupNorm, which the fake-quant model does not quantize), so the default graph keeps
  every Conv in float, with a DequantizeLinear of its input and of its weight on every run, whether
  the activations are int8 or uint8. Quantizing the output would add a rounding the PyTorch model
  does not have, so this target writes each quantized Conv with an exact integer kernel instead:
  ``QuantizeLinear(int8, as before) -> ConvInteger(int8 codes, uint8 weight codes + 128, zero-points
  0 and 128) -> DequantizeLinear(int32, scale act_scale * weight_scale[channel], axis 1) -> Add(bias)``.
  ConvInteger accumulates sum(x_code * (w_u8 - 128)) = sum(x_code * w_code) in int32: the dot product
  of the default graph's codes; the int32 DequantizeLinear (one op instead of Cast + Mul, ~2 ms less
  per UNet call) scales it to float, as ONNX's quantized-bias convention does. ONNX Runtime passes
  the weight as its GEMM's unsigned left operand and the activation as the signed right one, so this
  layout is MLAS's U8S8 kernel (measured on an [8, 128, 16, 16] 3x3 conv, 1 thread: 1.4 ms, against
  2.4 ms with uint8 activations (U8U8), 15.6 ms with int8 weights, 3.5 ms for the float Conv).
- MatMul -> MatMulIntegerToFloat (DQ -> MatMul with no Q after it) is fused by ONNX Runtime from the
  QDQ form, so MatMul layers keep their Q/DQ; their activations become uint8 with zero-point 128,
  the U8S8 layout of that kernel (activation unsigned, weight signed). ONNX Runtime rewrites int8
  activation Q/DQ pairs into this form itself on x86 (QDQS8ToU8Transformer); writing it directly
  keeps the graph independent of that rewrite.

uint8 activations: QuantizeLinear computes saturate(round(x / s) + zero_point), so with zero-point
128 the uint8 code is the int8 code + 128 for every x ([-128, 127] -> [0, 255], the same grid) and
DequantizeLinear gives back the same float. converters.parity compares codes after subtracting the
zero-point. Only 8-bit activations are supported (ConvInteger has no 4-bit input).

Exactness caveat: on x86 CPUs without VNNI (AVX2 / AVX512 core only), MLAS's U8S8 kernels use
VPMADDUBSW, whose int16 sums of two products saturate; there the integer results can differ from
the fake-quant model. With AVX512-VNNI or AVX-VNNI (VPDPBUSD, int32 sums) they are exact. Run the
parity check on the deployment CPU (`export --parity`, or converters.parity with
optimization_level="extended").
"""

from __future__ import annotations

import numpy as np

from pqcad_deploy.converters.graph_index import index_graph, replace_nodes
from pqcad_deploy.converters.naming import qdq_names
from pqcad_deploy.errors import ExportError
from pqcad_deploy.quant.primitives import act_qrange

__all__ = ["UINT8_ZERO_POINT", "check_ort_x86", "to_ort_x86"]

# The int8 grid [-128, 127] shifted into uint8 [0, 255]: the same grid, so no code is lost.
UINT8_ZERO_POINT = -act_qrange(8)[0]
assert act_qrange(8) == (-UINT8_ZERO_POINT, 255 - UINT8_ZERO_POINT)


def check_ort_x86(layer_act_bits: dict[str, int | None]) -> None:
    """Refuse what the target cannot express (4-bit activations)."""
    four = sorted(name for name, bits in layer_act_bits.items() if bits == 4)
    if four:
        raise ExportError(f"--target ort-x86 needs 8-bit activations (ConvInteger has no 4-bit input); "
                          f"{len(four)} layers have 4-bit activations (e.g. {four[0]}). Use the default target.")


def to_ort_x86(model, layer_act_bits: dict[str, int | None]) -> dict[str, int]:
    """Rewrite a tidied default-target graph in place; returns {"conv_integer": n, "uint8_matmul": m}.

    layer_act_bits: {layer: activation bits or None for a float input}, every quantized layer.
    """
    from onnx import helper, numpy_helper

    check_ort_x86(layer_act_bits)
    graph = model.graph
    lookup = index_graph(graph)
    inits, by_name, consumers = lookup.inits, lookup.by_name, lookup.consumers

    def set_init(name: str, array: np.ndarray) -> None:
        tensor = numpy_helper.from_array(array, name)
        if name in inits:
            inits[name].CopyFrom(tensor)
        else:
            graph.initializer.append(tensor)
            inits[name] = graph.initializer[-1]

    replaced: dict[int, list] = {}  # index of a Conv node -> the nodes that replace it
    drop: set[int] = set()
    index = {id(n): i for i, n in enumerate(graph.node)}
    dead_inits: set[str] = set()
    counts = {"conv_integer": 0, "uint8_matmul": 0}
    for layer, bits in layer_act_bits.items():
        if bits is None:
            continue  # float input (first/last conv with w8-fp-input): nothing to quantize
        names = qdq_names(layer)
        target = lookup.quantized_op(layer, names)
        if target.op_type == "MatMul":
            set_init(names.act_zero_point, np.array(UINT8_ZERO_POINT, dtype=np.uint8))
            counts["uint8_matmul"] += 1
            continue
        wdq = by_name[names.weight_dequantize]
        q, dq = by_name[names.input_quantize], by_name[names.input_dequantize]
        codes = numpy_helper.to_array(inits[names.weight_codes]).astype(np.int16)
        weight_scale = numpy_helper.to_array(inits[names.weight_scale]).astype(np.float64)
        act_scale = float(numpy_helper.to_array(inits[names.act_scale]))
        set_init(names.weight_codes, (codes + UINT8_ZERO_POINT).astype(np.uint8))
        set_init(names.weight_zero_point, np.array(UINT8_ZERO_POINT, dtype=np.uint8))
        out_channels = codes.shape[0]
        set_init(names.output_scale, (act_scale * weight_scale).astype(np.float32))
        out = target.output[0]
        attrs = {a.name: helper.get_attribute_value(a) for a in target.attribute}
        new = [helper.make_node("ConvInteger", [q.output[0], names.weight_codes, names.act_zero_point,
                                                names.weight_zero_point], [f"{layer}/accumulator"],
                                name=names.conv_integer, **attrs)]
        has_bias = len(target.input) > 2 and target.input[2]
        scaled = f"{layer}/scaled" if has_bias else out
        new.append(helper.make_node("DequantizeLinear", [f"{layer}/accumulator", names.output_scale], [scaled],
                                    name=f"{layer}/rescale", axis=1))
        if has_bias:
            bias = target.input[2]
            if len(consumers[bias]) != 1:
                raise ExportError(f"{layer}: its bias {bias} is shared with other nodes")
            set_init(bias, numpy_helper.to_array(inits[bias]).reshape(1, out_channels, 1, 1))
            new.append(helper.make_node("Add", [scaled, bias], [out], name=f"{layer}/add_bias"))
        replaced[index[id(target)]] = new
        drop.update({index[id(dq)], index[id(wdq)]})
        if len(consumers[q.output[0]]) != 1:
            raise ExportError(f"{layer}: its QuantizeLinear has other consumers")
        dead_inits.add(names.weight_scale)
        counts["conv_integer"] += 1
    nodes = []
    for i, node in enumerate(graph.node):
        if i in drop:
            continue
        nodes.extend(replaced.get(i, [node]))
    replace_nodes(graph, nodes, dead_inits)
    return counts
