"""Quantization maths as pure functions: every input is explicit, nothing is stored.

Grids (see docs/CONTRACTS.md): symmetric, zero-point 0. Weights use the narrow range
[-(2^(b-1)-1), 2^(b-1)-1] so the grid is symmetric; activations use the full range that ONNX
``QuantizeLinear`` saturates to ([-128, 127] for int8, [-8, 7] for int4), so that the PyTorch
fake-quant model and the exported graph compute the same values. Rounding is half-to-even in both
``torch.round`` and ONNX.
"""

from __future__ import annotations

import torch

from pqcad_deploy.choices import ACT_BITS, LADDER_WEIGHT_BITS, check_choice

__all__ = [
    "weight_qmax",
    "act_qrange",
    "quantize_activation_codes",
    "round_ste",
    "per_channel_view",
    "quantize_weight_codes",
    "dequantize_weight",
    "fake_quantize_weight",
    "fake_quantize_activation",
    "minmax_weight_scale",
    "minmax_activation_scale",
    "percentile_activation_scale",
    "mse_activation_scale",
]

_MIN_SCALE = 1e-12


def weight_qmax(bits: int) -> int:
    """Largest weight code for `bits` (narrow symmetric range); 6 bits exist as a PQ ladder level."""
    check_choice("weight bits", bits, LADDER_WEIGHT_BITS)
    return 2 ** (bits - 1) - 1


def act_qrange(bits: int) -> tuple[int, int]:
    """(qmin, qmax) of an activation quantizer: the saturation range of ONNX QuantizeLinear."""
    check_choice("activation bits", bits, ACT_BITS)
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (half to even) with a straight-through gradient."""
    return (torch.round(x) - x).detach() + x


def per_channel_view(scale: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Reshape a [out] scale to broadcast over a weight whose dim 0 is the output channel."""
    return scale.reshape((-1,) + (1,) * (weight.dim() - 1))


def quantize_weight_codes(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (int8 container) of `weight` on the per-output-channel grid `scale`."""
    qmax = weight_qmax(bits)
    codes = torch.clamp(torch.round(weight / per_channel_view(scale, weight)), -qmax, qmax)
    return codes.to(torch.int8)


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float weight from integer codes and per-output-channel scales."""
    return codes.to(scale.dtype) * per_channel_view(scale, codes)


def fake_quantize_weight(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize a weight per output channel, differentiable (STE) in weight and scale."""
    qmax = weight_qmax(bits)
    s = per_channel_view(scale, weight)
    return torch.clamp(round_ste(weight / s), -qmax, qmax) * s


def quantize_activation_codes(x: torch.Tensor, scale: torch.Tensor | float, bits: int) -> torch.Tensor:
    """Integer codes (as floats, not differentiable) of an activation on the per-tensor grid `scale`:
    what a QuantizeLinear with zero-point 0 computes (round half to even, then saturate)."""
    qmin, qmax = act_qrange(bits)
    return torch.clamp(torch.round(x / scale), qmin, qmax)


def fake_quantize_activation(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize an activation with one per-tensor scale (STE, LSQ-style gradients)."""
    qmin, qmax = act_qrange(bits)
    return torch.clamp(round_ste(x / scale), qmin, qmax) * scale


def minmax_weight_scale(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel scale max|w| / qmax (a zero channel gets a tiny positive scale)."""
    amax = weight.detach().abs().flatten(1).amax(dim=1)
    return torch.clamp(amax / weight_qmax(bits), min=_MIN_SCALE).to(torch.float32)


def minmax_activation_scale(amax: torch.Tensor | float, bits: int) -> torch.Tensor:
    """Per-tensor scale that maps +-amax to the largest positive code (symmetric)."""
    _, qmax = act_qrange(bits)
    amax_t = torch.as_tensor(amax, dtype=torch.float32)
    return torch.clamp(amax_t / qmax, min=_MIN_SCALE)


def percentile_activation_scale(samples: torch.Tensor, bits: int, percentile: float = 99.99) -> torch.Tensor:
    """Per-tensor scale mapping the `percentile` of |x| (over `samples`) to the largest code."""
    _, qmax = act_qrange(bits)
    value = torch.quantile(samples.detach().abs().flatten().double(), percentile / 100.0).float()
    return torch.clamp(value / qmax, min=_MIN_SCALE)


def mse_activation_scale(samples: torch.Tensor, amax: float, bits: int, num_candidates: int = 100,
                         min_ratio: float = 0.05) -> torch.Tensor:
    """Per-tensor scale minimising the quantization MSE of `samples` over clipping ratios of `amax`.

    Candidates are r * amax / qmax for r evenly spread in [min_ratio, 1]; r = 1 is min-max, so the
    result is never worse than min-max on these samples.
    """
    x = samples.detach().flatten().float()
    qmax = act_qrange(bits)[1]
    best_scale, best_err = None, float("inf")
    for r in torch.linspace(1.0, min_ratio, num_candidates).tolist():
        s = max(r * float(amax) / qmax, _MIN_SCALE)
        err = float((quantize_activation_codes(x, s, bits) * s - x).pow(2).mean())
        if err < best_err:
            best_scale, best_err = s, err
    return torch.tensor(best_scale, dtype=torch.float32)
