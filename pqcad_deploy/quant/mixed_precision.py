"""Sensitivity-driven per-layer mixed precision (after MPQ-DM, seed 002) within an average-bit budget.

MPQ-DM measures how outlier-heavy each weight channel is by its kurtosis and gives the worst
channels more bits: a channel with a few large weights sets a large per-channel scale, so at 4 bits
most of its other weights round to one or two codes (or zero), and such channels lose the most.
MPQ-DM mixes bits *inside* a layer; our engines need one bit-width per layer (a QDQ Conv/MatMul
has one weight type), so the channel scores are aggregated per layer and whole layers are raised.

Score of a layer: the **mean** over its output channels of the channel kurtosis
E[(w - mu)^4] / E[(w - mu)^2]^2 (Pearson; 3 for a Gaussian), each channel's weights being the rest
of the weight tensor (KCRS -> C*R*S values, Linear -> in_features values). The mean, not the max:
one bit-width serves all channels, and with per-channel scales the layer's error is the sum of its
channels' errors, so a layer that is outlier-heavy throughout loses more than one with a single bad
channel; the max is also dominated by sampling noise where a channel has few weights (the kurtosis
of n values can reach about n). Measured on the embedded model (docs/RESULTS.md, section 5): over
its 61 layers besides the first and last conv, the Spearman correlation with the layer's own 4-bit
min-max weight error is 0.96 for the mean and 0.83 for the max.

Allocation (a knapsack: raising layer l costs (8 - target) * n_l bits, n_l its number of weights):
every layer starts at the target bits, the forced ones (first and last conv) at 8; then layers are
visited by descending **score per weight**, score_l / n_l, and raised to 8 bits when the raise still
fits the budget of the parameter-weighted average weight bits, sum(bits_l * n_l) / sum(n_l) <=
budget; a layer that does not fit is skipped and the next ones are still tried, so the budget is
used. Per weight, because the benefit of raising a layer does not grow with its size (kurtosis is a
property of the distribution; the measured output gain of raising one layer is uncorrelated with
its weight count) while the cost does: the greedy knapsack rule is benefit per cost. Measured
(docs/RESULTS.md, section 5, "Mixed precision"): at a 4.5-bit budget, weight-only 4-bit min-max,
score per weight reaches 31.1 dB held-out noise-prediction SQNR against 15.1 dB for the score alone
and 21.7 dB for size alone (uniform W4: 13.6 dB, W8: 35.5 dB). Ties keep module order. The budget
is compared in exact rational arithmetic (as the decimal it was written as), so the average never
exceeds it.

A caveat the same measurement shows: on the embedded model the kurtosis tracks a layer's own weight
error, not its effect on the output (Spearman ~0 against the measured single-layer gain); much of
the gain of score per weight comes from raising many small layers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fractions import Fraction

import torch
from torch import nn

from pqcad_deploy.choices import WEIGHT_BITS, check_choice
from pqcad_deploy.errors import ConfigError
from pqcad_deploy.layer_precision import FIRST_LAYER, LAST_LAYER
from pqcad_deploy.quant.replace import LayerBits, quantizable_layers

__all__ = [
    "HIGH_BITS",
    "FIRST_LAST_LAYERS",
    "channel_kurtosis",
    "layer_outlier_scores",
    "average_weight_bits",
    "allocate_weight_bits",
    "MixedPrecision",
    "mixed_precision_plan",
]

HIGH_BITS = 8
# the first and last convolution of a diffusers UNet2DModel, kept at 8 bits (common practice)
FIRST_LAST_LAYERS: tuple[str, ...] = (FIRST_LAYER, LAST_LAYER)


def channel_kurtosis(weight: torch.Tensor) -> torch.Tensor:
    """Kurtosis E[(w - mu)^4] / E[(w - mu)^2]^2 of each output channel (dim 0), float64 [out].

    Pearson's definition (a Gaussian gives 3, not 0); population moments. A constant channel has no
    outliers and gets 0.
    """
    w = weight.detach().reshape(weight.shape[0], -1).double()
    centred = w - w.mean(dim=1, keepdim=True)
    m2 = centred.pow(2).mean(dim=1)
    m4 = centred.pow(4).mean(dim=1)
    safe = m2 > 0
    return torch.where(safe, m4 / torch.where(safe, m2, torch.ones_like(m2)).pow(2), torch.zeros_like(m2))


def layer_outlier_scores(unet: nn.Module, names: Iterable[str] | None = None) -> dict[str, float]:
    """Name -> mean channel kurtosis of every quantizable layer (or of `names`), in module order."""
    layers = quantizable_layers(unet)
    wanted = list(layers) if names is None else [n for n in layers if n in set(names)]
    return {name: float(channel_kurtosis(layers[name].weight).mean()) for name in wanted}


def average_weight_bits(bits: Mapping[str, int], params: Mapping[str, int]) -> float:
    """Parameter-weighted average weight bits, sum(bits * n) / sum(n)."""
    total = sum(params[name] for name in bits)
    return sum(b * params[name] for name, b in bits.items()) / max(total, 1)


def allocate_weight_bits(
    scores: Mapping[str, float],
    params: Mapping[str, int],
    target_bits: int,
    budget: float,
    forced: Iterable[str] = (),
) -> dict[str, int]:
    """Per-layer weight bits: `forced` at 8, then the highest scores per weight raised to 8 while they fit.

    Args:
        scores: name -> outlier score; layers are raised by descending score / params (ties keep
            the order of `scores`).
        params: name -> number of weights of the layer (every name of `scores`).
        target_bits: the bits of every layer not raised (must be below 8).
        budget: the largest allowed parameter-weighted average weight bits, in [target_bits, 8].
        forced: layers kept at 8 bits whatever the budget (names absent from `scores` are ignored).

    Returns:
        name -> 8 or `target_bits`, in the order of `scores`.

    Raises:
        ConfigError: target or budget out of range, or the forced layers alone exceed the budget.
    """
    check_choice("--weight-bits", target_bits, WEIGHT_BITS)
    if target_bits >= HIGH_BITS:
        raise ConfigError(f"mixed precision needs target weight bits below {HIGH_BITS}; got {target_bits}.")
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or not math.isfinite(budget) \
            or not target_bits <= budget <= HIGH_BITS:
        raise ConfigError(f"--avg-weight-bits must be a number in [{target_bits}, {HIGH_BITS}] (between "
                          f"--weight-bits and {HIGH_BITS}); got {budget!r}.")
    missing = [name for name in scores if name not in params]
    if missing:
        raise ValueError(f"no parameter count for layer {missing[0]!r}")
    total = sum(params[name] for name in scores)
    # extra bits the budget allows, exactly; the budget as the decimal it was written as (5.6, not
    # the binary float just below it), so a budget met exactly is not refused by rounding
    allowance = (Fraction(repr(float(budget))) - target_bits) * total
    step = HIGH_BITS - target_bits
    bits = {name: target_bits for name in scores}
    forced_here = [name for name in scores if name in set(forced)]
    used = sum(step * params[name] for name in forced_here)
    if used > allowance:
        need = target_bits + used / total
        raise ConfigError(
            f"--avg-weight-bits {budget} is below what the layers kept at {HIGH_BITS} bits need on their "
            f"own ({', '.join(forced_here)}: an average of {need:.4f} weight bits); pass at least "
            f"{math.ceil(need * 1000) / 1000:g}.")
    for name in forced_here:
        bits[name] = HIGH_BITS
    # score per weight (see the module docstring); sorted() is stable, so ties keep the given order
    order = sorted((name for name in scores if name not in forced_here),
                   key=lambda n: -scores[n] / max(params[n], 1))
    for name in order:
        cost = step * params[name]
        if used + cost <= allowance:
            bits[name] = HIGH_BITS
            used += cost
    return bits


@dataclass(frozen=True)
class MixedPrecision:
    """A mixed-precision plan and what it was chosen from (the `mixed_precision` report section)."""

    plan: dict[str, LayerBits]
    scores: dict[str, float]
    params: dict[str, int]
    target_bits: int
    budget: float
    forced: tuple[str, ...]

    @property
    def average_bits(self) -> float:
        return average_weight_bits({n: b.weight_bits for n, b in self.plan.items()}, self.params)

    def report(self) -> dict:
        """JSON-ready: the rule, the budget, the achieved average and every layer's score and bits."""
        raised = sorted((n for n, b in self.plan.items() if b.weight_bits == HIGH_BITS and n not in self.forced),
                        key=lambda n: -self.scores[n] / max(self.params[n], 1))
        return {
            "score": "mean over output channels of the weight-channel kurtosis (Pearson)",
            "rule": "greedy by descending score per weight; a layer is raised to 8 bits when it fits the budget",
            "target_bits": self.target_bits,
            "budget_avg_weight_bits": self.budget,
            "avg_weight_bits": self.average_bits,
            "forced": list(self.forced),
            "raised": raised,
            "layers": {n: {"score": self.scores[n], "weight_bits": self.plan[n].weight_bits,
                           "params": self.params[n]} for n in self.plan},
        }


def mixed_precision_plan(
    unet: nn.Module,
    plan: Mapping[str, LayerBits],
    budget: float,
    forced: Iterable[str] = FIRST_LAST_LAYERS,
) -> MixedPrecision:
    """Raise the most outlier-heavy layers of `plan` to 8-bit weights within `budget`.

    Args:
        unet: the FP model (its weights give the scores).
        plan: name -> LayerBits at the target weight bits, some layers possibly already at 8 (they
            stay there and count as forced); activation bits are kept as they are.
        budget: the largest parameter-weighted average weight bits.
        forced: layers kept at 8 bits (default: the first and last convolution).

    Raises:
        ConfigError: see :func:`allocate_weight_bits`; also when the plan holds bits other than a
            target below 8 and 8.
    """
    target = min(b.weight_bits for b in plan.values())
    others = {b.weight_bits for b in plan.values()} - {target, HIGH_BITS}
    if target >= HIGH_BITS or others:
        raise ConfigError(f"mixed precision needs a plan at one target weight bit-width below {HIGH_BITS} (some "
                          f"layers may be at {HIGH_BITS}); it has {sorted({b.weight_bits for b in plan.values()})}.")
    kept = tuple(n for n in plan if n in set(forced) or plan[n].weight_bits == HIGH_BITS)
    layers = quantizable_layers(unet)
    scores = layer_outlier_scores(unet, plan)
    params = {name: int(layers[name].weight.numel()) for name in scores}
    bits = allocate_weight_bits(scores, params, target, budget, kept)
    new_plan = {name: LayerBits(bits[name], plan[name].act_bits) for name in plan}
    return MixedPrecision(plan=new_plan, scores=scores, params=params, target_bits=target, budget=float(budget),
                          forced=kept)
