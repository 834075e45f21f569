"""`sample`: engine directory -> PNGs, a grid and optionally an .npz, written atomically.

All images are generated in memory first and the output directory appears only when every file is
written, so an interrupted run never leaves a folder that looks like a finished one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ._atomic import staged_directory
from .errors import OutputError
from .images import save_grid, save_npz, save_pngs
from .manifest import EngineManifest, verify_engine
from .runner import Runner
from .sampler import SampleResult, sample_images

__all__ = ["GRID_FILE", "GenerateResult", "open_runner", "generate_to_directory"]

GRID_FILE = "grid.png"


@dataclass(frozen=True)
class GenerateResult:
    result: SampleResult
    out_dir: Path
    npz: Path | None
    manifest: EngineManifest


def open_runner(engine_dir: str | os.PathLike[str], threads: int | None = None) -> tuple[Runner, EngineManifest]:
    """Verify an engine directory and return an (inactive) runner for its backend."""
    manifest = verify_engine(engine_dir)
    model = Path(engine_dir) / manifest.model_file
    if manifest.backend == "tensorrt":
        from .tensorrt_runner import TensorRTRunner

        return TensorRTRunner(model, manifest.onnx), manifest
    from .ort import OnnxRuntimeRunner

    return OnnxRuntimeRunner(model, manifest.onnx, intra_op_threads=threads), manifest


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
) -> GenerateResult:
    """Sample `n` images from an engine and write NNNNN.png files plus grid.png (and an .npz)."""
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise OutputError(f"{out_dir} already exists and is not empty; pass --overwrite or choose another directory.")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"{out_dir} exists and is a file; choose a directory for the images.")
    if npz is not None and Path(npz).exists() and not overwrite:
        raise OutputError(f"{npz} already exists; pass --overwrite or choose another .npz path.")
    runner, manifest = open_runner(engine_dir, threads)
    with runner:
        result = sample_images(runner, manifest, n, seed, steps=steps, batch_size=batch_size, progress=progress)
    with staged_directory(out_dir, overwrite=overwrite, error=OutputError) as tmp:
        save_pngs(result.images, tmp)
        save_grid(result.images, tmp / GRID_FILE, ncols=min(8, len(result.images)))
        # inside the staged block: an unwritable --npz must not leave a finished-looking image folder
        npz_path = save_npz(result.images, npz) if npz is not None else None
    return GenerateResult(result=result, out_dir=out_dir, npz=npz_path, manifest=manifest)
