"""Deterministic DDIM (eta = 0) in numpy, reading the same config keys as diffusers' DDIMScheduler.

The runtime must sample exactly like the PyTorch pipeline the student was calibrated and distilled
with, but without torch. This module reimplements the parts of ``diffusers.DDIMScheduler`` that
matter for eta = 0: the beta schedules, ``set_timesteps`` spacings and ``step``. The alpha tables are
float64 (betas rounded to float32 first, as diffusers stores them, so both start from the same
numbers); the sampling state stays float32 like the model's input. Tests pin it against diffusers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

import numpy as np

from .errors import ConfigError

__all__ = [
    "BetaSchedule",
    "BETA_SCHEDULES",
    "TimestepSpacing",
    "TIMESTEP_SPACINGS",
    "PREDICTION_TYPES",
    "DDIMConfig",
    "make_betas",
    "ddim_timesteps",
    "DDIMSampler",
]

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
BETA_SCHEDULES: tuple[str, ...] = get_args(BetaSchedule)
TimestepSpacing = Literal["leading", "trailing", "linspace"]
TIMESTEP_SPACINGS: tuple[str, ...] = get_args(TimestepSpacing)
PredictionType = Literal["epsilon", "sample", "v_prediction"]
PREDICTION_TYPES: tuple[str, ...] = get_args(PredictionType)


@dataclass(frozen=True)
class DDIMConfig:
    """The DDIMScheduler config keys the runtime honours; defaults are diffusers' defaults."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: BetaSchedule = "linear"
    trained_betas: tuple[float, ...] | None = None
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: PredictionType = "epsilon"
    timestep_spacing: TimestepSpacing = "leading"
    rescale_betas_zero_snr: bool = False
    thresholding: bool = False

    def __post_init__(self) -> None:
        if self.thresholding:
            raise ConfigError(
                "scheduler_config has thresholding=True (dynamic thresholding), which the numpy DDIM sampler does not support; "
                "export with thresholding=False."
            )
        for name, value, choices in (
            ("beta_schedule", self.beta_schedule, BETA_SCHEDULES),
            ("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS),
            ("prediction_type", self.prediction_type, PREDICTION_TYPES),
        ):
            if value not in choices and not (name == "beta_schedule" and self.trained_betas is not None):
                raise ConfigError(f"scheduler_config {name}={value!r} is not supported; choose one of {', '.join(choices)}.")
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps <= 0:
            raise ConfigError(f"scheduler_config num_train_timesteps must be a positive integer, got {self.num_train_timesteps!r}.")
        if self.trained_betas is not None:
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> DDIMConfig:
        """Read a diffusers scheduler config dict.

        Keys this sampler does not use (``_class_name``, ``_diffusers_version``, the thresholding
        parameters, keys of DDPM-style configs such as ``variance_type``) are ignored, as diffusers'
        own ``from_config`` does; the keys that change results are all honoured or refused.
        """
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in known})


def _betas_for_alpha_bar(n: int, max_beta: float = 0.999) -> np.ndarray:
    # Glide's cosine schedule, as diffusers' betas_for_alpha_bar(alpha_transform_type="cosine").
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)])


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    # https://arxiv.org/abs/2305.08891 Algorithm 1, as diffusers' rescale_zero_terminal_snr.
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


def make_betas(config: DDIMConfig) -> np.ndarray:
    """Return the float64 beta table of ``config`` (rounded through float32 like diffusers)."""
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = np.asarray(config.trained_betas, dtype=np.float32)
        if betas.shape != (n,):
            raise ConfigError(f"scheduler_config trained_betas has {betas.size} values but num_train_timesteps={n}.")
    elif config.beta_schedule == "linear":
        betas = np.linspace(config.beta_start, config.beta_end, n, dtype=np.float64).astype(np.float32)
    elif config.beta_schedule == "scaled_linear":
        betas = (np.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=np.float64) ** 2).astype(np.float32)
    else:
        betas = _betas_for_alpha_bar(n).astype(np.float32)
    betas = betas.astype(np.float64)
    if config.rescale_betas_zero_snr:
        betas = _rescale_zero_terminal_snr(betas)
    return betas


def ddim_timesteps(config: DDIMConfig | Mapping[str, Any], num_steps: int) -> np.ndarray:
    """Return the descending int64 timesteps of diffusers' ``DDIMScheduler.set_timesteps(num_steps)``.

    Raises:
        ConfigError: ``num_steps`` outside ``[1, num_train_timesteps]`` or an unsupported config.
    """
    if not isinstance(config, DDIMConfig):
        config = DDIMConfig.from_dict(config)
    n = config.num_train_timesteps
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or not 1 <= num_steps <= n:
        raise ConfigError(f"steps={num_steps!r} must be an integer between 1 and num_train_timesteps={n}.")
    num_steps = int(num_steps)
    if config.timestep_spacing == "linspace":
        ts = np.linspace(0, n - 1, num_steps).round()[::-1].copy().astype(np.int64)
    elif config.timestep_spacing == "leading":
        ratio = n // num_steps
        ts = (np.arange(0, num_steps) * ratio).round()[::-1].copy().astype(np.int64)
        ts += config.steps_offset
    else:  # trailing
        ratio = n / num_steps
        ts = np.round(np.arange(n, 0, -ratio)).astype(np.int64) - 1
    return ts


class DDIMSampler:
    """One DDIM (eta = 0) update at a time over an explicit timestep list.

    Unlike diffusers, the previous timestep is passed explicitly, so any descending list (the
    student's distilled schedule) works; for uniform grids it equals diffusers' ``t - n_train // steps``.
    """

    def __init__(self, config: DDIMConfig | Mapping[str, Any]) -> None:
        self.config = config if isinstance(config, DDIMConfig) else DDIMConfig.from_dict(config)
        self.betas = make_betas(self.config)
        self.alphas_cumprod = np.cumprod(1.0 - self.betas)
        self.final_alpha_cumprod = 1.0 if self.config.set_alpha_to_one else float(self.alphas_cumprod[0])

    def _alpha(self, t: int) -> float:
        if not 0 <= t < self.config.num_train_timesteps:
            raise ConfigError(f"timestep {t} is outside [0, {self.config.num_train_timesteps}).")
        return float(self.alphas_cumprod[t])

    def step(self, model_output: np.ndarray, t: int, prev_t: int, x: np.ndarray) -> np.ndarray:
        """Return ``x_{prev_t}`` from ``x_t`` and the model's prediction at ``t``.

        Args:
            model_output: the network output (epsilon, x0 or v, per ``prediction_type``).
            t: current timestep.
            prev_t: the next (smaller) timestep of the list, or -1 after the last one, in which case
                alphabar_prev is ``final_alpha_cumprod``.
            x: current sample, float32.

        Returns:
            The new sample, float32, same shape as ``x``.
        """
        a_t = self._alpha(int(t))
        a_prev = self._alpha(int(prev_t)) if prev_t >= 0 else self.final_alpha_cumprod
        b_t = 1.0 - a_t
        x64 = x.astype(np.float64)
        out = model_output.astype(np.float64)
        pt = self.config.prediction_type
        if pt == "epsilon":
            x0 = (x64 - math.sqrt(b_t) * out) / math.sqrt(a_t)
            eps = out
        elif pt == "sample":
            x0 = out
            eps = (x64 - math.sqrt(a_t) * x0) / math.sqrt(b_t)
        else:  # v_prediction
            x0 = math.sqrt(a_t) * x64 - math.sqrt(b_t) * out
            eps = math.sqrt(a_t) * out + math.sqrt(b_t) * x64
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            x0 = np.clip(x0, -r, r)
        x_prev = math.sqrt(a_prev) * x0 + math.sqrt(1.0 - a_prev) * eps
        return x_prev.astype(np.float32)
