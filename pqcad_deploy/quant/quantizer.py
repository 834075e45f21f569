"""Stateful quantizers: modules that hold a scale and its bit-width, and nothing else.

The maths lives in :mod:`pqcad_deploy.quant.primitives` (and :mod:`pqcad_deploy.quant.adaround` for
learned rounding). A quantizer refuses a scale of the wrong shape instead of silently broadcasting it,
since a wrong-shaped scale exports to a wrong graph.
"""

from __future__ import annotations

import torch
from torch import nn

from pqcad_deploy.quant import adaround as A
from pqcad_deploy.quant import primitives as P

__all__ = ["WeightQuantizer", "ActivationQuantizer"]


class WeightQuantizer(nn.Module):
    """Per-output-channel symmetric weight quantizer with a learnable scale.

    By default it rounds to nearest. :meth:`enable_adaround` switches it to AdaRound soft rounding:
    it then holds one learnable logit per weight (`round_v`) and rounds as floor(w / s) + h(V) until
    :meth:`harden_` writes the hardened codes back into the latent weight (latent = codes * scale,
    which round-to-nearest maps back to exactly those codes) and drops the logits.

    Args:
        out_channels: size of the weight's dim 0.
        bits: 8 or 4.
    """

    round_v: nn.Parameter | None

    def __init__(self, out_channels: int, bits: int) -> None:
        super().__init__()
        P.weight_qmax(bits)  # validates bits
        self.bits = bits
        self.scale = nn.Parameter(torch.ones(out_channels, dtype=torch.float32), requires_grad=False)
        self.register_parameter("round_v", None)  # AdaRound logits; absent from the state dict when off

    def set_scale(self, scale: torch.Tensor) -> None:
        """Replace the scale; the shape must match exactly and every value must be positive."""
        if scale.shape != self.scale.shape:
            raise ValueError(f"weight scale shape {tuple(scale.shape)} != {tuple(self.scale.shape)}")
        if not bool((scale > 0).all()):
            raise ValueError("weight scales must be positive")
        with torch.no_grad():
            self.scale.copy_(scale.to(self.scale.dtype))

    def set_bits(self, bits: int) -> None:
        """Change the bit-width (a bit ladder); the caller re-initialises the scale for the new grid.

        Refused while soft rounding is on: the logits belong to the old grid.
        """
        P.weight_qmax(bits)  # validates bits
        if self.round_v is not None:
            raise RuntimeError("harden or disable AdaRound before changing the weight bits")
        self.bits = bits

    # ------------------------------------------------------------------ AdaRound soft rounding
    @property
    def adaround_enabled(self) -> bool:
        return self.round_v is not None

    def enable_adaround(self, weight: torch.Tensor) -> None:
        """Start soft rounding of `weight` at the current scale: h(V) = frac(w / s) initially."""
        if weight.shape[0] != self.scale.numel():
            raise ValueError(f"weight has {weight.shape[0]} output channels, quantizer {self.scale.numel()}")
        v = A.init_rounding_logits(weight, self.scale).to(self.scale.device)
        self.round_v = nn.Parameter(v, requires_grad=True)

    def disable_adaround(self) -> None:
        """Drop the logits and go back to round-to-nearest (without writing anything back)."""
        self.round_v = None

    def rounding_regularizer(self, beta: float, reduction: str = "sum") -> torch.Tensor:
        """AdaRound's regulariser of the current logits (0 when they are all hard)."""
        if self.round_v is None:
            raise RuntimeError("AdaRound is not enabled on this quantizer")
        return A.rounding_regularizer(self.round_v, beta, reduction)

    @torch.no_grad()
    def harden(self, weight: torch.Tensor) -> torch.Tensor:
        """The hardened integer codes (int8) of `weight`: floor(w / s) + [h(V) >= 0.5], clamped."""
        if self.round_v is None:
            raise RuntimeError("AdaRound is not enabled on this quantizer")
        return A.hard_rounding_codes(weight, self.scale, self.round_v, self.bits)

    @torch.no_grad()
    def harden_(self, weight: nn.Parameter) -> torch.Tensor:
        """Harden, write latent = codes * scale into `weight` in place, drop the logits; return codes.

        Afterwards :meth:`codes` (round to nearest) returns exactly the hardened codes, which is what
        the artifact stores.
        """
        codes = self.harden(weight)
        weight.copy_(P.dequantize_weight(codes, self.scale.detach()).to(weight.dtype))
        self.round_v = None
        return codes

    # ------------------------------------------------------------------ quantization
    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """The int8-container integer codes of `weight` on this quantizer's grid.

        With soft rounding on, the codes it would harden to.
        """
        if self.round_v is not None:
            return self.harden(weight)
        return P.quantize_weight_codes(weight.detach(), self.scale.detach(), self.bits)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.round_v is not None:
            return A.soft_fake_quantize_weight(weight, self.scale, self.round_v, self.bits)
        return P.fake_quantize_weight(weight, self.scale, self.bits)

    def extra_repr(self) -> str:
        extra = ", adaround" if self.round_v is not None else ""
        return f"bits={self.bits}, channels={self.scale.numel()}{extra}"


class ActivationQuantizer(nn.Module):
    """Per-tensor symmetric activation quantizer with a learnable scale.

    While `observing` is set, forward records the running max |x| (for min-max calibration) and
    passes x through unchanged; while `enabled` is unset, forward is the identity.

    ``bits=None`` makes a layer whose input stays in floating point for good (the first and last
    convolutions by default, see ``pqcad_deploy.layer_precision``): forward is always the identity,
    nothing is observed, and calibration and export skip it (:attr:`quantizes` is False).
    """

    def __init__(self, bits: int | None) -> None:
        super().__init__()
        if bits is not None:
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

    @property
    def quantizes(self) -> bool:
        """False for a float input (``bits=None``): calibration, learning and export leave it alone."""
        return self.bits is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits is None:
            return x
        if self.observing:
            with torch.no_grad():
                amax = x.detach().abs().max().to(torch.float32)
                self.observed_amax.copy_(torch.maximum(self.observed_amax, amax))
            return x
        if not self.enabled:
            return x
        return P.fake_quantize_activation(x, self.scale, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, enabled={self.enabled}" if self.bits is not None else "float input"
