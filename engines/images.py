"""Turning samples into uint8 images and writing them (PNGs, a grid, an npz) atomically.

Every write goes to a temporary name in the target directory and is renamed at the end, so an
interrupted run never leaves a truncated PNG that an FID script would silently read.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from ._atomic import atomic_file, ensure_writable_dir
from .errors import OutputError

__all__ = ["NPZ_KEY", "to_uint8", "nchw_to_nhwc", "save_pngs", "save_grid", "save_npz"]

NPZ_KEY = "images"


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Map model space [-1, 1] to uint8 as diffusers' pipelines do: ``round(clip(x/2+0.5, 0, 1)*255)``."""
    x = np.clip(np.asarray(x, dtype=np.float32) / 2 + 0.5, 0.0, 1.0)
    return np.round(x * 255).astype(np.uint8)


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
    """Return a contiguous ``[N, H, W, C]`` copy of an ``[N, C, H, W]`` array."""
    return np.ascontiguousarray(np.transpose(x, (0, 2, 3, 1)))


def _check_images(images: np.ndarray) -> np.ndarray:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        desc = f"{images.dtype} {list(images.shape)}" if isinstance(images, np.ndarray) else type(images).__name__
        raise OutputError(f"Images must be a uint8 array [N, H, W, C] with C in 1, 3, 4, got {desc}.")
    return images


def _pil(image: np.ndarray):  # -> PIL.Image.Image
    from PIL import Image  # pillow is a core dependency; imported late to keep `engines` import light

    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _save_png(image: np.ndarray, path: Path) -> None:
    with atomic_file(path) as tmp:
        try:
            _pil(image).save(tmp, format="PNG")
        except OSError as exc:
            raise OutputError(f"Cannot write {path} ({exc}); check free space and permissions.") from exc


def save_pngs(images: np.ndarray, out_dir: str | os.PathLike[str], *, start_index: int = 0) -> list[Path]:
    """Write ``images[i]`` as ``out_dir/{start_index + i:05d}.png``; returns the paths.

    Raises:
        OutputError: bad images or an unwritable ``out_dir``.
    """
    images = _check_images(images)
    out_dir = ensure_writable_dir(out_dir, "image output")
    paths = []
    for i, image in enumerate(images):
        path = out_dir / f"{start_index + i:05d}.png"
        _save_png(image, path)
        paths.append(path)
    return paths


def save_grid(images: np.ndarray, path: str | os.PathLike[str], ncols: int = 8) -> Path:
    """Tile the images row-major into one PNG of ``ceil(n/ncols)`` rows (black where none is left).

    Raises:
        OutputError: bad images, ``ncols < 1`` or an unwritable location.
    """
    images = _check_images(images)
    if not isinstance(ncols, int) or ncols < 1:
        raise OutputError(f"ncols must be a positive integer, got {ncols!r}.")
    n, h, w, c = images.shape
    cols = min(ncols, n)
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i, image in enumerate(images):
        r, k = divmod(i, cols)
        grid[r * h:(r + 1) * h, k * w:(k + 1) * w] = image
    path = Path(path)
    _save_png(grid, path)
    return path


def save_npz(images: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Save the uint8 ``[N, H, W, C]`` batch as ``path`` with key ``"images"`` (for FID tools).

    Raises:
        OutputError: bad images or an unwritable location.
    """
    images = _check_images(images)
    path = Path(path)
    with atomic_file(path) as tmp:
        try:
            with open(tmp, "wb") as f:  # a file object, so numpy does not append ".npz" to the temp name
                np.savez(f, **{NPZ_KEY: images})
        except OSError as exc:
            raise OutputError(f"Cannot write {path} ({exc}); check free space and permissions.") from exc
    return path
