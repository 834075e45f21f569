"""Frechet Inception Distance: Gaussian statistics of features, their distance, and a stats file.

FID fits a Gaussian (mean, covariance) to Inception pool3 features of each image set and reports
``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2)``. The maths follows pytorch-fid (float64
statistics, ``scipy.linalg.sqrtm``, an ``eps`` diagonal offset when the product is singular, tiny
imaginary parts discarded after a check) so that numbers agree with the literature's tooling given
the same features.

Statistics carry a description (source, preprocessing, weights checksum) because FID between sets
processed differently is meaningless; :func:`fid_from_images` refuses such pairs.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg

from pqcad_deploy.engines._atomic import atomic_file
from pqcad_deploy.eval.errors import StatisticsError

__all__ = [
    "STATS_FORMAT",
    "STATS_VERSION",
    "COMPATIBILITY_KEYS",
    "feature_statistics",
    "frechet_distance",
    "FidStatistics",
    "compute_statistics",
    "fid_from_images",
]

STATS_FORMAT = "pqcad-fid-stats"
STATS_VERSION = 1
COMPATIBILITY_KEYS: tuple[str, ...] = ("preprocessing", "weights_sha256")
"""Description keys that must be equal for two statistics to be compared."""


def _full_sigma(triu: np.ndarray, dim: int) -> np.ndarray:
    """Symmetric float64 covariance from its stored upper triangle."""
    if triu.shape != (dim * (dim + 1) // 2,):
        raise StatisticsError(f"stored covariance has {triu.size} values; expected {dim * (dim + 1) // 2}.")
    sigma = np.zeros((dim, dim), dtype=np.float64)
    sigma[np.triu_indices(dim)] = triu
    return sigma + np.triu(sigma, 1).T


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, ``N - 1``) of a feature matrix, in float64.

    float64 matters: the covariance of 2048-d features accumulated in float32 loses enough precision
    to move FID in the first decimal.

    Args:
        features: ``N x D`` array, N >= 2, all finite.

    Returns:
        ``(mu, sigma)`` with shapes ``(D,)`` and ``(D, D)``, float64.

    Raises:
        StatisticsError: wrong rank, fewer than 2 rows, or non-finite values.
    """
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2 or f.shape[1] < 1:
        raise StatisticsError(f"features must be N x D with N >= 2; got shape {f.shape}.")
    if not np.isfinite(f).all():
        raise StatisticsError("features contain NaN or infinite values.")
    mu = f.mean(axis=0)
    sigma = np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])
    return mu, sigma


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6, imag_atol: float = 1e-3) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^1/2)``; the trace of
    ``(sigma1 sigma2)^1/2`` equals that of ``(sigma1^1/2 sigma2 sigma1^1/2)^1/2`` (same eigenvalues),
    which is the symmetric form in the textbook formula.

    Args:
        mu1, mu2: means, shape ``(D,)``.
        sigma1, sigma2: covariances, shape ``(D, D)``.
        eps: added to both diagonals if the square root of the product is not finite (a singular
            product), as pytorch-fid does.
        imag_atol: largest imaginary part on the square root's diagonal we accept as rounding noise.

    Returns:
        The squared Frechet distance (what is reported as "FID"), a Python float.

    Raises:
        StatisticsError: mismatched shapes, non-finite inputs, or a square root with a significant
            imaginary part (the covariances are not positive semi-definite).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise StatisticsError(
            "statistics must be mu (D,) and sigma (D, D) of one D; got "
            f"mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, sigma2 {sigma2.shape}."
        )
    for name, arr in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(arr).all():
            raise StatisticsError(f"{name} contains NaN or infinite values.")

    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"FID: sqrtm of the covariance product is singular; adding {eps} to the diagonals.",
            RuntimeWarning, stacklevel=2,
        )
        offset = np.eye(d) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > imag_atol:
            raise StatisticsError(
                f"FID: sqrtm of the covariance product has an imaginary part of {imag:.3g} on its "
                f"diagonal (allowed {imag_atol}); the covariances are not positive semi-definite."
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _check_descriptions(mine: dict[str, Any], theirs: dict[str, Any]) -> None:
    for key in COMPATIBILITY_KEYS:
        a, b = mine.get(key), theirs.get(key)
        if a is None or b is None or a != b:
            raise StatisticsError(
                f"statistics are not comparable: {key} is {a!r} vs {b!r}; "
                "recompute the reference statistics with the current pipeline."
            )


@dataclass(frozen=True, eq=False)
class FidStatistics:
    """Gaussian statistics of one image set, with what is needed to know if two are comparable.

    Saved as an ``.npz`` with keys ``mu``, ``sigma`` (the keys pytorch-fid reads, so the file also
    works there), ``count`` and ``description`` (sorted JSON with the format, version, source,
    preprocessing and weights sha256).

    Attributes:
        mu: mean, float64 ``(D,)``.
        sigma: covariance, float64 ``(D, D)``.
        count: number of images the statistics were computed from (FID is biased for small counts;
            compare sets of equal size).
        description: free-form JSON-able dict; ``source``, ``preprocessing``, ``weights_sha256``
            are filled in by :func:`compute_statistics`.
    """

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    description: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        mu = np.asarray(self.mu, dtype=np.float64)
        sigma = np.asarray(self.sigma, dtype=np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise StatisticsError(f"mu must be (D,) and sigma (D, D); got {mu.shape} and {sigma.shape}.")
        if int(self.count) < 2:
            raise StatisticsError(f"count must be at least 2; got {self.count}.")
        if not isinstance(self.description, dict):
            raise StatisticsError(f"description must be a dict; got {type(self.description).__name__}.")
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "sigma", sigma)
        object.__setattr__(self, "count", int(self.count))

    def save(self, path: str | Path, compact: bool = False) -> Path:
        """Write the statistics atomically (temp file + rename) to ``path`` (must end in .npz).

        Args:
            compact: store the covariance as its float32 upper triangle (8.4 MB instead of 33.5 MB
                for 2048-d features), so reference statistics can be shipped in the package and
                carried off the GPU machine; float32 rounding moves an FID by far less than 0.01.
        """
        path = Path(path)
        if path.suffix != ".npz":
            raise StatisticsError(f"statistics path must end in .npz; got {path}.")
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {**self.description, "format": STATS_FORMAT, "version": STATS_VERSION,
                "sigma_storage": "float32-upper-triangle" if compact else "float64"}
        if compact:
            arrays = {"sigma_triu": self.sigma[np.triu_indices(self.sigma.shape[0])].astype(np.float32)}
        else:
            arrays = {"sigma": self.sigma}
        with atomic_file(path, error=StatisticsError) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, mu=self.mu, count=np.int64(self.count),
                     description=np.array(json.dumps(meta, sort_keys=True)), **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "FidStatistics":
        """Read statistics written by :meth:`save`; refuses other formats and newer versions."""
        path = Path(path)
        if not path.is_file():
            raise StatisticsError(f"statistics file {path} does not exist.")
        try:
            with np.load(path, allow_pickle=False) as data:
                sigma_key = "sigma_triu" if "sigma_triu" in data.files else "sigma"
                missing = {"mu", sigma_key, "count", "description"} - set(data.files)
                if missing:
                    raise StatisticsError(f"{path} lacks the keys {sorted(missing)}; is it a {STATS_FORMAT} file?")
                mu, count = data["mu"], int(data["count"])
                sigma = _full_sigma(data["sigma_triu"], mu.shape[0]) if sigma_key == "sigma_triu" else data["sigma"]
                meta = json.loads(str(data["description"][()]))
                meta.pop("sigma_storage", None)
        except StatisticsError:
            raise
        except (OSError, ValueError, TypeError) as exc:
            raise StatisticsError(f"{path} is not a readable statistics file: {exc}") from exc
        if not isinstance(meta, dict) or meta.pop("format", None) != STATS_FORMAT:
            raise StatisticsError(f"{path} is not a {STATS_FORMAT} file.")
        version = meta.pop("version", None)
        if not isinstance(version, int) or version > STATS_VERSION:
            raise StatisticsError(
                f"{path} has {STATS_FORMAT} version {version!r}; this code reads up to {STATS_VERSION}."
            )
        return cls(mu=mu, sigma=sigma, count=count, description=meta)

    def check_compatible(self, other: "FidStatistics") -> None:
        """Raise StatisticsError unless both sets share preprocessing and Inception weights."""
        if self.mu.shape != other.mu.shape:
            raise StatisticsError(f"feature dimensions differ: {self.mu.shape[0]} vs {other.mu.shape[0]}.")
        _check_descriptions(self.description, other.description)

    def frechet_distance(self, other: "FidStatistics") -> float:
        """FID between two statistics (no compatibility check; see :meth:`check_compatible`)."""
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma)


def compute_statistics(images_uint8: np.ndarray, device: str = "cpu", batch_size: int = 64,
                       progress: bool = True, source: str = "unspecified",
                       extractor: Any = None) -> FidStatistics:
    """Inception features of the images, reduced to :class:`FidStatistics`.

    Args:
        images_uint8: uint8 ``N x H x W x C``, C in (1, 3), N >= 2.
        device: torch device for the network (ignored when ``extractor`` is given).
        batch_size: images per forward pass.
        progress: show a tqdm bar with images/s.
        source: free text recorded in the description (e.g. "fashion-mnist train").
        extractor: an :class:`~pqcad_deploy.eval.inception.InceptionFeatures` to reuse (loading the
            network takes a second; pass one when computing several sets).

    Raises:
        ImageInputError, WeightsNotFoundError, StatisticsError, FidError.
    """
    from pqcad_deploy.eval.inception import InceptionFeatures

    if extractor is None:
        extractor = InceptionFeatures(device=device, batch_size=batch_size)
    features = extractor(images_uint8, batch_size=batch_size, progress=progress)
    mu, sigma = feature_statistics(features)
    description = {"source": source, **extractor.description()}
    return FidStatistics(mu=mu, sigma=sigma, count=features.shape[0], description=description)


def fid_from_images(images: np.ndarray, ref_stats: FidStatistics, device: str = "cpu",
                    batch_size: int = 64, progress: bool = True, extractor: Any = None) -> float:
    """FID of generated images against reference statistics.

    The reference must have been computed with the same preprocessing and weights (checked from
    the descriptions); otherwise the number would be silently wrong.

    Raises:
        StatisticsError: incompatible reference, or numerical failure.
        ImageInputError, WeightsNotFoundError, FidError: as :func:`compute_statistics`.
    """
    from pqcad_deploy.eval.inception import InceptionFeatures

    if extractor is None:
        extractor = InceptionFeatures(device=device, batch_size=batch_size)
    _check_descriptions(extractor.description(), ref_stats.description)  # before the slow part
    stats = compute_statistics(images, batch_size=batch_size, progress=progress,
                               source="generated", extractor=extractor)
    stats.check_compatible(ref_stats)
    return stats.frechet_distance(ref_stats)
