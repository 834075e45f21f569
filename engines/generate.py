"""`sample`: engine directory -> PNGs, a grid and optionally an .npz, streamed and resumable.

Images are written batch by batch into ``OUT.partial/`` (a sibling of OUT) while they are made, so
memory does not grow with ``n`` and an interrupted run keeps what is finished. ``OUT.partial/
samples.json`` records what is being made (engine model sha256, seed, timesteps, image shape, n, and for a
conditional engine its ``conditioning``: the class labels or prompts cycled over the images and the guidance
scale);
``resume=True`` continues such a folder when they match, regenerating and discarding the noise of
the finished images so that image ``i`` is unchanged. When every image is there, ``grid.png`` (the
first :data:`GRID_MAX` images) and the optional .npz are written and the folder is published as OUT
with :func:`engines._atomic.publish_directory`, so OUT only ever appears complete. ``output_lock(OUT)``
is held for the whole run.

A latent engine (engines.latent_parts) reads its conditions from its parts (the class table, or the text
encoder on the prompts, once before sampling) and decodes each finished batch of latents through its
VAE decoder part; the PNGs have the decoded image shape.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ._atomic import (atomic_file, check_output_dir, check_output_file, ensure_writable_dir, output_lock,
                      publish_directory)
from .conditioning import SampleConditions, sample_conditions
from .errors import OutputError
from .images import is_images_npz, load_png, save_grid, save_npz_from_pngs, save_pngs
from .latent_parts import EngineParts
from .manifest import EngineManifest, verify_engine
from .runner import Runner
from .sampler import SampledBatch, _check_counts, iter_sample_batches, sampling_timesteps

__all__ = ["GRID_FILE", "GRID_MAX", "SAMPLES_FILE", "SAMPLES_FORMAT", "PARTIAL_SUFFIX", "GenerateResult",
           "open_runner", "partial_dir", "image_name", "read_samples_record", "generate_to_directory"]

GRID_FILE = "grid.png"
GRID_MAX = 64
"""grid.png shows at most the first 64 images (8 x 8)."""
SAMPLES_FILE = "samples.json"
SAMPLES_FORMAT = "pqcad-samples"
SAMPLES_VERSION = 1
PARTIAL_SUFFIX = ".partial"
_MATCH_KEYS = (("engine_model_sha256", "engine model (sha256)"), ("seed", "seed"), ("timesteps", "timesteps"),
               ("image_shape", "image shape"),
               ("conditioning", "conditioning (class labels or prompts, guidance scale)"))
"""What a --resume must match; ``conditioning`` is absent (None) for an unconditional engine."""


@dataclass(frozen=True)
class GenerateResult:
    """What a :func:`generate_to_directory` run wrote.

    Attributes:
        out_dir: the published image folder.
        npz: the .npz written, or None.
        manifest: the engine's manifest.
        n: images in ``out_dir``.
        reused: images kept from an interrupted run (``resume``), not generated again.
        timesteps: the DDIM timesteps run.
        seconds: wall time of generating the new images.
        model_seconds: the part of it inside the runner.
        conditions: a conditional engine's labels and guidance (engines.conditioning), or None.
    """

    out_dir: Path
    npz: Path | None
    manifest: EngineManifest
    n: int
    reused: int
    timesteps: tuple[int, ...]
    seconds: float
    model_seconds: float
    conditions: SampleConditions | None = None

    @property
    def images_per_second(self) -> float:
        made = self.n - self.reused
        return made / self.seconds if self.seconds > 0 else float("inf")


def open_runner(engine_dir: str | os.PathLike[str], threads: int | None = None) -> tuple[Runner, EngineManifest]:
    """Verify an engine directory and return an (inactive) runner for its backend."""
    manifest = verify_engine(engine_dir)
    return runner_for(engine_dir, manifest, threads), manifest


def runner_for(engine_dir: str | os.PathLike[str], manifest: EngineManifest, threads: int | None = None) -> Runner:
    from .backends import engine_backend

    return engine_backend(manifest.backend).runner(Path(engine_dir) / manifest.model_file, manifest, threads)


def partial_dir(out_dir: str | os.PathLike[str]) -> Path:
    """``OUT.partial``: where ``sample`` writes OUT's images until they are all there."""
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + PARTIAL_SUFFIX)


def image_name(i: int) -> str:
    return f"{i:05d}.png"


def read_samples_record(folder: str | os.PathLike[str]) -> dict | None:
    """The ``samples.json`` of a folder written by ``sample``, or None if it has none (or not ours)."""
    try:
        data = json.loads((Path(folder) / SAMPLES_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != SAMPLES_FORMAT or data.get("tool") != "pqcad-deploy":
        return None
    return data


def _record(manifest: EngineManifest, n: int, seed: int, timesteps: tuple[int, ...], batch_size: int,
            conditioning: dict | None = None) -> dict:
    c, h, w = manifest.onnx.output_image_shape
    record = {"tool": "pqcad-deploy", "format": SAMPLES_FORMAT, "version": SAMPLES_VERSION,
              "engine_model_sha256": manifest.model_sha256, "seed": int(seed), "timesteps": [int(t) for t in timesteps],
              "image_shape": [int(h), int(w), int(c)], "n": int(n), "batch_size": int(batch_size),
              "images": f"{image_name(0)} .. {image_name(n - 1)}"}
    if conditioning is not None:  # image i: class_labels[i % len(class_labels)] (or prompts[i % len(prompts)])
        record["conditioning"] = conditioning
    return record


def _write_record(folder: Path, record: dict) -> None:
    with atomic_file(folder / SAMPLES_FILE) as tmp:
        tmp.write_text(json.dumps(record, sort_keys=True, indent=1) + "\n")


def _finished_count(folder: Path, n: int) -> int:
    """How many images 0, 1, ... are already there (each PNG is renamed into place only when complete)."""
    k = 0
    while k < n and (folder / image_name(k)).is_file():
        k += 1
    return k


def _clean_partial(folder: Path, keep: int, n: int) -> None:
    """Remove temporary files a killed run left and images beyond what is kept (keeps the marker's list exact)."""
    for p in folder.iterdir():
        stale_temp = p.name.startswith(".") and p.name.endswith(".tmp")
        extra_image = p.suffix == ".png" and p.stem.isdigit() and int(p.stem) >= keep
        if p.is_dir() and stale_temp:
            shutil.rmtree(p, ignore_errors=True)
        elif stale_temp or extra_image or p.name == GRID_FILE:
            p.unlink(missing_ok=True)


def _prepare_partial(partial: Path, record: dict, *, resume: bool, overwrite: bool) -> int:
    """Create, continue or refuse ``OUT.partial``; returns how many finished images it keeps."""
    n = record["n"]
    if partial.exists() and not partial.is_dir():
        raise OutputError(f"{partial} exists and is not a directory; move it away (sample writes its images there).")
    if partial.is_dir():
        old = read_samples_record(partial)
        if old is None:
            raise OutputError(f"{partial} exists but was not written by pqcad-deploy sample (no {SAMPLES_FILE}); "
                              "move it away or choose another -o.")
        kept = _finished_count(partial, min(n, int(old.get("n", n))))
        if resume:
            for key, label in _MATCH_KEYS:
                if old.get(key) != record.get(key):
                    raise OutputError(f"cannot --resume {partial}: its {label} is {old.get(key)!r}, this run's is "
                                      f"{record.get(key)!r}; rerun with the same options, or pass --overwrite instead "
                                      "of --resume to start over.")
            _clean_partial(partial, kept, n)
            _write_record(partial, record)
            return kept
        if not overwrite:
            raise OutputError(f"{partial} holds an interrupted sample run ({kept} of {old.get('n')} images); pass "
                              "--resume to continue it or --overwrite to discard it.")
        shutil.rmtree(partial)
    try:
        partial.mkdir(parents=True)
    except OSError as exc:
        raise OutputError(f"Cannot create {partial} ({exc.strerror or exc}); choose a writable location.") from exc
    _write_record(partial, record)
    return 0


def generate_to_directory(
    engine_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    n: int,
    seed: int = 0,
    steps: int | None = None,
    npz: str | os.PathLike[str] | None = None,
    batch_size: int = 16,
    overwrite: bool = False,
    threads: int | None = None,
    progress: bool = True,
    resume: bool = False,
    grid: bool = True,
    on_batch: Callable[[SampledBatch], None] | None = None,
    class_labels: Sequence[int] | None = None,
    guidance_scale: float | None = None,
    prompts: Sequence[str] | None = None,
) -> GenerateResult:
    """Sample ``n`` images from an engine into ``out_dir`` (NNNNN.png, samples.json, grid.png) and an optional .npz.

    Args:
        resume: continue ``OUT.partial`` of an interrupted run with the same engine, seed and timesteps.
        grid: write ``grid.png`` of the first :data:`GRID_MAX` images.
        on_batch: called after each batch's PNGs are written (tests use it to interrupt a run).
        class_labels: a class-conditional engine's labels, cycled over the images (image i gets
            ``class_labels[i % len]``); None: image i gets class ``i % num_classes``, as in PyTorch.
        guidance_scale: a conditional engine's classifier-free guidance scale; None: its manifest's (the
            scale the student was calibrated at). Both are refused for an unconditional engine.
        prompts: a text-conditional engine's prompts, cycled over the images (image i gets
            ``prompts[i % len]``); required there, refused elsewhere.

    Raises:
        OutputError: OUT, OUT.partial or the .npz may not be written (checked before sampling), or a
            resume does not match. KeyboardInterrupt: with a message saying how many images are kept.
        ConfigError, ManifestError, RunnerError, EngineError: bad counts, engine, conditions or samples.
    """
    out_dir = check_output_dir(out_dir, overwrite=overwrite, kind="samples", error=OutputError)
    npz_path = None
    if npz is not None:
        npz_path = check_output_file(npz, overwrite=overwrite, error=OutputError, is_ours=is_images_npz,
                                     what="pqcad-deploy image .npz")
        if npz_path.resolve().parent == out_dir.resolve() or npz_path.resolve().parent == partial_dir(out_dir).resolve():
            raise OutputError(f"--npz {npz_path} is inside the image folder; write it next to it instead.")
    _check_counts(n, batch_size)
    manifest = verify_engine(engine_dir)
    timesteps = sampling_timesteps(manifest.onnx, steps)
    parts = EngineParts(engine_dir, manifest, threads)
    conditions = sample_conditions(manifest.onnx.conditioning, parts=parts, class_labels=class_labels,
                                   prompts=prompts, guidance_scale=guidance_scale)
    record = _record(manifest, n, seed, timesteps, batch_size, None if conditions is None else conditions.to_record())
    c, h, w = manifest.onnx.output_image_shape
    partial = partial_dir(out_dir)
    with output_lock(out_dir, error=OutputError):
        ensure_writable_dir(partial.parent, "image output")
        kept = _prepare_partial(partial, record, resume=resume, overwrite=overwrite)
        done = kept
        model_seconds = 0.0
        started = time.perf_counter()
        try:
            if kept < n:
                runner = runner_for(engine_dir, manifest, threads)
                for batch in iter_sample_batches(runner, manifest, range(kept, n), seed, steps=steps,
                                                 batch_size=batch_size, progress=progress, conditions=conditions,
                                                 decode=parts.decoder()):
                    save_pngs(batch.images, partial, start_index=batch.start)
                    done = batch.start + len(batch.images)
                    model_seconds += batch.model_seconds
                    if on_batch is not None:
                        on_batch(batch)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"interrupted; {done} of {n} images are kept in {partial}; rerun the same "
                                    "command with --resume to continue.") from None
        except OutputError as exc:
            raise OutputError(f"{exc} ({done} of {n} images are kept in {partial}; rerun with --resume once "
                              "fixed.)") from exc
        seconds = time.perf_counter() - started
        pngs = [partial / image_name(i) for i in range(n)]
        if grid:
            first = np.stack([load_png(p, c) for p in pngs[:GRID_MAX]])
            save_grid(first, partial / GRID_FILE, ncols=min(8, len(first)))
        if npz_path is not None:
            save_npz_from_pngs(pngs, npz_path, (h, w, c))
        publish_directory(partial, out_dir, overwrite=overwrite, error=OutputError, kind="samples")
    return GenerateResult(out_dir=out_dir, npz=npz_path, manifest=manifest, n=n, reused=kept,
                          timesteps=timesteps, seconds=seconds, model_seconds=model_seconds,
                          conditions=conditions)
