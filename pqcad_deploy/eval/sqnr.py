"""Signal-to-quantization-noise ratio in dB: the one definition every report and benchmark uses."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["sqnr_db", "sqnr_db_from_powers"]

_TINY = 1e-30  # a noise power of 0 (identical outputs) reads as a finite, very large SQNR


def sqnr_db_from_powers(signal: float, noise: float) -> float:
    """10 log10(signal / noise) from summed squares (accumulated over batches by the caller)."""
    return 10.0 * math.log10(signal / max(noise, _TINY))


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """SQNR of `test` against `reference` (any shape, accumulated in float64)."""
    ref = np.asarray(reference, dtype=np.float64)
    err = np.asarray(test, dtype=np.float64) - ref
    return sqnr_db_from_powers(float(np.sum(ref ** 2)), float(np.sum(err ** 2)))
