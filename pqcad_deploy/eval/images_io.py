"""Reading images for FID: PNG folders, ``.npz`` arrays and the Fashion-MNIST idx files.

Everything returns one layout, uint8 ``N x H x W x C`` with ``C`` in (1, 3), because that is what
samplers write and what :mod:`pqcad_deploy.eval.inception` consumes; converting early means the
feature extractor never has to guess a layout or a value range.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Literal

import numpy as np

from pqcad_deploy.eval.errors import DatasetNotFoundError, FidError, ImageInputError

__all__ = [
    "CHANNELS",
    "SPLITS",
    "Split",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_INSTALL_HINT",
    "FASHION_MNIST_PAD",
    "check_images",
    "check_image_folder",
    "image_files",
    "load_images",
    "read_idx_images",
    "load_fashion_mnist",
]

CHANNELS: tuple[int, ...] = (1, 3)
"""Channel counts we accept: grayscale or RGB (alpha has no defined meaning for FID)."""

Split = Literal["train", "test"]
SPLITS: tuple[str, ...] = ("train", "test")

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES: dict[str, str] = {
    "train": "train-images-idx3-ubyte.gz",
    "test": "t10k-images-idx3-ubyte.gz",
}
FASHION_MNIST_INSTALL_HINT = "apt-get update && apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_PAD = 2
"""Zero rows/columns added on each side (28 -> 32): the reference model is trained on 32x32."""

_PIL_MODES: dict[str, int] = {"L": 1, "RGB": 3}
_SAMPLES_FILE = "samples.json"  # engines.generate.SAMPLES_FILE: what `sample` is making, kept in its folder
_MARKER_FILE = ".pqcad-deploy.json"  # engines._atomic.MARKER_FILE: written when a folder is published
_PARTIAL_SUFFIX = ".partial"  # engines.generate.PARTIAL_SUFFIX: `sample` writes OUT.partial until done
GRID_FILE = "grid.png"
"""``sample``'s contact sheet: never an image sample, skipped in every folder."""
_IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions


def check_images(images: np.ndarray, name: str = "images") -> np.ndarray:
    """Check that ``images`` is uint8 ``N x H x W x C`` with C in (1, 3) and N >= 1.

    Why strict: FID silently changes meaning if a float image in [0, 1] is read as uint8 or a
    channel-first array is read as channel-last, so we refuse instead of guessing.

    Args:
        images: the array to check.
        name: how to call it in the error message (a path, an argument name).

    Returns:
        ``images`` itself (unchanged), for chaining.

    Raises:
        ImageInputError: wrong type, dtype, rank, channel count, or no images.
    """
    if not isinstance(images, np.ndarray):
        raise ImageInputError(f"{name} must be a numpy array; got {type(images).__name__}.")
    if images.dtype != np.uint8:
        raise ImageInputError(
            f"{name} must have dtype uint8 (values 0..255); got {images.dtype}. "
            "Convert with np.round(np.clip(x, 0, 1) * 255).astype(np.uint8) for images in [0, 1]."
        )
    if images.ndim != 4 or images.shape[-1] not in CHANNELS:
        hint = ""
        if images.ndim == 4 and images.shape[1] in CHANNELS:
            hint = " It looks channel-first: use images.transpose(0, 2, 3, 1)."
        elif images.ndim == 3:
            hint = " For grayscale N x H x W add a channel axis: images[..., None]."
        raise ImageInputError(
            f"{name} must have shape N x H x W x C with C in {CHANNELS}; got {images.shape}.{hint}"
        )
    if images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        raise ImageInputError(f"{name} holds no pixels; got shape {images.shape}.")
    return images


def _samples_record(folder: Path) -> dict | None:
    import json

    try:
        data = json.loads((folder / _SAMPLES_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == "pqcad-samples" else None


def check_image_folder(folder: str | Path) -> dict | None:
    """Refuse an unfinished ``sample`` folder; return the ``samples.json`` record of a finished one.

    A folder ``sample`` is still writing (or was interrupted in) is ``OUT.partial``: it has a
    ``samples.json`` but no publication marker, or its name ends in ``.partial``.

    Raises:
        ImageInputError: the folder is an unfinished ``sample`` output.
    """
    folder = Path(folder)
    record = _samples_record(folder)
    if record is None:
        return None
    if folder.name.endswith(_PARTIAL_SUFFIX) or not (folder / _MARKER_FILE).is_file():
        raise ImageInputError(
            f"{folder} is an unfinished `pqcad-deploy sample` output (OUT.partial); finish it with "
            "`pqcad-deploy sample ... --resume`, then evaluate the finished folder."
        )
    return record


def image_files(folder: str | Path) -> list[Path]:
    """The image files of a folder, in the order they are read.

    A folder written by ``sample`` (``samples.json``): exactly ``00000.png`` .. its ``n - 1``. Any
    other folder: every ``*.png`` in sorted name order except ``grid.png``.

    Raises:
        ImageInputError: an unfinished ``sample`` folder, a listed image missing, or no .png files.
    """
    folder = Path(folder)
    record = check_image_folder(folder)
    if record is not None:
        n = record.get("n")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ImageInputError(f"{folder / _SAMPLES_FILE} has no valid image count n; got {n!r}.")
        files = [folder / f"{i:05d}.png" for i in range(n)]
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise ImageInputError(f"{folder} lacks {len(missing)} of the {n} images its {_SAMPLES_FILE} lists "
                                  f"(first: {missing[0]}); sample it again.")
        return files
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() == ".png" and p.name.lower() != GRID_FILE)
    if not files:
        raise ImageInputError(f"{folder} contains no .png files other than {GRID_FILE} (subfolders are not searched).")
    return files


def _load_png_folder(folder: Path) -> np.ndarray:
    from PIL import Image

    files = image_files(folder)
    arrays: list[np.ndarray] = []
    for file in files:
        with Image.open(file) as im:
            if im.mode not in _PIL_MODES:
                raise ImageInputError(
                    f"{file} has PIL mode {im.mode!r}; only {tuple(_PIL_MODES)} are accepted "
                    "(8-bit grayscale or RGB)."
                )
            arr = np.asarray(im, dtype=np.uint8)
        arr = arr.reshape(arr.shape[0], arr.shape[1], _PIL_MODES[im.mode])
        if arrays and arr.shape != arrays[0].shape:
            raise ImageInputError(
                f"{file} has shape {arr.shape} but {files[0].name} has {arrays[0].shape}; "
                "all images of a folder must share size and channel count."
            )
        arrays.append(arr)
    return np.stack(arrays)


def _load_npz(file: Path) -> np.ndarray:
    try:
        with np.load(file, allow_pickle=False) as data:
            if "images" not in data.files:
                raise ImageInputError(
                    f"{file} has no key 'images' (keys: {sorted(data.files)}); "
                    "save with np.savez(path, images=uint8 N x H x W x C)."
                )
            images = data["images"]
    except ImageInputError:
        raise
    except (OSError, ValueError) as exc:  # not a zip, truncated, or object arrays
        raise ImageInputError(f"{file} is not a readable .npz file: {exc}") from exc
    return check_images(images, name=f"{file}['images']")


def load_images(path: str | Path) -> np.ndarray:
    """Load images to evaluate from a folder of PNGs or an ``.npz`` file.

    A folder written by ``pqcad-deploy sample`` is read as exactly the images its ``samples.json``
    lists (an unfinished ``OUT.partial`` is refused); any other folder is read in sorted file-name
    order so that results are reproducible, skipping a ``grid.png`` (``sample``'s contact sheet).
    An ``.npz`` must hold the key ``images`` (what the samplers write).

    Args:
        path: a directory of ``*.png`` (8-bit L or RGB, all the same size) or an ``.npz`` file.

    Returns:
        uint8 array ``N x H x W x C``, C in (1, 3).

    Raises:
        ImageInputError: missing path, unsupported file type, empty folder, missing key, or images
            of the wrong dtype, shape or mode.
    """
    path = Path(path)
    if path.is_dir():
        return check_images(_load_png_folder(path), name=str(path))
    if not path.exists():
        raise ImageInputError(f"image path {path} does not exist.")
    if path.suffix.lower() != ".npz":
        raise ImageInputError(f"{path} must be a folder of .png files or an .npz file.")
    return _load_npz(path)


def read_idx_images(path: str | Path) -> np.ndarray:
    """Read a gzip'd idx3-ubyte image file (the MNIST family's format) as uint8 ``N x H x W``.

    The format is a big-endian header (magic 0x00000803, then N, H, W as uint32) followed by the
    raw pixels; reading it with numpy avoids a torchvision dependency we do not have.

    Raises:
        DatasetNotFoundError: the file is missing, has a wrong magic number or a wrong length.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(
            f"Fashion-MNIST file {path} is missing; install it with `{FASHION_MNIST_INSTALL_HINT}`."
        )
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    header = np.frombuffer(raw[:16], dtype=">u4")
    if header.size != 4 or header[0] != _IDX_IMAGES_MAGIC:
        raise DatasetNotFoundError(f"{path} is not an idx3-ubyte image file (bad header).")
    n, h, w = (int(v) for v in header[1:])
    pixels = np.frombuffer(raw, dtype=np.uint8, offset=16)
    if pixels.size != n * h * w:
        raise DatasetNotFoundError(
            f"{path} should hold {n}x{h}x{w} pixels after its header; got {pixels.size}."
        )
    return pixels.reshape(n, h, w)


def load_fashion_mnist(split: Split = "train", data_dir: str | Path = FASHION_MNIST_DIR) -> np.ndarray:
    """Load a Fashion-MNIST split padded to 32x32, the size the reference model is trained on.

    The padding is zeros, which is the dataset's background, so padded images are what the model
    sees during training and the reference statistics match its samples' geometry.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
        data_dir: folder holding the original idx ``.gz`` files.

    Returns:
        uint8 array ``N x 32 x 32 x 1``.

    Raises:
        FidError: unknown split.
        DatasetNotFoundError: the idx file is missing or malformed.
    """
    if split not in SPLITS:
        raise FidError(f"split must be one of {', '.join(SPLITS)}; got {split!r}.")
    images = read_idx_images(Path(data_dir) / FASHION_MNIST_FILES[split])
    p = FASHION_MNIST_PAD
    padded = np.pad(images, ((0, 0), (p, p), (p, p)), mode="constant", constant_values=0)
    return np.ascontiguousarray(padded[..., None])
