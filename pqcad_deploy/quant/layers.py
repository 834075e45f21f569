"""Quantized Conv2d and Linear: thin subclasses that add a weight and an input quantizer.

The float `weight` parameter is the latent weight (the FP weight after min-max, the learned latent
weight during PQ/CAD, the dequantized codes after loading an artifact); the integer codes are always
`weight_quantizer.codes(weight)`, so every path produces its codes the same way.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pqcad_deploy.quant import primitives as P
from pqcad_deploy.quant.quantizer import ActivationQuantizer, WeightQuantizer

__all__ = ["QuantConv2d", "QuantLinear", "QuantLayer"]


class _QuantMixin:
    """Shared state of the quantized layers."""

    weight: nn.Parameter
    weight_quantizer: WeightQuantizer
    input_quantizer: ActivationQuantizer

    def _init_quantizers(self, weight_bits: int, act_bits: int | None) -> None:
        self.weight_quantizer = WeightQuantizer(self.weight.shape[0], weight_bits)
        self.input_quantizer = ActivationQuantizer(act_bits)

    @property
    def weight_bits(self) -> int:
        return self.weight_quantizer.bits

    @property
    def act_bits(self) -> int | None:
        """Input bits; None for a float input."""
        return self.input_quantizer.bits

    def weight_codes(self) -> torch.Tensor:
        """Integer codes (int8 container) of the current latent weight."""
        return self.weight_quantizer.codes(self.weight)

    def input_codes(self, x: torch.Tensor) -> torch.Tensor:
        """The integer codes (as floats) the graph's QuantizeLinear gives this layer's input `x`.

        Only for a quantized input (`act_bits` not None): a float input has no QuantizeLinear.
        """
        if self.act_bits is None:
            raise ValueError("this layer's input stays in floating point: it has no codes")
        return P.quantize_activation_codes(x.detach(), self.input_quantizer.scale.detach(), self.act_bits)

    def quantized_weight(self) -> torch.Tensor:
        """The dequantized weight the layer computes with."""
        return self.weight_quantizer(self.weight)


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """nn.Conv2d with per-output-channel weight and per-tensor input fake quantization."""

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_bits: int, act_bits: int | None) -> "QuantConv2d":
        q = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
            bias=conv.bias is not None, padding_mode=conv.padding_mode,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode {conv.padding_mode!r} is not supported; only 'zeros'")
        with torch.no_grad():
            q.weight.copy_(conv.weight)
            if conv.bias is not None:
                q.bias.copy_(conv.bias)
        q._init_quantizers(weight_bits, act_bits)
        return q.to(conv.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.input_quantizer(x), self.quantized_weight(), self.bias,
                        self.stride, self.padding, self.dilation, self.groups)


class QuantLinear(_QuantMixin, nn.Linear):
    """nn.Linear with per-output-channel weight and per-tensor input fake quantization."""

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_bits: int, act_bits: int | None) -> "QuantLinear":
        q = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            q.weight.copy_(linear.weight)
            if linear.bias is not None:
                q.bias.copy_(linear.bias)
        q._init_quantizers(weight_bits, act_bits)
        return q.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), self.quantized_weight(), self.bias)


QuantLayer = QuantConv2d | QuantLinear
