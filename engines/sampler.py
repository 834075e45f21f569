"""The sampling loop: initial noise -> DDIM over the student's timesteps -> uint8 images.

Backend-agnostic: it drives any :class:`~engines.runner.Runner`. The initial noise for all ``n``
images is drawn at once from ``numpy.random.default_rng(seed)`` (docs/CONTRACTS.md 4), so image ``i``
is the same whatever the batch size, and a seed means the same images on every machine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .ddim import DDIMConfig, DDIMSampler, ddim_timesteps
from .errors import ConfigError, EngineError
from .images import nchw_to_nhwc, to_uint8
from .manifest import EngineManifest, OnnxManifest
from .runner import Runner

__all__ = ["SampleResult", "denoise", "initial_noise", "sampling_timesteps", "sample_images"]


@dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous
class SampleResult:
    """Images and how long they took.

    Attributes:
        images: uint8 ``[n, H, W, C]``.
        timesteps: the descending timesteps that were run.
        seconds: wall time of the whole loop (model + DDIM updates).
        model_seconds: the part spent inside the runner.
    """

    images: np.ndarray
    timesteps: tuple[int, ...]
    seconds: float
    model_seconds: float

    @property
    def images_per_second(self) -> float:
        return len(self.images) / self.seconds if self.seconds > 0 else float("inf")


def initial_noise(n: int, image_shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Return the float32 ``[n, C, H, W]`` starting noise of the contract (all ``n`` at once)."""
    return np.random.default_rng(seed).standard_normal((n, *image_shape), dtype=np.float32)


def sampling_timesteps(manifest: OnnxManifest, steps: int | None = None) -> tuple[int, ...]:
    """The student's timesteps, or diffusers' uniform grid of ``steps`` for the manifest's config."""
    if steps is None:
        return tuple(manifest.student_timesteps)
    return tuple(int(t) for t in ddim_timesteps(_ddim_config(manifest), steps))


def _ddim_config(manifest: OnnxManifest) -> DDIMConfig:
    return DDIMConfig.from_dict({**manifest.scheduler_config, "prediction_type": manifest.prediction_type})


def sample_images(
    runner: Runner,
    manifest: OnnxManifest | EngineManifest,
    n: int,
    seed: int,
    steps: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> SampleResult:
    """Generate ``n`` images with DDIM (eta 0).

    Args:
        runner: any backend runner; activated (and deactivated) here if it is not active yet.
        manifest: the ONNX or engine manifest of the model the runner runs.
        n: number of images (> 0).
        seed: seed of the initial noise.
        steps: None for the student's own timesteps (what it was calibrated / distilled for), or a
            number of uniformly spaced steps from the scheduler config.
        batch_size: images per model call; does not change the images.
        progress: show a tqdm bar over batches x steps on stderr.

    Returns:
        A :class:`SampleResult` with uint8 ``[n, H, W, C]`` images and timings.

    Raises:
        ConfigError: ``n``, ``batch_size`` or ``steps`` out of range, or an unsupported scheduler config.
        RunnerError: the runner rejects the inputs.
    """
    onnx = manifest.onnx if isinstance(manifest, EngineManifest) else manifest
    for name, value in (("n", n), ("batch_size", batch_size)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    timesteps = sampling_timesteps(onnx, steps)
    noise = initial_noise(int(n), onnx.image_shape, seed)
    start = time.perf_counter()
    x_all, model_seconds = denoise(runner, onnx, noise, timesteps, batch_size=batch_size, progress=progress,
                                   started=start)
    seconds = time.perf_counter() - start
    return SampleResult(images=nchw_to_nhwc(to_uint8(x_all)), timesteps=timesteps, seconds=seconds, model_seconds=model_seconds)


def denoise(
    runner: Runner,
    manifest: OnnxManifest,
    x_all: np.ndarray,
    timesteps: tuple[int, ...],
    batch_size: int = 16,
    progress: bool = True,
    started: float | None = None,
) -> tuple[np.ndarray, float]:
    """Run DDIM (eta 0) from the noise ``x_all`` over ``timesteps``; returns (x_0, seconds in the runner).

    Split out of :func:`sample_images` so that a slice of :func:`initial_noise` can be denoised on
    its own (several processes, each with a runner) and still give exactly the images of one
    ``sample_images`` call: every image's trajectory depends only on its own noise. ``x_all`` is
    overwritten with the result.
    """
    sampler = DDIMSampler(_ddim_config(manifest))
    pairs = list(zip(timesteps, [*timesteps[1:], -1]))
    out_name = manifest.output_name
    n = x_all.shape[0]

    from tqdm import tqdm  # core dependency; imported here to keep `engines` import light

    started_here = not runner.is_active
    if started_here:
        runner.activate()
    model_seconds = 0.0
    start = time.perf_counter() if started is None else started
    try:
        n_batches = -(-n // batch_size)
        with tqdm(total=n_batches * len(pairs), disable=not progress, unit="step", desc="sampling", dynamic_ncols=True) as bar:
            for b0 in range(0, n, batch_size):
                x = x_all[b0:b0 + batch_size]
                for t, prev_t in pairs:
                    feed = {"sample": x, "timestep": np.full((x.shape[0],), t, dtype=np.float32)}
                    out = runner.infer(feed)[out_name]
                    model_seconds += runner.last_inference_time or 0.0
                    x = sampler.step(out, t, prev_t, x)
                    bar.update(1)
                x_all[b0:b0 + batch_size] = x
                elapsed = time.perf_counter() - start
                bar.set_postfix(img_per_s=f"{(b0 + x.shape[0]) / elapsed:.2f}" if elapsed > 0 else "inf")
    finally:
        if started_here:
            runner.deactivate()
    if not np.isfinite(x_all).all():
        raise EngineError("Sampling produced NaN or infinite values; check the model and its scheduler config.")
    return x_all, model_seconds
