"""Every compress setting in one place: the config dataclasses, and the two presets as one table.

A preset names a full set of sizes and schedules (how many calibration trajectories, reconstruction
iterations, PQ transition limits, check images, CAD iterations and pairs, guard images, checkpoint
spacing). ``compress`` resolves it once (:func:`preset_settings`), passes the resolved settings to
every stage, writes them into the artifact's report and hashes them into the resume fingerprint, so a
table edited between an interrupted run and its ``--resume`` is refused instead of mixing settings.
This module is torch-free: the stages import their config classes from here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from pqcad_deploy.choices import (
    CALIBRATION_SELECTIONS, PRESETS as PRESET_NAMES, TIMESTEP_SAMPLINGS, CalibrationSelection, TimestepSampling,
    check_choice,
)
from pqcad_deploy.errors import ConfigError

__all__ = ["CalibrationConfig", "ReconstructionConfig", "TransitionRule", "ScaleCheckConfig", "GuardConfig",
           "DistillConfig", "LR_DECAYS", "DCConfig", "DCSource", "DC_SOURCES", "PresetSettings", "PRESETS",
           "preset_settings", "preset_to_dict"]

DCSource = Literal["trajectories", "noise_injection"]
DC_SOURCES: tuple[str, ...] = ("trajectories", "noise_injection")
LR_DECAYS: tuple[str, ...] = ("constant", "cosine")


# ------------------------------------------------------------------ calibration (C_QC)
@dataclass(frozen=True)
class CalibrationConfig:
    """How the data-free calibration set is drawn from the FP model's own DDIM trajectories.

    Args:
        num_trajectories: FP DDIM trajectories started from Gaussian noise.
        timesteps_kept: how many timesteps of each trajectory are kept as (x_t, t) pairs.
        batch_size: trajectories run together.
        timestep_sampling: "uniform" keeps evenly spread steps of every trajectory; "normal" keeps
            steps drawn from Normal(timestep_mean * T, timestep_std * T) snapped to the grid
            (PTQ4DM's normally distributed timestep calibration, used by PQ's C_QC).
        timestep_mean / timestep_std: as fractions of T (our defaults, docs/ARCHITECTURE.md, The method).
        selection: "none" keeps every drawn pair; "density_diversity" draws `selection_oversample`
            times as many trajectories and keeps the num_trajectories * timesteps_kept pairs picked
            by density and diversity of their FP mid-block features (EDA-DM; calibration.selection).
        selection_oversample: candidates per kept pair with a selection (an integer >= 2).
    """

    num_trajectories: int = 32
    timesteps_kept: int = 16
    batch_size: int = 32
    timestep_sampling: TimestepSampling = "uniform"
    timestep_mean: float = 0.4
    timestep_std: float = 0.3
    selection: CalibrationSelection = "none"
    selection_oversample: int = 4

    def __post_init__(self) -> None:
        for name in ("num_trajectories", "timesteps_kept", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"calibration {name} must be a positive integer; got {value!r}.")
        check_choice("--timestep-sampling", self.timestep_sampling, TIMESTEP_SAMPLINGS)
        if not 0.0 <= self.timestep_mean <= 1.0 or not self.timestep_std > 0.0:
            raise ConfigError(
                f"--timestep-mean must be in [0, 1] and --timestep-std > 0; "
                f"got {self.timestep_mean!r}, {self.timestep_std!r}.")
        check_choice("--calibration-selection", self.selection, CALIBRATION_SELECTIONS)
        oversample = self.selection_oversample
        if not isinstance(oversample, int) or isinstance(oversample, bool) or oversample < 2:
            raise ConfigError(f"--calibration-oversample must be an integer >= 2 (candidates drawn per kept "
                              f"calibration sample); got {oversample!r}.")


# ------------------------------------------------------------------ block reconstruction, PQ
@dataclass(frozen=True)
class ReconstructionConfig:
    """Settings of block reconstruction.

    Args:
        iters: Adam iterations per block in the weight stage.
        act_iters: Adam iterations per block in the activation stage (0: min-max only).
        batch_size: calibration samples per iteration (drawn with replacement from the set).
        lr: Adam learning rate of the AdaRound logits V (h(V) moves from 0 to 1 over about 5 units).
        scale_lr: Adam learning rate of the weight scales, relative to each layer's mean scale.
        act_scale_lr: Adam learning rate of the activation scales, relative to the scale.
        learn_weight_scale: learn the weight scales with the rounding (LSQ-style); else keep the init.
        weight_scale_init: "mse" (per-channel clipping search) or "minmax".
        round_lambda: weight of the rounding regulariser (mean over the block's weights).
        beta_start / beta_end: annealing range of the regulariser's exponent.
        warmup: fraction of iterations without the regulariser.
        layer_loss: add the per-layer output errors inside the block (EDA-DM).
        layer_loss_weight: their weight relative to the block output error.
        input_source: "quantized" (BRECQ: the partially quantized student feeds the block) or "fp".
        seed: seeds the batch sampling.
    """

    iters: int = 300
    act_iters: int = 100
    batch_size: int = 32
    lr: float = 5e-2
    scale_lr: float = 1e-4
    act_scale_lr: float = 1e-3
    learn_weight_scale: bool = True
    weight_scale_init: Literal["mse", "minmax"] = "mse"
    round_lambda: float = 1e-1
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    layer_loss: bool = False
    layer_loss_weight: float = 1.0
    input_source: Literal["quantized", "fp"] = "quantized"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("iters", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"reconstruction {name} must be a positive integer; got {value!r}.")
        if not isinstance(self.act_iters, int) or self.act_iters < 0:
            raise ConfigError(f"reconstruction act_iters must be a non-negative integer; got {self.act_iters!r}.")
        for name in ("lr", "scale_lr", "act_scale_lr", "beta_start", "beta_end"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ConfigError(f"reconstruction {name} must be a positive number; got {value!r}.")
        if not (isinstance(self.round_lambda, (int, float)) and self.round_lambda >= 0):
            raise ConfigError(f"reconstruction round_lambda must be >= 0; got {self.round_lambda!r}.")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"reconstruction warmup must be in [0, 1); got {self.warmup!r}.")
        if self.weight_scale_init not in ("mse", "minmax"):
            raise ConfigError(f"weight_scale_init must be 'mse' or 'minmax'; got {self.weight_scale_init!r}.")
        if self.input_source not in ("quantized", "fp"):
            raise ConfigError(f"input_source must be 'quantized' or 'fp'; got {self.input_source!r}.")


@dataclass(frozen=True)
class TransitionRule:
    """When to leave a bit level.

    Args:
        beta: momentum of the loss improvement (0 <= beta < 1).
        threshold: converged when momentum < threshold * current loss.
        min_iters: never step down before this many iterations at a level.
        max_iters: always step down after this many iterations at a level.
    """

    beta: float = 0.9
    threshold: float = 1e-3
    min_iters: int = 50
    max_iters: int = 500

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta < 1.0:
            raise ConfigError(f"transition beta must be in [0, 1); got {self.beta!r}.")
        if self.threshold < 0:
            raise ConfigError(f"transition threshold must be >= 0; got {self.threshold!r}.")
        if not 1 <= self.min_iters <= self.max_iters:
            raise ConfigError(
                f"transition iterations need 1 <= min_iters <= max_iters; got {self.min_iters}, {self.max_iters}.")


@dataclass(frozen=True)
class ScaleCheckConfig:
    """How many images the check samples (each from seed + offset + i) with the teacher's steps."""

    images: int = 16


# ------------------------------------------------------------------ CAD
@dataclass(frozen=True)
class DCConfig:
    """How C_DC is drawn.

    Args:
        size: number of (x_t, t) pairs.
        source: "trajectories" or "noise_injection" (module docstring).
        perturbation: std of the extra Gaussian perturbation as a fraction of sigma_t (0: none).
        batch_size: trajectories run together.
        seed: seeds the noise, the timestep assignment and the perturbation.
        fresh: draw new pairs for every training batch (:meth:`DCSet.draw`) instead of reusing `size`.
        mix: with `fresh`, the probability that a pair comes from noise injection (else a trajectory).
        trajectories: FP trajectories in the pools; None: ceil(size / K), enough for the fixed set.
    """

    size: int = 512
    source: DCSource = "trajectories"
    perturbation: float = 0.02
    batch_size: int = 32
    seed: int = 0
    fresh: bool = False
    mix: float = 0.5
    trajectories: int | None = None

    def __post_init__(self) -> None:
        for name in ("size", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"C_DC {name} must be a positive integer; got {value!r}.")
        if self.source not in DC_SOURCES:
            raise ConfigError(f"C_DC source must be one of {', '.join(DC_SOURCES)}; got {self.source!r}.")
        if not (isinstance(self.perturbation, (int, float)) and 0 <= self.perturbation < 1
                and math.isfinite(self.perturbation)):
            raise ConfigError("C_DC perturbation must be in [0, 1) (a fraction of sigma_t); "
                              f"got {self.perturbation!r}.")
        if not (isinstance(self.mix, (int, float)) and 0 <= self.mix <= 1):
            raise ConfigError(f"C_DC mix must be in [0, 1] (the share of noise-injection pairs); got {self.mix!r}.")
        if self.trajectories is not None and (not isinstance(self.trajectories, int) or self.trajectories < 1):
            raise ConfigError(f"C_DC trajectories must be a positive integer or None; got {self.trajectories!r}.")


@dataclass(frozen=True)
class DistillConfig:
    """Settings of CAD.

    Args:
        iters: Adam iterations.
        batch_size: C_DC pairs per iteration (drawn with replacement).
        lr: Adam learning rate of the latent weights and the other float parameters.
        scale_lr: learning rate of the weight scales, relative to each layer's mean scale.
        act_scale_lr: learning rate of the activation scales, relative to the scale.
        train_other: also train the student's unquantized float parameters (module docstring).
        rdd_weight: weight of the relational (RDD) term; 0 disables it.
        grad_clip: max global gradient norm (None: no clipping); guards against the large SNR
            weights near t = 0.
        checkpoint_every: iterations between ``on_checkpoint`` calls (0: never).
        seed: seeds the batch draws.
        warmup_iters: the learning rates rise linearly from 1/warmup_iters of their value over these
            first iterations (0: none).
        lr_decay: "constant", or "cosine" (to 0 at the last iteration, after the warm-up).
        ema_decay: None, or the decay of an exponential moving average of the trained parameters,
            which the student ends with (and the held-out curve measures).
        heldout_every: iterations between two held-out losses when ``distill`` gets a held-out set
            (also measured before the first and after the last iteration).
    """

    iters: int = 2000
    batch_size: int = 16
    lr: float = 1e-5
    scale_lr: float = 1e-4
    act_scale_lr: float = 1e-3
    train_other: bool = True
    rdd_weight: float = 0.0
    grad_clip: float | None = 1.0
    checkpoint_every: int = 0
    seed: int = 0
    warmup_iters: int = 0
    lr_decay: str = "constant"
    ema_decay: float | None = None
    heldout_every: int = 100

    def __post_init__(self) -> None:
        for name in ("iters", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"distillation {name} must be a positive integer; got {value!r}.")
        for name in ("lr", "scale_lr", "act_scale_lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
                raise ConfigError(f"distillation {name} must be a non-negative number; got {value!r}.")
        if not (isinstance(self.rdd_weight, (int, float)) and self.rdd_weight >= 0):
            raise ConfigError(f"distillation rdd_weight must be >= 0; got {self.rdd_weight!r}.")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"distillation grad_clip must be positive or None; got {self.grad_clip!r}.")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise ConfigError(f"distillation checkpoint_every must be >= 0; got {self.checkpoint_every!r}.")
        if not isinstance(self.warmup_iters, int) or isinstance(self.warmup_iters, bool) or self.warmup_iters < 0:
            raise ConfigError(f"distillation warmup_iters must be an integer >= 0; got {self.warmup_iters!r}.")
        if self.lr_decay not in LR_DECAYS:
            raise ConfigError(f"distillation lr_decay must be one of {', '.join(LR_DECAYS)}; got {self.lr_decay!r}.")
        if self.ema_decay is not None and not (isinstance(self.ema_decay, float) and 0.0 < self.ema_decay < 1.0):
            raise ConfigError(f"distillation ema_decay must be None or a float in (0, 1); got {self.ema_decay!r}.")
        if not isinstance(self.heldout_every, int) or self.heldout_every < 1:
            raise ConfigError(f"distillation heldout_every must be a positive integer; got {self.heldout_every!r}.")

    def lr_factor(self, iteration: int) -> float:
        """The multiplier of every learning rate at `iteration` (0-based): warm-up, then the decay."""
        if iteration < self.warmup_iters:
            return (iteration + 1) / self.warmup_iters
        if self.lr_decay == "cosine":
            span = max(self.iters - self.warmup_iters, 1)
            return 0.5 * (1.0 + math.cos(math.pi * (iteration - self.warmup_iters) / span))
        return 1.0


@dataclass(frozen=True)
class GuardConfig:
    """How many images each student samples for the comparison (image i from seed + offset + i), and
    how clearly the distilled student must win to be kept.

    `min_z`: the distilled student is kept only when its mean per-image PSNR gain over the undistilled
    one exceeds `min_z` standard errors of that mean (a paired test over the same seeds). A plain
    "higher mean wins" kept a CIFAR-10 W4A8 student that won by 0.012 dB on 32 images and lost 12% FID
    (24.08 -> 27.04 at 50 steps, RESULTS section 20); the smallest gain kept that lowered FID was
    0.91 dB. Ties and noise keep the undistilled student: plain step halving is the safe side.
    """

    images: int = 32
    min_z: float = 2.0
    metric: str = "psnr"
    """distill.guard.GUARD_METRICS: ``psnr`` (any device) or ``fid`` (a GPU: `fid_images` per student)."""
    fid_images: int = 2000
    fid_resamples: int = 50
    """Paired bootstrap resamples for the FID gain's standard error (eval.fid_paired)."""


# ------------------------------------------------------------------ the presets
@dataclass(frozen=True)
class PresetSettings:
    """Everything a preset fixes; `heldout` is the C_DC draw whose loss the report tracks (never trained on)."""

    calibration: CalibrationConfig
    reconstruction: ReconstructionConfig
    pq_rule: TransitionRule
    scale_check: ScaleCheckConfig
    dc: DCConfig
    heldout: DCConfig
    distill: DistillConfig
    guard: GuardConfig
    distill_checkpoint_every: int


PRESETS: dict[str, PresetSettings] = {
    "fast": PresetSettings(  # tests and demos: about a minute on a 2-core CPU (README's main job)
        calibration=CalibrationConfig(num_trajectories=4, timesteps_kept=8, batch_size=4),
        reconstruction=ReconstructionConfig(iters=60, act_iters=20, batch_size=8),
        pq_rule=TransitionRule(beta=0.9, threshold=1e-3, min_iters=15, max_iters=60),
        scale_check=ScaleCheckConfig(images=4),
        dc=DCConfig(size=64),  # 64 fixed pairs: 100 iterations of batch 8 see each a dozen times
        heldout=DCConfig(size=16),
        distill=DistillConfig(iters=100, batch_size=8, heldout_every=50),
        guard=GuardConfig(images=4, fid_images=64, fid_resamples=10),
        distill_checkpoint_every=25,
    ),
    "default": PresetSettings(
        calibration=CalibrationConfig(num_trajectories=32, timesteps_kept=16, batch_size=32),
        reconstruction=ReconstructionConfig(iters=300, act_iters=100, batch_size=32),
        pq_rule=TransitionRule(beta=0.9, threshold=1e-3, min_iters=50, max_iters=300),
        scale_check=ScaleCheckConfig(images=16),
        # CAD: batch 64 x 1,000 iterations on pairs drawn fresh for every batch (pools of FP
        # trajectories sized for 1,024 pairs) beat the first CAD (fixed 1,024 pairs, batch 16 x 2,000)
        # at 20 -> 10 steps on both builtin models at 10k FID (RESULTS section 18: Fashion-MNIST
        # 14.06 -> 12.39, CIFAR-10 23.78 -> 23.75); one round took at most 451 s on a shared H200.
        dc=DCConfig(size=1024, fresh=True),
        heldout=DCConfig(size=256),
        distill=DistillConfig(iters=1000, batch_size=64),
        guard=GuardConfig(images=32),
        distill_checkpoint_every=200,
    ),
}
assert tuple(PRESETS) == PRESET_NAMES, "choices.PRESETS names the presets this table defines"


def preset_settings(name: str) -> PresetSettings:
    """The settings of preset `name` (the CLI has checked the name; a library caller gets an error)."""
    check_choice("--preset", name, PRESET_NAMES)
    return PRESETS[name]


def preset_to_dict(settings: PresetSettings) -> dict:
    """JSON-ready nested dict of the resolved settings (the report's ``preset_settings``)."""
    return dataclasses.asdict(settings)
