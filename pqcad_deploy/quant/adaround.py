"""AdaRound learned weight rounding as pure functions (Nagel et al. 2020, as used by BRECQ).

Each weight w on the per-output-channel grid s is written as floor(w / s) + h(V), where V is one
learnable logit per weight and h is the rectified sigmoid

    h(V) = clip(sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1)          (ZETA = 1.1, GAMMA = -0.1)

which, unlike a plain sigmoid, reaches exactly 0 and 1. V is initialised so that h(V) equals the
fractional part of w / s (the soft weight then equals the float weight, inside the clamp range). A
regulariser sum(1 - |2h - 1|^beta), with beta annealed from large to small, pushes every h to 0 or
1; hardening rounds up where h >= 0.5. The codes are clamped to the narrow weight range [-qmax, qmax]
of docs/CONTRACTS.md, so a hardened result is an ordinary set of integer codes.

The functions take everything explicitly; :class:`~pqcad_deploy.quant.quantizer.WeightQuantizer`
holds V as state. Also here: an MSE search for the per-channel weight scale, the usual starting
point of a learned scale at low bits (min-max wastes the grid on outliers).
"""

from __future__ import annotations

import math

import torch

from pqcad_deploy.quant import primitives as P

__all__ = [
    "ZETA",
    "GAMMA",
    "rectified_sigmoid",
    "floor_ste",
    "init_rounding_logits",
    "soft_fake_quantize_weight",
    "hard_rounding_codes",
    "rounding_regularizer",
    "beta_schedule",
    "mse_weight_scale",
]

ZETA = 1.1
GAMMA = -0.1
# h(V) is clipped at 0 and 1; the initial logits are built from fractions kept a hair inside (0, 1)
# so that V stays finite and h(V) is within 1e-5 of the fraction.
_FRAC_EPS = 1e-6


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) = clip(sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1)."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def floor_ste(x: torch.Tensor) -> torch.Tensor:
    """floor(x) with a straight-through gradient (so a learned scale gets LSQ-style gradients)."""
    return (torch.floor(x) - x).detach() + x


def init_rounding_logits(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """V such that h(V) equals frac(w / s) = w / s - floor(w / s) (to within 1e-5).

    Inverts the rectified sigmoid: sigmoid(V) = (frac - GAMMA) / (ZETA - GAMMA).
    """
    x = weight.detach() / P.per_channel_view(scale.detach(), weight)
    frac = torch.clamp(x - torch.floor(x), _FRAC_EPS, 1.0 - _FRAC_EPS)
    p = (frac - GAMMA) / (ZETA - GAMMA)
    return torch.log(p / (1.0 - p)).to(torch.float32)


def soft_fake_quantize_weight(weight: torch.Tensor, scale: torch.Tensor, v: torch.Tensor,
                              bits: int) -> torch.Tensor:
    """(clamp(floor(w / s) + h(V), -qmax, qmax)) * s, differentiable in V and in s.

    The floor has a straight-through gradient, so d/ds gets the LSQ term h - frac(w / s).
    """
    if v.shape != weight.shape:
        raise ValueError(f"rounding logits shape {tuple(v.shape)} != weight shape {tuple(weight.shape)}")
    qmax = P.weight_qmax(bits)
    s = P.per_channel_view(scale, weight)
    return torch.clamp(floor_ste(weight / s) + rectified_sigmoid(v), -qmax, qmax) * s


@torch.no_grad()
def hard_rounding_codes(weight: torch.Tensor, scale: torch.Tensor, v: torch.Tensor,
                        bits: int) -> torch.Tensor:
    """The hardened codes clamp(floor(w / s) + [h(V) >= 0.5], -qmax, qmax) as int8."""
    if v.shape != weight.shape:
        raise ValueError(f"rounding logits shape {tuple(v.shape)} != weight shape {tuple(weight.shape)}")
    qmax = P.weight_qmax(bits)
    s = P.per_channel_view(scale.detach(), weight)
    up = (rectified_sigmoid(v.detach()) >= 0.5).to(weight.dtype)
    return torch.clamp(torch.floor(weight.detach() / s) + up, -qmax, qmax).to(torch.int8)


def rounding_regularizer(v: torch.Tensor, beta: float, reduction: str = "sum") -> torch.Tensor:
    """sum (or mean) of 1 - |2 h(V) - 1|^beta: 0 where h is 0 or 1, 1 where h is 0.5."""
    term = 1.0 - (2.0 * rectified_sigmoid(v) - 1.0).abs().pow(beta)
    if reduction == "sum":
        return term.sum()
    if reduction == "mean":
        return term.mean()
    raise ValueError(f"reduction must be 'sum' or 'mean'; got {reduction!r}")


def beta_schedule(it: int, iters: int, warmup: float, beta_start: float = 20.0,
                  beta_end: float = 2.0) -> tuple[float, bool]:
    """(beta, regulariser on?) at iteration `it` of `iters` (AdaRound's linear temperature decay).

    During the first `warmup` fraction the regulariser is off (the rounding moves freely to lower the
    reconstruction error); afterwards beta falls linearly from `beta_start` to `beta_end`, which first
    only pushes values near 0/1 and at the end pushes everything.
    """
    start = int(warmup * iters)
    if it < start:
        return beta_start, False
    rel = (it - start) / max(iters - start, 1)
    return beta_end + (beta_start - beta_end) * max(0.0, 1.0 - rel), True


@torch.no_grad()
def mse_weight_scale(weight: torch.Tensor, bits: int, num_candidates: int = 80,
                     min_ratio: float = 0.3, power: float = 2.0) -> torch.Tensor:
    """Per-output-channel scale minimising sum |w - fq(w)|^power over clipping ratios of max|w|.

    Candidates are r * max|w| / qmax for `num_candidates` ratios r evenly spread in [min_ratio, 1];
    ratio 1 is min-max, so the result is never worse than min-max on this error.
    """
    w = weight.detach().float()
    base = P.minmax_weight_scale(w, bits)
    best_scale = base.clone()
    best_err = torch.full_like(base, math.inf)
    flat = w.flatten(1)
    qmax = P.weight_qmax(bits)
    for r in torch.linspace(1.0, min_ratio, num_candidates).tolist():
        s = torch.clamp(base * r, min=1e-12)
        q = torch.clamp(torch.round(flat / s[:, None]), -qmax, qmax) * s[:, None]
        err = (q - flat).abs().pow(power).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, s, best_scale)
    return best_scale.to(torch.float32)
