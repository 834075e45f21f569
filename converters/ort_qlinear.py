"""The `ort-qlinear` export target: QLinearConv on ONNX Runtime's CPU, for one extra rounding per Conv.

ONNX Runtime fuses ``DQ(x), DQ(w), DQ(bias int32) -> Conv -> Q(out)`` into QLinearConv
(onnxruntime/core/optimizer/qdq_transformer/selectors_actions), whose MLAS kernel is faster than the
ConvInteger + int32 rescale + bias Add that `ort-x86` writes (embedded `--preset fast` W8A8 model,
batch 8, one thread, EXTENDED, ONNX Runtime 1.31.1, median of 15: this target 18.1 ms, ONNX
Runtime's own quantize_static S8S8 graph 24.5 ms, `ort-x86` 30.1 ms, the default target 48.7 ms,
FP32 47.1 ms: 32 of the 36 Convs become QLinearConv). The fusion needs a QuantizeLinear on the Conv
output, which the fake-quant model does not have (its Conv outputs feed Add / GroupNorm in float),
so this target *adds* that rounding: it is not the student's computation, but the student's plus one
int8 rounding of each such Conv's output. For each Conv with 8-bit activations whose output feeds
one node, the tidied default-target graph is rewritten in place:

- input QuantizeLinear -> DequantizeLinear (int8, symmetric) and weight DequantizeLinear (int8,
  per-channel axis 0): kept as the default target writes them (the student's codes and scales);
- bias: the float initializer becomes int32 codes round(bias / (act_scale * weight_scale[c])) with a
  DequantizeLinear of that per-channel scale (axis 0), the layout of ONNX Runtime's quantizer (the
  fused kernel adds the bias to the int32 accumulator; the rounding moves the bias by at most half a
  step of act_scale * weight_scale, far below the output step);
- output: QuantizeLinear -> DequantizeLinear (int8, zero-point 0, per tensor) with scale amax / 127,
  amax calibrated at export (calibrate_output_ranges).

Output scales are the one thing this target calibrates (the student's scales are written as they
are). They come from the student's own DDIM trajectories: CALIBRATION_IMAGES seeded noises
(CALIBRATION_SEED, not a seed sampling uses by default), the student's timesteps, the engines'
numpy DDIM step, forward hooks on the quantized Convs. The maximum |value| over the trajectories is
used (OUTPUT_STATISTICS also offers "p99.99", the largest per-call 99.99th percentile). Measured on
the embedded `--preset fast` W8A8 artifact (32 images, seed 0, 50 student steps, PSNR as
pqcad_deploy.eval.psnr): against FP32 at 100 steps, max 29.44 dB, p99.99 28.90 dB (default target
28.33 dB, ort-x86 28.51 dB); against the default target's images, max 39.74 dB, p99.99 41.37 dB. The
max is kept because it is closer to FP32, the quality that matters, and clips nothing (the clipped
outputs feed residual sums); p99.99's finer step stays closer to the student's own images. The
calibration (16 images x 50 steps, one thread) adds about 10-15 s to export there.

Convs whose output feeds several nodes (the downsamplers) stay as in the default graph, since ONNX
Runtime does not fuse them (to_ort_qlinear). MatMul layers keep the default graph's Q/DQ (ONNX
Runtime fuses DQ -> MatMul into MatMulIntegerToFloat already); layers with a float input (first/last
conv with w8-fp-input) stay float; 4-bit activations are refused (QLinearConv has no 4-bit input).
Parity (converters.parity) compares against the student with the same output rounding applied
through hooks (rounded_conv_outputs).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Literal, get_args

import numpy as np

from pqcad_deploy.converters.graph_index import index_graph, replace_nodes
from pqcad_deploy.converters.naming import qdq_names
from pqcad_deploy.errors import ExportError
from pqcad_deploy.quant.primitives import act_qrange, quantize_activation_codes

__all__ = ["CALIBRATION_IMAGES", "CALIBRATION_SEED", "OUTPUT_STATISTICS", "calibrate_output_ranges",
           "check_ort_qlinear", "check_output_statistic", "output_rounding", "output_scales", "quantize_bias",
           "rounded_conv_outputs", "to_ort_qlinear"]

CALIBRATION_IMAGES = 16
CALIBRATION_SEED = 1234
OutputStatistic = Literal["max", "p99.99"]
OUTPUT_STATISTICS: tuple[str, ...] = get_args(OutputStatistic)
_PERCENTILE = 0.9999
_OUTPUT_BITS = 8
_INT32 = np.iinfo(np.int32)


def check_ort_qlinear(layer_act_bits: dict[str, int | None]) -> None:
    """Refuse what the target cannot express (4-bit activations)."""
    four = sorted(name for name, bits in layer_act_bits.items() if bits == 4)
    if four:
        raise ExportError(f"--target ort-qlinear needs 8-bit activations (QLinearConv has no 4-bit input); "
                          f"{len(four)} layers have 4-bit activations (e.g. {four[0]}). Use the default target.")


def check_output_statistic(statistic: str) -> None:
    if statistic not in OUTPUT_STATISTICS:
        raise ExportError(f"output statistic must be one of {', '.join(OUTPUT_STATISTICS)}; got {statistic!r}.")


def _rounded_convs(student) -> dict:
    """The quantized Conv modules whose output this target rounds (8-bit input)."""
    from pqcad_deploy.quant.layers import QuantConv2d
    from pqcad_deploy.quant.replace import quant_layers

    return {name: layer for name, layer in quant_layers(student).items()
            if isinstance(layer, QuantConv2d) and layer.act_bits == _OUTPUT_BITS}


def calibrate_output_ranges(student, manifest, statistic: str = "max", n: int = CALIBRATION_IMAGES,
                            seed: int = CALIBRATION_SEED, conditioning=None) -> dict[str, float]:
    """Run the fake-quant student over its own DDIM trajectories; {layer: range of |output|} per rounded Conv.

    statistic: "max" (the largest |value|) or "p99.99" (the largest per-call 99.99th percentile).

    Deterministic: numpy noise from `seed` (engines.sampler.initial_noise), the manifest's student
    timesteps, the engines' DDIM step (eta 0). The student runs in float on the CPU, unchanged. A
    conditional model's trajectories are the ones sampling runs: image i of class ``i % classes``, guided
    at the artifact's scale, so the ranges cover both halves of a guided call.
    """
    import torch

    from pqcad_deploy.conditioning import guided_eps
    from pqcad_deploy.converters.conditions import artifact_conditioning, torch_conditions
    from pqcad_deploy.engines.ddim import DDIMSampler
    from pqcad_deploy.engines.sampler import initial_noise

    check_output_statistic(statistic)
    convs = _rounded_convs(student)
    ranges = dict.fromkeys(convs, 0.0)

    def hook(module, inputs, output, name):
        flat = output.detach().abs().flatten()
        if statistic == "max":
            value = float(flat.max())
        else:
            value = float(flat.kthvalue(max(1, math.ceil(_PERCENTILE * flat.numel()))).values)
        ranges[name] = max(ranges[name], value)

    hooks = [layer.register_forward_hook(lambda m, i, o, name=name: hook(m, i, o, name))
             for name, layer in convs.items()]
    sampler = DDIMSampler({**manifest.scheduler_config, "prediction_type": manifest.prediction_type})
    timesteps = list(manifest.student_timesteps)
    x = initial_noise(n, tuple(manifest.image_shape), seed)
    if conditioning is None:  # the artifact's (export passes the one it already has: a latent one loads parts)
        conditioning = artifact_conditioning(manifest)
    cond = torch_conditions(conditioning, n)  # {} for an unconditional model
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            for t, prev_t in zip(timesteps, [*timesteps[1:], -1]):
                out = guided_eps(student, torch.from_numpy(x), torch.full((n,), float(t)), cond,
                                 conditioning).numpy()
                x = sampler.step(out, t, prev_t, x)
    finally:
        for h in hooks:
            h.remove()
        student.train(was_training)
    return ranges


def output_scales(ranges: dict[str, float]) -> dict[str, float]:
    """{layer: range / 127}: the int8 output scales (a zero range gets a tiny positive scale)."""
    qmax = act_qrange(_OUTPUT_BITS)[1]
    return {name: max(value, 1e-8) / qmax for name, value in ranges.items()}


def quantize_bias(bias: np.ndarray, act_scale: float, weight_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int32 codes, float32 scale [out]): bias ~= codes * scale, scale = act_scale * weight_scale.

    ONNX's quantized-bias convention (QLinearConv adds int32 bias codes to the int32 accumulator of
    x_code * w_code, whose scale is act_scale * weight_scale[channel]).
    """
    scale = (np.float64(act_scale) * weight_scale.astype(np.float64)).astype(np.float32)
    if not (scale > 0).all():
        raise ExportError("a Conv has a zero activation or weight scale; its bias cannot be quantized to int32")
    codes = np.round(bias.astype(np.float64) / scale.astype(np.float64))
    if codes.min() < _INT32.min or codes.max() > _INT32.max:
        raise ExportError("a Conv bias does not fit int32 at scale act_scale * weight_scale")
    return codes.astype(np.int32), scale


def to_ort_qlinear(model, layer_act_bits: dict[str, int | None], scales: dict[str, float]) -> dict[str, int]:
    """Rewrite a tidied default-target graph in place; returns {"qlinear_conv": n, "fan_out_conv": m}.

    A Conv whose output feeds more than one node (the downsamplers: the next block and the skip
    connection) is left as the default graph writes it: ONNX Runtime 1.31 does not fuse a Conv whose
    rounded output fans out (measured on a one-Conv graph: two consumers of the output
    DequantizeLinear, or two DequantizeLinear of the output codes, keep the float Conv; its own
    quantize_static graph leaves the same Convs float), so the rounding would cost accuracy for nothing.

    layer_act_bits: {layer: activation bits or None for a float input}, every quantized layer.
    scales: {layer: output scale} for every Conv with 8-bit activations (output_scales).
    """
    from onnx import helper, numpy_helper

    check_ort_qlinear(layer_act_bits)
    graph = model.graph
    lookup = index_graph(graph)
    inits, consumers = lookup.inits, lookup.consumers

    def add_init(name: str, array: np.ndarray) -> None:
        if name in inits:
            raise ExportError(f"{name}: initializer already exists")
        graph.initializer.append(numpy_helper.from_array(array, name))
        inits[name] = graph.initializer[-1]

    before: dict[int, list] = {}  # id of a Conv node -> nodes to insert before it (bias DQ)
    after: dict[int, list] = {}  # id of a Conv node -> nodes to insert after it (output Q/DQ)
    dead_inits: set[str] = set()
    n_conv = 0
    n_fan_out = 0
    graph_outputs = {o.name for o in graph.output}
    for layer, bits in layer_act_bits.items():
        if bits is None:
            continue
        names = qdq_names(layer)
        conv = lookup.quantized_op(layer, names)
        if conv.op_type == "MatMul":
            continue  # ONNX Runtime fuses DQ -> MatMul into MatMulIntegerToFloat as it is
        if len(consumers.get(conv.output[0], [])) + (conv.output[0] in graph_outputs) != 1:
            n_fan_out += 1  # ONNX Runtime would not fuse it: keep it exact, as the default graph
            continue
        if layer not in scales:
            raise ExportError(f"{layer}: no calibrated output scale")
        weight_scale = numpy_helper.to_array(inits[names.weight_scale])
        act_scale = float(numpy_helper.to_array(inits[names.act_scale]))
        if len(conv.input) > 2 and conv.input[2]:
            bias = conv.input[2]
            if bias not in inits or len(consumers[bias]) != 1:
                raise ExportError(f"{layer}: its bias {bias} is not an initializer of its own")
            codes, scale = quantize_bias(numpy_helper.to_array(inits[bias]), act_scale, weight_scale)
            add_init(names.bias_codes, codes)
            add_init(names.bias_scale, scale)
            add_init(names.bias_zero_point, np.zeros_like(codes))
            dequantized = f"{layer}/bias"
            before[id(conv)] = [helper.make_node("DequantizeLinear", [names.bias_codes, names.bias_scale,
                                                                      names.bias_zero_point], [dequantized],
                                                 name=names.bias_dequantize, axis=0)]
            conv.input[2] = dequantized
            dead_inits.add(bias)
        out = conv.output[0]
        raw = f"{layer}/conv_output"
        conv.output[0] = raw
        add_init(names.output_act_scale, np.array(scales[layer], dtype=np.float32))
        add_init(names.output_zero_point, np.array(0, dtype=np.int8))
        codes_out = f"{layer}/output_codes"
        after[id(conv)] = [
            helper.make_node("QuantizeLinear", [raw, names.output_act_scale, names.output_zero_point], [codes_out],
                             name=names.output_quantize),
            helper.make_node("DequantizeLinear", [codes_out, names.output_act_scale, names.output_zero_point], [out],
                             name=names.output_dequantize),
        ]
        n_conv += 1
    nodes = []
    for node in graph.node:
        nodes.extend(before.get(id(node), []))
        nodes.append(node)
        nodes.extend(after.get(id(node), []))
    replace_nodes(graph, nodes, dead_inits)
    return {"qlinear_conv": n_conv, "fan_out_conv": n_fan_out}


def output_rounding(model) -> dict[str, tuple[float, np.ndarray | None]]:
    """{layer: (output scale, dequantized int32 bias or None)} of an ort-qlinear graph; {} for others."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or not node.name.endswith("/output_quantize"):
            continue
        names = qdq_names(node.name[: -len("/output_quantize")])
        bias = None
        if names.bias_codes in inits:
            bias = (numpy_helper.to_array(inits[names.bias_codes]).astype(np.float32)
                    * numpy_helper.to_array(inits[names.bias_scale]))
        found[names.layer] = (float(numpy_helper.to_array(inits[names.output_act_scale])), bias)
    return found


@contextlib.contextmanager
def rounded_conv_outputs(student, rounding: dict[str, tuple[float, np.ndarray | None]],
                         codes: dict[str, np.ndarray] | None = None) -> Iterator[None]:
    """Within the block, the student computes what an ort-qlinear graph computes.

    Each listed Conv's output gets the int32-rounded bias in place of its float bias, then the int8
    output rounding; `codes` (if given) receives each layer's output codes.
    """
    import torch

    modules = dict(student.named_modules())

    def hook(module, inputs, output, layer):
        scale, bias = rounding[layer]
        if bias is not None:
            output = output + (torch.from_numpy(bias) - module.bias.detach()).reshape(1, -1, 1, 1)
        c = quantize_activation_codes(output, scale, _OUTPUT_BITS)
        if codes is not None:
            codes[layer] = c.detach().numpy()
        return c * scale

    hooks = [modules[layer].register_forward_hook(lambda m, i, o, layer=layer: hook(m, i, o, layer))
             for layer in rounding]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
