"""PSNR of generated images against reference images from the same noise: the project's CPU proxy.

One definition for every place that scores a student by it (the activation-scale check, the method
comparison scripts, the alternatives benchmark), so their numbers stay comparable.
"""

from __future__ import annotations

import numpy as np

__all__ = ["mean_psnr", "psnr_per_image"]


def psnr_per_image(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """PSNR (dB, uint8 range) of each image of `images` against the same-index image of `reference`.

    A per-image MSE is floored at 1e-12, so an identical image counts as about 168 dB, not infinity.
    """
    diff = images.astype(np.float64) - reference.astype(np.float64)
    mse = (diff ** 2).reshape(len(images), -1).mean(axis=1)
    return 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-12))


def mean_psnr(images: np.ndarray, reference: np.ndarray) -> float:
    """Mean over images of :func:`psnr_per_image`."""
    return float(np.mean(psnr_per_image(images, reference)))
