"""Classifier-free guidance for the torch-free sampler, written to match diffusers line for line.

Issue 17's conditional models (class-conditional UNet2DModel, the Stable Diffusion family) are
sampled with classifier-free guidance: each step runs the model on an unconditional and a
conditional copy of the batch and extrapolates from the first towards the second. A student is
calibrated and distilled on guided trajectories drawn with diffusers, so the runtime must guide in
exactly the same way, in numpy: the same batch layout (unconditional half first), the same combine
and, as an option, the same ``guidance_rescale``. The tests pin this module against
``StableDiffusionPipeline`` on the same noise.

What we followed: diffusers 0.42.1,
``src/diffusers/pipelines/stable_diffusion/pipeline_stable_diffusion.py``

- lines 759-764, ``do_classifier_free_guidance``: guidance runs only when ``guidance_scale > 1``;
  at 1 the batch is not doubled and the conditional output is used as is.
- line 978, ``torch.cat([negative_prompt_embeds, prompt_embeds])`` and line 1037,
  ``torch.cat([latents] * 2)``: the doubled batch is [unconditional, conditional].
- lines 1053-1055, ``noise_pred.chunk(2)`` then
  ``noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)``.
- lines 1057-1059 and 69-92, ``rescale_noise_cfg`` (Lin et al., "Common Diffusion Noise Schedules and
  Sample Steps are Flawed", section 3.4), applied only when guidance runs and
  ``guidance_rescale > 0``.

Nothing here knows what a condition is: prompt embeddings ``[n, tokens, width]``, class labels
``[n]`` (the null class as the unconditional half) or anything else with the batch first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .ddim import DDIMSampler
from .errors import ConfigError, EngineError

__all__ = ["GuidedModel", "Guidance", "rescale_noise_cfg", "guided_ddim"]

GuidedModel = Callable[[np.ndarray, int, np.ndarray], np.ndarray]
"""``model(x, t, conditions) -> prediction``: numpy in, numpy out, batch first; an ONNX session, or
in the tests a torch UNet wrapped by the test itself."""


def _real(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True)
class Guidance:
    """How strongly to guide, as diffusers' ``guidance_scale`` and ``guidance_rescale``.

    Attributes:
        scale: ``w`` of ``uncond + w * (cond - uncond)``; finite and >= 1.0. 1.0 means no guidance:
            the model runs once on the conditional batch (not doubled), as in diffusers.
        rescale: diffusers' ``guidance_rescale`` (phi of Lin et al. section 3.4), in [0, 1]; 0 (the
            default) is off. Like diffusers, it only acts when guidance runs (scale > 1).

    Raises:
        ConfigError: a value that is not a finite number in its range.
    """

    scale: float
    rescale: float = 0.0

    def __post_init__(self) -> None:
        if not _real(self.scale) or not math.isfinite(self.scale) or self.scale < 1.0:
            raise ConfigError(f"guidance scale must be a finite number >= 1.0 (1.0 turns guidance off), "
                              f"got {self.scale!r}.")
        if not _real(self.rescale) or not math.isfinite(self.rescale) or not 0.0 <= self.rescale <= 1.0:
            raise ConfigError(f"guidance rescale must be a finite number between 0.0 (off) and 1.0, "
                              f"got {self.rescale!r}.")
        object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "rescale", float(self.rescale))

    @property
    def enabled(self) -> bool:
        """Whether the model runs on a doubled batch (diffusers' ``do_classifier_free_guidance``)."""
        return self.scale > 1.0

    def model_batch(self, x: np.ndarray, cond: np.ndarray, uncond: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Return the model's input and conditions for one step: ``([x, x], [uncond, cond])`` when
        guiding, ``(x, cond)`` at scale 1 (``uncond`` is then not needed and may be None).

        Raises:
            ConfigError: conditions whose batch does not match ``x``, or a missing / differently
                shaped ``uncond`` when guiding.
        """
        x = np.asarray(x)
        return self.model_inputs(x), self.model_conditions(x.shape[0], cond, uncond)

    def model_inputs(self, x: np.ndarray) -> np.ndarray:
        """The model's input for one step: ``[x, x]`` when guiding, ``x`` at scale 1."""
        x = np.asarray(x)
        return np.concatenate([x, x]) if self.enabled else x

    def model_conditions(self, n: int, cond: np.ndarray, uncond: np.ndarray | None) -> np.ndarray:
        """The conditions fed with :meth:`model_inputs` of a batch of ``n``: ``[uncond, cond]`` when guiding,
        ``cond`` at scale 1. They do not change from step to step, so a sampler builds them once per batch.

        Raises:
            ConfigError: as :meth:`model_batch`.
        """
        cond = np.asarray(cond)
        if cond.ndim == 0 or cond.shape[0] != n:
            raise ConfigError(f"the conditions must have one row per sample: got shape {cond.shape} for "
                              f"{n} samples.")
        if not self.enabled:
            return cond
        if uncond is None:
            raise ConfigError(f"guidance scale {self.scale} needs unconditional conditions (the negative prompt "
                              "embeddings or the null class); pass them, or use scale 1.0.")
        uncond = np.asarray(uncond)
        if uncond.shape != cond.shape or uncond.dtype != cond.dtype:
            raise ConfigError(f"the unconditional conditions must match the conditional ones: got "
                              f"{uncond.shape} {uncond.dtype} against {cond.shape} {cond.dtype}.")
        return np.concatenate([uncond, cond])

    def combine(self, output: np.ndarray) -> np.ndarray:
        """Return the guided prediction from the model's output on :meth:`model_batch`'s input.

        When guiding, ``output`` is ``[uncond half, cond half]`` and the result is
        ``uncond + scale * (cond - uncond)``, then :func:`rescale_noise_cfg` if ``rescale > 0``; the
        arithmetic stays in the output's dtype (float32), as diffusers' does in torch. At scale 1
        ``output`` is the conditional prediction and is returned unchanged.

        Raises:
            EngineError: a guided output whose batch is not even.
        """
        if not self.enabled:
            return output
        if output.ndim == 0 or output.shape[0] % 2:
            raise EngineError(f"a guided model output must hold the unconditional and conditional halves, "
                              f"got shape {output.shape} (odd batch).")
        uncond, cond = np.split(output, 2)
        guided = uncond + output.dtype.type(self.scale) * (cond - uncond)
        if self.rescale > 0.0:
            guided = rescale_noise_cfg(guided, cond, self.rescale)
        return guided


def rescale_noise_cfg(noise_cfg: np.ndarray, noise_pred_cond: np.ndarray, guidance_rescale: float) -> np.ndarray:
    """diffusers' ``rescale_noise_cfg``: pull the guided prediction's per-sample std back to the
    conditional one's, then mix with the unrescaled prediction by ``guidance_rescale``.

    Guidance at a large scale inflates the prediction's std, which over-exposes images; Lin et al.
    (section 3.4, eq. 15-16) rescale it to the conditional prediction's std and blend with ``phi``
    to avoid flat-looking images. The std is over every axis but the batch; torch's ``std`` is
    unbiased (ddof=1), used here too, although only the ratio of two stds of the same size matters.
    A constant guided prediction (std 0) gives non-finite values, as in diffusers; the sampler
    refuses non-finite samples.
    """
    axes = tuple(range(1, noise_cfg.ndim))
    std_cond = noise_pred_cond.std(axis=axes, ddof=1, keepdims=True)
    std_cfg = noise_cfg.std(axis=axes, ddof=1, keepdims=True)
    rescaled = noise_cfg * (std_cond / std_cfg)
    phi = noise_cfg.dtype.type(guidance_rescale)
    return phi * rescaled + (noise_cfg.dtype.type(1.0) - phi) * noise_cfg


def guided_ddim(
    model: GuidedModel,
    sampler: DDIMSampler,
    timesteps: Sequence[int],
    latents: np.ndarray,
    cond: np.ndarray,
    uncond: np.ndarray | None,
    guidance: Guidance,
) -> np.ndarray:
    """Run DDIM (eta 0) with classifier-free guidance from ``latents`` over ``timesteps``.

    Each step calls ``model`` once, on the doubled batch when guiding, and feeds the guided
    prediction to ``sampler.step``; the previous timestep of the last step is -1 (alphabar_prev is
    the scheduler's final value), as in :func:`engines.sampler.denoise`. Initial-noise scaling is not
    done here: DDIM's ``init_noise_sigma`` is 1 and its ``scale_model_input`` the identity.

    Args:
        model: ``model(x, t, conditions) -> prediction`` (epsilon, x0 or v, per the sampler's config).
        sampler: the engines' DDIM sampler of the model's scheduler config.
        timesteps: strictly descending timesteps (the student's, or ``ddim_timesteps``).
        latents: float32 ``[n, C, H, W]`` initial noise; not modified.
        cond: the conditional conditions, batch ``n``.
        uncond: the unconditional ones, same shape and dtype; may be None at scale 1.
        guidance: the scale and rescale.

    Returns:
        The final float32 sample ``[n, C, H, W]``.

    Raises:
        ConfigError: empty or not strictly descending timesteps, or conditions that do not fit.
        EngineError: a model output of the wrong shape.
    """
    ts = [int(t) for t in timesteps]
    if not ts or any(a <= b for a, b in zip(ts, ts[1:])):
        raise ConfigError(f"timesteps must be a non-empty, strictly descending list, got {ts}.")
    x = np.array(latents, dtype=np.float32)  # a copy: the caller's noise is left as it was
    for t, prev_t in zip(ts, [*ts[1:], -1]):
        model_x, conditions = guidance.model_batch(x, cond, uncond)
        output = np.asarray(model(model_x, t, conditions))
        if output.shape != model_x.shape:
            raise EngineError(f"the model returned shape {output.shape} for an input of shape {model_x.shape} at "
                              f"timestep {t}; it must predict one tensor of the input's shape.")
        x = sampler.step(guidance.combine(output.astype(np.float32, copy=False)), t, prev_t, x)
    return x
