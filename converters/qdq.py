"""Export-time layers that make the TorchScript exporter emit exactly our Q/DQ graph.

Each piece is an autograd Function whose `forward` computes what the fake-quant model computes and
whose `symbolic` emits the ONNX nodes: QuantizeLinear -> DequantizeLinear on an activation, and an
integer initializer -> DequantizeLinear for a weight. The weight codes and the weight and activation
scales are buffers read from the artifact's tensors as they are stored (`CompressedArtifact.layer_tensors`):
nothing is re-quantized or re-calibrated here, and the quantizers' internals are never read; the student
layer gives only its geometry (stride, padding, ...), its bias and its activation bits.

Placement (docs/CONTRACTS.md 2): both inputs of every quantized Conv and
MatMul are Q/DQ'd, outputs stay float, each layer has its own activation Q/DQ pair. A Linear is
emitted as MatMul with a pre-transposed [in, out] weight, quantized per channel on axis 1, so no
Transpose sits between the DequantizeLinear and the MatMul (TensorRT and ONNX Runtime both want
DQ -> MatMul directly).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pqcad_deploy.artifact import LayerTensors
from pqcad_deploy.quant import primitives as P
from pqcad_deploy.quant.layers import QuantConv2d, QuantLinear

__all__ = ["ExportConv2d", "ExportLinear", "to_export_layer"]


class _ActivationQDQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, bits: int):  # noqa: D102
        return P.quantize_activation_codes(x, scale, bits) * scale

    @staticmethod
    def symbolic(g, x, scale, bits: int):  # noqa: D102
        # int8 zero-point here; a 4-bit activation's zero-point is retyped to INT4 after export
        # (torch has no int4 dtype) by export_onnx._tidy_graph.
        zero_point = g.op("Constant", value_t=torch.tensor(0, dtype=torch.int8))
        q = g.op("QuantizeLinear", x, scale, zero_point)
        return g.op("DequantizeLinear", q, scale, zero_point)


class _WeightDQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, codes, scale, zero_point, axis: int):  # noqa: D102
        shape = [1] * codes.dim()
        shape[axis] = -1
        return codes.to(torch.float32) * scale.reshape(shape)

    @staticmethod
    def symbolic(g, codes, scale, zero_point, axis: int):  # noqa: D102
        return g.op("DequantizeLinear", codes, scale, zero_point, axis_i=axis)


class ExportConv2d(nn.Module):
    """A QuantConv2d as Q/DQ(input) + DQ(int8 codes, axis 0) -> Conv (no input Q/DQ for a float input)."""

    def __init__(self, layer: QuantConv2d, tensors: LayerTensors) -> None:
        super().__init__()
        self.stride, self.padding = layer.stride, layer.padding
        self.dilation, self.groups = layer.dilation, layer.groups
        self.act_bits = layer.act_bits
        self.register_buffer("weight_codes", tensors.weight_codes.clone())
        self.register_buffer("weight_scale", tensors.weight_scale.float().clone())
        self.register_buffer("weight_zero_point", torch.zeros(layer.out_channels, dtype=torch.int8))
        self.register_buffer("act_scale", tensors.act_scale.float().clone())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits is not None:  # None: a float input, no Q/DQ
            x = _ActivationQDQ.apply(x, self.act_scale, self.act_bits)
        w = _WeightDQ.apply(self.weight_codes, self.weight_scale, self.weight_zero_point, 0)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ExportLinear(nn.Module):
    """A QuantLinear as Q/DQ(input) + DQ(int8 codes^T, axis 1) -> MatMul (+ bias Add)."""

    def __init__(self, layer: QuantLinear, tensors: LayerTensors) -> None:
        super().__init__()
        self.act_bits = layer.act_bits
        self.register_buffer("weight_codes", tensors.weight_codes.t().contiguous().clone())
        self.register_buffer("weight_scale", tensors.weight_scale.float().clone())
        self.register_buffer("weight_zero_point", torch.zeros(layer.out_features, dtype=torch.int8))
        self.register_buffer("act_scale", tensors.act_scale.float().clone())
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits is not None:  # None: a float input, no Q/DQ
            x = _ActivationQDQ.apply(x, self.act_scale, self.act_bits)
        w = _WeightDQ.apply(self.weight_codes, self.weight_scale, self.weight_zero_point, 1)
        y = torch.matmul(x, w)
        return y if self.bias is None else y + self.bias


def to_export_layer(layer: nn.Module, tensors: LayerTensors) -> nn.Module:
    """The export twin of a quantized layer, carrying the artifact's `tensors` for it."""
    if isinstance(layer, QuantConv2d):
        return ExportConv2d(layer, tensors)
    if isinstance(layer, QuantLinear):
        return ExportLinear(layer, tensors)
    raise TypeError(f"{type(layer).__name__} has no export twin")
