"""Stateful quantizers: modules that hold a scale and its bit-width, and nothing else.

The maths lives in :mod:`pqcad_deploy.quant.primitives`. A quantizer refuses a scale of the wrong
shape instead of silently broadcasting it, since a wrong-shaped scale exports to a wrong graph.
"""

from __future__ import annotations

import torch
from torch import nn

from pqcad_deploy.quant import primitives as P

__all__ = ["WeightQuantizer", "ActivationQuantizer"]


class WeightQuantizer(nn.Module):
    """Per-output-channel symmetric weight quantizer with a learnable scale.

    Args:
        out_channels: size of the weight's dim 0.
        bits: 8 or 4.
    """

    def __init__(self, out_channels: int, bits: int) -> None:
        super().__init__()
        P.weight_qmax(bits)  # validates bits
        self.bits = bits
        self.scale = nn.Parameter(torch.ones(out_channels, dtype=torch.float32), requires_grad=False)

    def set_scale(self, scale: torch.Tensor) -> None:
        """Replace the scale; the shape must match exactly and every value must be positive."""
        if scale.shape != self.scale.shape:
            raise ValueError(f"weight scale shape {tuple(scale.shape)} != {tuple(self.scale.shape)}")
        if not bool((scale > 0).all()):
            raise ValueError("weight scales must be positive")
        with torch.no_grad():
            self.scale.copy_(scale.to(self.scale.dtype))

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """The int8-container integer codes of `weight` on this quantizer's grid."""
        return P.quantize_weight_codes(weight.detach(), self.scale.detach(), self.bits)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return P.fake_quantize_weight(weight, self.scale, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, channels={self.scale.numel()}"


class ActivationQuantizer(nn.Module):
    """Per-tensor symmetric activation quantizer with a learnable scale.

    While `observing` is set, forward records the running max |x| (for min-max calibration) and
    passes x through unchanged; while `enabled` is unset, forward is the identity.
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        P.act_qrange(bits)  # validates bits
        self.bits = bits
        self.scale = nn.Parameter(torch.tensor(1.0, dtype=torch.float32), requires_grad=False)
        self.register_buffer("observed_amax", torch.tensor(0.0, dtype=torch.float32))
        self.observing = False
        self.enabled = True

    def set_scale(self, scale: torch.Tensor | float) -> None:
        """Replace the scalar scale; it must be a positive scalar."""
        scale_t = torch.as_tensor(scale, dtype=torch.float32)
        if scale_t.dim() != 0:
            raise ValueError(f"activation scale must be a scalar, got shape {tuple(scale_t.shape)}")
        if not bool(scale_t > 0):
            raise ValueError("activation scale must be positive")
        with torch.no_grad():
            self.scale.copy_(scale_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            with torch.no_grad():
                amax = x.detach().abs().max().to(torch.float32)
                self.observed_amax.copy_(torch.maximum(self.observed_amax, amax))
            return x
        if not self.enabled:
            return x
        return P.fake_quantize_activation(x, self.scale, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, enabled={self.enabled}"
