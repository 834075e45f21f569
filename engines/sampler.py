"""The sampling loop: initial noise -> DDIM over the student's timesteps -> uint8 images.

Backend-agnostic: it drives any :class:`~engines.runner.Runner`. The initial noise of the contract
(docs/CONTRACTS.md 4) is ``numpy.random.default_rng(seed).standard_normal((n, C, H, W), float32)``;
:class:`NoiseStream` draws it chunk by chunk from that one generator, which gives exactly the same
numbers (a tested property of numpy's float32 normals), so memory does not grow with ``n`` and image
``i`` is the same for any ``n``.

Conditional engines (engines.conditioning): each model call also feeds the batch's conditions
(``class_labels``: image i's class), and with guidance (scale > 1) runs on the doubled batch
[unconditional, conditional] and combines the halves as diffusers does (engines.guidance.Guidance),
inside the same loop. Image i's condition depends on i alone, so it too is the same for any batch size
and for a resumed run.

Batch size: ONNX Runtime's CPU kernels sum in another order at some batch shapes (measured on the
builtin W8A8 engine, 64 images: batch 7 changed 1 image by up to 6 levels against batch 16, batch 1
changed 53; batches 8, 16, 24, 40, 48, 64 gave identical images). Every model call is therefore
padded with zero images to a multiple of :data:`MODEL_BATCH_MULTIPLE`; with that, every batch size
gave byte-identical images (1 and 2 threads), at the cost of the padded slots. A guided call pads
each half to that multiple, so the doubled batch is one too.

Latent engines (a manifest with ``decoded_image_shape``): the loop runs in latent space and each finished
batch goes through the VAE decoder part (``decode``: engines.latent_parts.VaeDecoder), padded the same
way, before it becomes uint8 images; the images then have the decoded shape, not ``image_shape``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from .conditioning import SampleConditions
from .ddim import DDIMConfig, DDIMSampler, ddim_timesteps
from .errors import ConfigError, EngineError
from .images import nchw_to_nhwc, to_uint8
from .manifest import EngineManifest, OnnxManifest
from .runner import Runner

__all__ = ["MODEL_BATCH_MULTIPLE", "Decode", "NoiseStream", "SampleResult", "SampledBatch", "decode_latents", "denoise",
           "initial_noise", "iter_sample_batches", "sample_conditions_for", "sampling_timesteps", "sample_images"]

MODEL_BATCH_MULTIPLE = 8
"""Every model call runs a multiple of this many images (zero images pad the rest), so the batch
size never changes the images (see the module docstring)."""
_SKIP_CHUNK = 256
Decode = Callable[[np.ndarray], np.ndarray]
"""A latent engine's final latents [n, C, h, w] -> images [n, *decoded_image_shape] in [-1, 1]."""


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


class NoiseStream:
    """The noise of :func:`initial_noise`, drawn in chunks from one ``default_rng(seed)``.

    ``draw(a)`` then ``draw(b)`` equals ``initial_noise(a + b, ...)`` split at ``a``; :meth:`skip`
    draws and discards (in bounded chunks), so a resumed run keeps image ``i`` unchanged.
    """

    def __init__(self, image_shape: tuple[int, int, int], seed: int) -> None:
        self.image_shape = tuple(int(v) for v in image_shape)
        self._rng = np.random.default_rng(seed)
        self.position = 0

    def draw(self, k: int) -> np.ndarray:
        out = self._rng.standard_normal((int(k), *self.image_shape), dtype=np.float32)
        self.position += int(k)
        return out

    def skip(self, k: int) -> None:
        k = int(k)
        while k > 0:
            step = min(k, _SKIP_CHUNK)
            self.draw(step)
            k -= step


def sampling_timesteps(manifest: OnnxManifest, steps: int | None = None) -> tuple[int, ...]:
    """The student's timesteps, or diffusers' uniform grid of ``steps`` for the manifest's config."""
    if steps is None:
        return tuple(manifest.student_timesteps)
    return tuple(int(t) for t in ddim_timesteps(_ddim_config(manifest), steps))


def sample_conditions_for(manifest: OnnxManifest, conditions: SampleConditions | None) -> SampleConditions | None:
    """``conditions``, or a conditional manifest's defaults when None (image i gets class ``i % classes`` at
    the manifest's guidance scale); None for an unconditional manifest.

    Raises:
        ConfigError: conditions for an unconditional model, or for another input than the model's.
    """
    spec = manifest.conditioning
    if spec is None:
        if conditions is not None:
            raise ConfigError("this model is unconditional, so it takes no conditions; pass conditions=None.")
        return None
    if conditions is None:
        return spec.sample_conditions()
    if conditions.input != spec.input:
        raise ConfigError(f"the conditions feed {conditions.input.name!r}, but this {spec.kind}-conditional model's "
                          f"input is {spec.input.name!r}.")
    return conditions


def _check_decode(manifest: OnnxManifest, decode: Decode | None) -> None:
    if manifest.decoded_image_shape is not None and decode is None:
        raise ConfigError("this engine's model is latent: its samples are latents, which its VAE decoder part turns "
                          "into images; pass decode=EngineParts(engine_dir, manifest).decoder() "
                          "(engines.latent_parts), as pqcad-deploy sample does.")
    if manifest.decoded_image_shape is None and decode is not None:
        raise ConfigError("this engine's model samples images, not latents; pass decode=None.")


def decode_latents(decode: Decode, latents: np.ndarray) -> np.ndarray:
    """``decode(latents)``, the call padded with zero latents to a multiple of :data:`MODEL_BATCH_MULTIPLE`
    (as every model call: the batch size must not change the images)."""
    k = len(latents)
    rows = -(-k // MODEL_BATCH_MULTIPLE) * MODEL_BATCH_MULTIPLE
    if rows != k:
        latents = np.concatenate([latents, np.zeros((rows - k, *latents.shape[1:]), dtype=latents.dtype)])
    return decode(latents)[:k]


def _ddim_config(manifest: OnnxManifest) -> DDIMConfig:
    return DDIMConfig.from_dict({**manifest.scheduler_config, "prediction_type": manifest.prediction_type})


@dataclass(frozen=True, eq=False)
class SampledBatch:
    """One finished batch of :func:`iter_sample_batches`: images ``start .. start + len(images) - 1``."""

    start: int
    images: np.ndarray
    model_seconds: float


def _check_counts(n: int, batch_size: int, start: int = 0) -> None:
    for name, value in (("n", n), ("batch_size", batch_size)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
    if not isinstance(start, (int, np.integer)) or isinstance(start, bool) or not 0 <= start <= n:
        raise ConfigError(f"start must be an integer between 0 and n={n}, got {start!r}.")


def iter_sample_batches(
    runner: Runner,
    manifest: OnnxManifest | EngineManifest,
    indices: range,
    seed: int,
    steps: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
    conditions: SampleConditions | None = None,
    decode: Decode | None = None,
) -> Iterator[SampledBatch]:
    """Generate the images ``indices`` (``range(start, n)``) batch by batch (uint8 ``[k, H, W, C]``),
    holding one batch.

    The noise of the images before ``indices.start`` is drawn and discarded, so every image equals the
    one a single :func:`sample_images` call of ``n`` images makes (a resumed `sample` continues at
    the first missing image). The runner is activated here if it is not active yet, and released
    when the generator finishes or is closed. ``conditions``: a conditional engine's (None: its defaults,
    :func:`sample_conditions_for`). ``decode``: a latent engine's VAE decoder (required there, refused
    elsewhere), applied to each finished batch.

    Raises:
        ConfigError: ``indices`` not a ``range(start, n)`` with ``0 <= start <= n`` and ``n > 0``, or
            ``batch_size`` or ``steps`` out of range.
        RunnerError, EngineError: from the runner, or non-finite samples.
    """
    onnx = manifest.onnx if isinstance(manifest, EngineManifest) else manifest
    if not isinstance(indices, range) or indices.step != 1:
        raise ConfigError(f"indices must be a range(start, n) of consecutive images, got {indices!r}.")
    start, n = indices.start, indices.stop
    _check_counts(n, batch_size, start)
    timesteps = sampling_timesteps(onnx, steps)
    conditions = sample_conditions_for(onnx, conditions)
    _check_decode(onnx, decode)
    noise = NoiseStream(onnx.image_shape, seed)
    noise.skip(start)

    from tqdm import tqdm  # core dependency; imported here to keep `engines` import light

    started_here = not runner.is_active
    if started_here:
        runner.activate()
    t0 = time.perf_counter()
    try:
        with tqdm(total=(-(-(n - start) // batch_size)) * len(timesteps), disable=not progress, unit="step",
                  desc="sampling", dynamic_ncols=True) as bar:
            for b0 in range(start, n, batch_size):
                x = noise.draw(min(batch_size, n - b0))
                x, model_seconds = denoise(runner, onnx, x, timesteps, batch_size=batch_size, progress=False,
                                           bar=bar, conditions=conditions, first_index=b0)
                images = x if decode is None else decode_latents(decode, x)
                elapsed = time.perf_counter() - t0
                bar.set_postfix(img_per_s=f"{(b0 + len(x) - start) / elapsed:.2f}" if elapsed > 0 else "inf")
                yield SampledBatch(b0, nchw_to_nhwc(to_uint8(images)), model_seconds)
    finally:
        if started_here:
            runner.deactivate()


def sample_images(
    runner: Runner,
    manifest: OnnxManifest | EngineManifest,
    n: int,
    seed: int,
    steps: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
    conditions: SampleConditions | None = None,
    decode: Decode | None = None,
) -> SampleResult:
    """Generate ``n`` images with DDIM (eta 0), all in memory (see :func:`iter_sample_batches` to stream).

    Args:
        runner: any backend runner; activated (and deactivated) here if it is not active yet.
        manifest: the ONNX or engine manifest of the model the runner runs.
        n: number of images (> 0).
        seed: seed of the initial noise.
        steps: None for the student's own timesteps (what it was calibrated / distilled for), or a
            number of uniformly spaced steps from the scheduler config.
        batch_size: images per model call; does not change the images (calls are padded to a
            multiple of :data:`MODEL_BATCH_MULTIPLE`).
        progress: show a tqdm bar over batches x steps on stderr.
        conditions: a conditional engine's labels and guidance (None: its defaults, image i of class
            ``i % classes`` at the manifest's guidance scale, :func:`sample_conditions_for`).
        decode: a latent engine's VAE decoder (engines.latent_parts.EngineParts.decoder); None otherwise.

    Returns:
        A :class:`SampleResult` with uint8 ``[n, H, W, C]`` images (the decoded shape for a latent engine)
        and timings.

    Raises:
        ConfigError: ``n``, ``batch_size`` or ``steps`` out of range, or an unsupported scheduler config.
        RunnerError: the runner rejects the inputs.
    """
    onnx = manifest.onnx if isinstance(manifest, EngineManifest) else manifest
    _check_counts(n, batch_size)
    timesteps = sampling_timesteps(onnx, steps)
    c, h, w = onnx.output_image_shape
    images = np.empty((int(n), h, w, c), dtype=np.uint8)
    model_seconds = 0.0
    start = time.perf_counter()
    for batch in iter_sample_batches(runner, manifest, range(n), seed, steps=steps, batch_size=batch_size,
                                     progress=progress, conditions=conditions, decode=decode):
        images[batch.start:batch.start + len(batch.images)] = batch.images
        model_seconds += batch.model_seconds
    seconds = time.perf_counter() - start
    return SampleResult(images=images, timesteps=timesteps, seconds=seconds, model_seconds=model_seconds)


def denoise(
    runner: Runner,
    manifest: OnnxManifest,
    x_all: np.ndarray,
    timesteps: tuple[int, ...],
    batch_size: int = 16,
    progress: bool = True,
    started: float | None = None,
    bar=None,
    conditions: SampleConditions | None = None,
    first_index: int = 0,
) -> tuple[np.ndarray, float]:
    """Run DDIM (eta 0) from the noise ``x_all`` over ``timesteps``; returns (x_0, seconds in the runner).

    Split out of :func:`sample_images` so that a slice of :func:`initial_noise` can be denoised on
    its own (several processes, each with a runner) and still give exactly the images of one
    ``sample_images`` call: every image's trajectory depends only on its own noise. ``x_all`` is
    overwritten with the result. Each model call is padded with zero images to a multiple of
    :data:`MODEL_BATCH_MULTIPLE` (the padding is discarded), so the result does not depend on the
    batch size. ``bar``: an open tqdm bar to advance instead of a new one.

    A conditional model's calls also feed the conditions of images ``first_index + i`` (``x_all[i]`` is
    image ``first_index + i`` of the run; ``conditions`` None: the manifest's defaults,
    :func:`sample_conditions_for`), guided as :class:`~engines.guidance.Guidance` does: at scale > 1 each
    call runs ``[x, x]`` with ``[uncond, cond]`` and the halves are combined before the DDIM step.
    """
    conditions = sample_conditions_for(manifest, conditions)
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
        own_bar = bar is None
        with contextlib.ExitStack() as stack:
            if own_bar:
                bar = stack.enter_context(tqdm(total=n_batches * len(pairs), disable=not progress, unit="step",
                                               desc="sampling", dynamic_ncols=True))
            for b0 in range(0, n, batch_size):
                x = x_all[b0:b0 + batch_size]
                k = x.shape[0]
                rows = -(-k // MODEL_BATCH_MULTIPLE) * MODEL_BATCH_MULTIPLE
                padded = np.zeros((rows, *x.shape[1:]), dtype=np.float32) if rows != k else None
                if conditions is not None:  # the padding rows get the conditions of the images after these
                    cond, uncond = conditions.halves(np.arange(first_index + b0, first_index + b0 + rows))
                    model_cond = conditions.guidance.model_conditions(rows, cond, uncond)  # the same every step
                for t, prev_t in pairs:
                    if padded is not None:
                        padded[:k] = x
                    model_x = x if padded is None else padded
                    if conditions is None:
                        feed = {"sample": model_x, "timestep": np.full((rows,), t, dtype=np.float32)}
                        out = runner.infer(feed)[out_name][:k]
                    else:
                        model_x = conditions.guidance.model_inputs(model_x)
                        feed = {"sample": model_x, "timestep": np.full((len(model_x),), t, dtype=np.float32),
                                conditions.input.name: model_cond}
                        out = conditions.guidance.combine(runner.infer(feed)[out_name])[:k]
                    model_seconds += runner.last_inference_time or 0.0
                    x = sampler.step(out, t, prev_t, x)
                    bar.update(1)
                x_all[b0:b0 + batch_size] = x
                if own_bar:
                    elapsed = time.perf_counter() - start
                    bar.set_postfix(img_per_s=f"{(b0 + k) / elapsed:.2f}" if elapsed > 0 else "inf")
    finally:
        if started_here:
            runner.deactivate()
    if not np.isfinite(x_all).all():
        raise EngineError("Sampling produced NaN or infinite values; check the model and its scheduler config.")
    return x_all, model_seconds
