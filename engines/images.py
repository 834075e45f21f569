"""Turning samples into uint8 images and writing them (PNGs, a grid, an npz) atomically.

Every write goes to a temporary name in the target directory and is renamed at the end, so an
interrupted run never leaves a truncated PNG that an FID script would silently read.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ._atomic import atomic_file, ensure_writable_dir
from .errors import OutputError

__all__ = ["NPZ_KEY", "to_uint8", "nchw_to_nhwc", "save_pngs", "save_grid", "save_npz", "load_png",
           "save_npz_from_pngs", "is_images_npz"]

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


def load_png(path: str | os.PathLike[str], channels: int) -> np.ndarray:
    """Read one PNG written by :func:`save_pngs` back as uint8 ``[H, W, channels]``.

    Raises:
        OutputError: the file is missing or unreadable, or has another channel count.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im, dtype=np.uint8)
    except OSError as exc:
        raise OutputError(f"Cannot read {path} ({exc}); delete it and rerun with --resume.") from exc
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[-1] != channels:
        raise OutputError(f"{path} has {arr.shape[-1]} channels, expected {channels}; delete it and rerun with --resume.")
    return arr


def save_npz_from_pngs(pngs: Sequence[str | os.PathLike[str]], path: str | os.PathLike[str],
                       image_shape: tuple[int, int, int]) -> Path:
    """Write the PNGs as one ``.npz`` (key ``"images"``, uint8 ``[N, H, W, C]``), one image in memory at a time.

    The file is what ``np.savez`` writes (a stored zip with ``images.npy``), built by streaming the npy
    header and then each image's bytes into the zip entry (zip64, so any size works); ``np.load(path)
    ["images"]`` reads it. ``image_shape`` is ``(H, W, C)``.

    Raises:
        OutputError: an unreadable PNG, one of another shape, or an unwritable location.
    """
    h, w, c = (int(v) for v in image_shape)
    path = Path(path)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (len(pngs), h, w, c)}
    with atomic_file(path) as tmp:
        try:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
                with zf.open(f"{NPZ_KEY}.npy", "w", force_zip64=True) as entry:
                    np.lib.format.write_array_header_1_0(entry, header)
                    for png in pngs:
                        image = load_png(png, c)
                        if image.shape != (h, w, c):
                            raise OutputError(f"{png} has shape {image.shape}, expected {(h, w, c)}.")
                        entry.write(np.ascontiguousarray(image).tobytes())
        except OSError as exc:
            raise OutputError(f"Cannot write {path} ({exc}); check free space and permissions.") from exc
    return path


def is_images_npz(path: str | os.PathLike[str]) -> bool:
    """True for an .npz holding only the key ``"images"`` (what ``sample --npz`` writes), read lazily."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return list(data.files) == [NPZ_KEY]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return False
