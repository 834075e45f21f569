"""Shared fixtures for the FID evaluation tests: real data/weights when installed, else skips."""

from __future__ import annotations

import numpy as np
import pytest

from pqcad_deploy.eval.errors import DatasetNotFoundError, WeightsNotFoundError


@pytest.fixture(scope="session")
def fid_weights():
    """Path of the installed TorchScript Inception weights, or skip with the install hint."""
    from pqcad_deploy.eval.inception import find_fid_weights

    try:
        return find_fid_weights()
    except WeightsNotFoundError as exc:
        pytest.skip(f"FID weights not installed: {exc}")


@pytest.fixture(scope="session")
def fmnist_test_images() -> np.ndarray:
    """The padded Fashion-MNIST test split (10,000 x 32 x 32 x 1), or skip if not installed."""
    from pqcad_deploy.eval.images_io import load_fashion_mnist

    try:
        return load_fashion_mnist("test")
    except DatasetNotFoundError as exc:
        pytest.skip(f"Fashion-MNIST not installed: {exc}")
