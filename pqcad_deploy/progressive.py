"""Progressive bit lowering: the bit ladder and the momentum-based transition rule (PQCAD-DM's PQ).

At each level of the ladder (e.g. 8 -> 6 -> 4 bits) a block is optimised until its reconstruction
("perturbation") loss stops improving, then the bit-width steps down and the result initialises the
next level. "Stops improving" is decided by a momentum of the per-iteration loss improvement:

    m_k = beta * m_{k-1} + (1 - beta) * (L_{k-1} - L_k)

The level has converged when m_k < threshold * L_k (the improvement is small relative to the loss)
and at least `min_iters` iterations have passed; `max_iters` bounds the time spent on a level.
Each decision is recorded so the compression report can show every transition.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pqcad_deploy.errors import ConfigError
from pqcad_deploy.presets import TransitionRule

__all__ = ["TransitionRule", "TransitionTracker", "Transition", "bit_ladder"]


@dataclass(frozen=True)
class Transition:
    """One step down the ladder (or the end of the last level), for the report."""

    block: str
    from_bits: int
    to_bits: int | None
    iteration: int
    loss: float
    reason: str  # "converged" | "max_iters"


@dataclass
class TransitionTracker:
    """Feeds losses of one level to the rule; `update` returns True when the level is done."""

    rule: TransitionRule
    momentum: float = 0.0
    iterations: int = 0
    last_loss: float | None = None
    reason: str | None = field(default=None)

    def update(self, loss: float) -> bool:
        loss = float(loss)
        if self.last_loss is not None:
            improvement = self.last_loss - loss
            self.momentum = self.rule.beta * self.momentum + (1.0 - self.rule.beta) * improvement
        self.last_loss = loss
        self.iterations += 1
        if self.iterations >= self.rule.max_iters:
            self.reason = "max_iters"
            return True
        if self.iterations >= self.rule.min_iters and self.momentum < self.rule.threshold * abs(loss):
            self.reason = "converged"
            return True
        return False


def bit_ladder(target_bits: int, start_bits: int = 8, ladder: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The bit-widths visited on the way down to `target_bits`.

    Default: 8 -> 6 -> 4 for a 4-bit target (the method's default), 8 for an 8-bit target.
    An explicit `ladder` must be strictly decreasing and end at the target.
    """
    if ladder is None:
        ladder = tuple(b for b in (8, 6, 4) if target_bits <= b <= start_bits)
        if not ladder or ladder[-1] != target_bits:
            ladder = (*ladder, target_bits)
    if any(a <= b for a, b in zip(ladder, ladder[1:])) or ladder[-1] != target_bits:
        raise ConfigError(f"bit ladder must decrease strictly and end at {target_bits}; got {list(ladder)}.")
    return tuple(ladder)
