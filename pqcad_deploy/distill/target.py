"""DDIM quantities and the progressive-distillation x0 target (Salimans & Ho), as pure functions.

Notation (docs/ARCHITECTURE.md, The method): alpha_t = sqrt(alphabar_t), sigma_t = sqrt(1 - alphabar_t); x_t = alpha_t x0 +
sigma_t eps. A DDIM step (eta 0) from t to s with a prediction (x0, eps) is x_s = alpha_s x0 + sigma_s
eps, exactly as diffusers' ``DDIMScheduler.step`` (with its ``clip_sample`` applied to x0 only, the
eps direction is not recomputed). After the grid's last timestep (``PAST_ZERO``) alphabar is
diffusers' ``final_alpha_cumprod`` (1 with ``set_alpha_to_one``, else alphabar_0).

Everything is computed in float64: the target divides by alpha_{t''} - (sigma_{t''}/sigma_t) alpha_t,
which is about 2e-3 at the noisiest step of a 1000-step linear schedule, so float32 round-off of the
teacher's samples would be amplified several hundred times.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pqcad_deploy.distill.grid import PAST_ZERO, DistillGrid
from pqcad_deploy.errors import ConfigError

__all__ = [
    "DDIMCoefficients",
    "predict_x0",
    "eps_from_x0",
    "ddim_step",
    "x0_target",
    "truncated_snr_weight",
    "teacher_target",
]


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample [B] coefficient shaped to broadcast over a [B, ...] batch."""
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


@dataclass(frozen=True)
class DDIMCoefficients:
    """alphabar per training timestep (float64), the past-0 value and the x0 clipping of a config.

    Attributes:
        alphas_cumprod: float64 [num_train_timesteps], diffusers' own values.
        final_alpha_cumprod: alphabar after the last step.
        clip_range: x0 clipping of the teacher's sampler (``clip_sample_range``) or None.
    """

    alphas_cumprod: torch.Tensor
    final_alpha_cumprod: float
    clip_range: float | None

    @classmethod
    def from_config(cls, scheduler_config: dict) -> "DDIMCoefficients":
        """Read diffusers' DDIMScheduler for this config (so betas and alphabar are exactly its).

        Raises:
            ConfigError: for thresholding or a prediction type other than epsilon (not supported).
        """
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(scheduler_config)
        cfg = scheduler.config
        if cfg.prediction_type != "epsilon":
            raise ConfigError(f"distillation supports prediction_type 'epsilon' only; got {cfg.prediction_type!r}.")
        if cfg.thresholding:
            raise ConfigError("distillation does not support a scheduler with thresholding=True.")
        return cls(alphas_cumprod=scheduler.alphas_cumprod.to(torch.float64).clone(),
                   final_alpha_cumprod=float(scheduler.final_alpha_cumprod),
                   clip_range=float(cfg.clip_sample_range) if cfg.clip_sample else None)

    def alphabar(self, t: torch.Tensor) -> torch.Tensor:
        """float64 alphabar for int timesteps `t` (PAST_ZERO -> final_alpha_cumprod)."""
        t = torch.as_tensor(t, dtype=torch.int64)
        ac = self.alphas_cumprod.to(t.device)
        past = t == PAST_ZERO
        if bool((t < PAST_ZERO).any()) or bool((t >= ac.numel()).any()):
            raise ValueError(f"timesteps must be in [0, {ac.numel()}) or PAST_ZERO; got {t.tolist()}")
        value = ac[t.clamp(min=0)]
        return torch.where(past, torch.full_like(value, self.final_alpha_cumprod), value)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) = (sqrt(alphabar_t), sqrt(1 - alphabar_t)), float64."""
        ab = self.alphabar(t)
        return ab.sqrt(), (1.0 - ab).clamp(min=0.0).sqrt()


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    """x0 implied by an eps prediction: (x_t - sigma_t eps) / alpha_t (no clipping)."""
    return (x_t - _bcast(sigma_t, x_t) * eps) / _bcast(alpha_t, x_t)


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    """eps implied by an x0 prediction: (x_t - alpha_t x0) / sigma_t."""
    return (x_t - _bcast(alpha_t, x_t) * x0) / _bcast(sigma_t, x_t)


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor,
              alpha_s: torch.Tensor, sigma_s: torch.Tensor, clip_range: float | None = None) -> torch.Tensor:
    """One DDIM (eta 0) step t -> s from an eps prediction, as diffusers computes it.

    With `clip_range` the predicted x0 is clipped (diffusers' ``clip_sample``) while the eps direction
    stays the model's output, exactly as ``DDIMScheduler.step`` does.
    """
    x0 = predict_x0(x_t, eps, alpha_t, sigma_t)
    if clip_range is not None:
        x0 = x0.clamp(-clip_range, clip_range)
    return _bcast(alpha_s, x_t) * x0 + _bcast(sigma_s, x_t) * eps


def x0_target(x_t: torch.Tensor, x_end: torch.Tensor, alpha_t: torch.Tensor, sigma_t: torch.Tensor,
              alpha_end: torch.Tensor, sigma_end: torch.Tensor,
              degenerate: torch.Tensor | None = None) -> torch.Tensor:
    """The x0 for which ONE unclipped DDIM step t -> t'' from x_t lands exactly on x_end = x_{t''}.

    x0 = (x_{t''} - (sigma_{t''}/sigma_t) x_t) / (alpha_{t''} - (sigma_{t''}/sigma_t) alpha_t); where
    sigma_{t''} = 0 (the step past 0 with ``set_alpha_to_one``) this is simply x_{t''} (alpha = 1).
    The student's sampler clips x0 like the teacher's when ``clip_sample`` is set; the target is exact
    for the unclipped step, which is the same whenever the student's x0 stays inside the range.

    Where alphabar_{t''} = alphabar_t (only the step from t = 0 past 0 with ``set_alpha_to_one``
    False: final_alpha_cumprod = alphabar_0) the step is the identity for every x0, the formula
    divides by 0, and the target is taken from `degenerate` (the teacher's own x0 prediction; zeros
    if not given).
    """
    ratio = _bcast(sigma_end / sigma_t, x_t)
    denom = _bcast(alpha_end, x_t) - ratio * _bcast(alpha_t, x_t)
    flat = denom == 0
    target = (x_end - ratio * x_t) / torch.where(flat, torch.ones_like(denom), denom)
    exact_end = _bcast(sigma_end == 0, x_t)
    target = torch.where(exact_end, x_end / _bcast(alpha_end, x_t), target)
    fallback = torch.zeros_like(target) if degenerate is None else degenerate.to(target.dtype)
    return torch.where(flat & ~exact_end, fallback, target)


def truncated_snr_weight(alpha_t: torch.Tensor, sigma_t: torch.Tensor) -> torch.Tensor:
    """Salimans & Ho's "truncated SNR" weight of an x0-space error: max(SNR_t, 1), SNR = alpha^2/sigma^2.

    Why: SNR_t * ||x0 err||^2 equals the eps-space error, the usual diffusion loss, where the signal
    dominates (SNR > 1); at the noisy end SNR -> 0 would ignore the step entirely, so the weight is
    floored at 1 (plain x0 error there), which progressive distillation needs because the first student
    steps from pure noise decide the image content.
    """
    snr = alpha_t.pow(2) / sigma_t.pow(2).clamp(min=1e-20)
    return torch.clamp(snr, min=1.0)


@torch.no_grad()
def teacher_target(teacher: torch.nn.Module, x_t: torch.Tensor, t: torch.Tensor, grid: DistillGrid,
                   coeffs: DDIMCoefficients, cond: dict[str, torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's DDIM steps from student step t to the student's next step, and the x0 target.

    Args:
        teacher: the FP eps-prediction UNet (called as ``teacher(x, t_float).sample``).
        x_t: [B, C, H, W] inputs; any float dtype (the maths runs in float64).
        t: int64 [B] timesteps on the student grid.
        grid: the teacher/student grids.
        coeffs: DDIM coefficients of the model's scheduler.
        cond: a conditional model's per-pair conditioning (both teacher steps take the pair's own:
            one branch of guidance, the class or the null class; pqcad_deploy.conditioning).

    Returns:
        (x0_target, x_end), both float64 [B, C, H, W]; x_end is the teacher's x_{t''}.
    """
    t = t.to(torch.int64)
    mid, end = grid.lookup(t)
    x = x_t.to(torch.float64)
    a_t, s_t = coeffs.alpha_sigma(t)
    a_m, s_m = coeffs.alpha_sigma(mid)
    model_dtype = next(teacher.parameters()).dtype
    cond = cond or {}
    eps = teacher(x_t.to(model_dtype), t.to(model_dtype), **cond).sample.to(torch.float64)
    x_mid = ddim_step(x, eps, a_t, s_t, a_m, s_m, coeffs.clip_range)
    x_end = x_mid.clone()
    two = mid != end  # the student step covers a second teacher step t' -> t''
    if bool(two.any()):
        a_e, s_e = coeffs.alpha_sigma(end[two])
        eps2 = teacher(x_mid[two].to(model_dtype), mid[two].to(model_dtype),
                       **{k: v[two] for k, v in cond.items()}).sample.to(torch.float64)
        x_end[two] = ddim_step(x_mid[two], eps2, a_m[two], s_m[two], a_e, s_e, coeffs.clip_range)
    a_e, s_e = coeffs.alpha_sigma(end)
    return x0_target(x, x_end, a_t, s_t, a_e, s_e, degenerate=predict_x0(x, eps, a_t, s_t)), x_end
