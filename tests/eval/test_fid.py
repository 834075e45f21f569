"""Frechet distance maths, statistics and the statistics file, pinned against closed forms."""

from __future__ import annotations

import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).resolve().parent))
from _fake_extractor import FakeExtractor  # noqa: E402

import json

import numpy as np
import pytest
import scipy.linalg

from pqcad_deploy.eval import fid as fid_mod
from pqcad_deploy.eval.errors import FidError, StatisticsError
from pqcad_deploy.eval.fid import (
    STATS_FORMAT,
    FidStatistics,
    feature_statistics,
    frechet_distance,
)


def _sym_sqrt(a: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix through eigh: independent of scipy's sqrtm."""
    w, v = np.linalg.eigh(a)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _closed_form(mu1, s1, mu2, s2) -> float:
    r1 = _sym_sqrt(s1)
    cross = _sym_sqrt(r1 @ s2 @ r1)
    d = mu1 - mu2
    return float(d @ d + np.trace(s1 + s2 - 2 * cross))


def _random_spd(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_feature_set_against_itself_is_zero():
    rng = np.random.default_rng(0)
    feats = rng.gamma(2.0, 3.0, size=(600, 64))  # non-negative, like pool3 features
    mu, sigma = feature_statistics(feats)
    value = frechet_distance(mu, sigma, mu, sigma)
    assert abs(value) < 1e-6 * np.trace(sigma)


def test_rank_deficient_set_against_itself_is_near_zero():
    # Fewer samples than dimensions, as with small image sets and 2048-d features.
    rng = np.random.default_rng(1)
    mu, sigma = feature_statistics(rng.normal(size=(20, 64)))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)


def test_diagonal_gaussians_match_closed_form():
    rng = np.random.default_rng(2)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    a, b = rng.uniform(0.1, 5.0, size=d), rng.uniform(0.1, 5.0, size=d)
    expected = float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2))
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, abs=1e-6)


def test_full_covariances_match_symmetric_closed_form():
    rng = np.random.default_rng(3)
    d = 12
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_closed_form(mu1, s1, mu2, s2), abs=1e-6)


def test_sampled_gaussians_approach_closed_form():
    rng = np.random.default_rng(4)
    mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([0.5, 0.0, 0.0])
    s1, s2 = np.diag([1.0, 2.0, 0.5]), np.diag([2.0, 1.0, 1.0])
    x1 = rng.multivariate_normal(mu1, s1, size=100_000)
    x2 = rng.multivariate_normal(mu2, s2, size=100_000)
    got = frechet_distance(*feature_statistics(x1), *feature_statistics(x2))
    assert got == pytest.approx(_closed_form(mu1, s1, mu2, s2), rel=0.03)


def test_feature_statistics_is_float64_unbiased():
    x = np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 4.0]], dtype=np.float32)
    mu, sigma = feature_statistics(x)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, [3.0, 4.0])
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False))


@pytest.mark.parametrize("bad", [np.zeros((1, 4)), np.zeros(5), np.array([[np.nan, 1.0], [0.0, 1.0]])])
def test_feature_statistics_rejects_bad_input(bad):
    with pytest.raises(StatisticsError):
        feature_statistics(bad)


def test_mismatched_dimensions_raise():
    with pytest.raises(StatisticsError, match="mu1"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_singular_product_gets_eps_offset(monkeypatch):
    calls = []
    real = scipy.linalg.sqrtm

    def fake_sqrtm(a):
        calls.append(a.copy())
        return np.full_like(a, np.inf) if len(calls) == 1 else real(a)

    monkeypatch.setattr(fid_mod.scipy.linalg, "sqrtm", fake_sqrtm)
    s = np.diag([1.0, 4.0])
    with pytest.warns(RuntimeWarning, match="singular"):
        value = frechet_distance(np.zeros(2), s, np.zeros(2), s, eps=1e-6)
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1], (s + 1e-6 * np.eye(2)) @ (s + 1e-6 * np.eye(2)))
    assert abs(value) < 1e-5


def test_imaginary_parts_discarded_only_when_tiny(monkeypatch):
    s = np.diag([1.0, 4.0])
    monkeypatch.setattr(fid_mod.scipy.linalg, "sqrtm", lambda a: _sym_sqrt(a) + 1e-9j)
    assert frechet_distance(np.zeros(2), s, np.zeros(2), s) == pytest.approx(0.0, abs=1e-8)
    monkeypatch.setattr(fid_mod.scipy.linalg, "sqrtm", lambda a: _sym_sqrt(a) + 0.1j)
    with pytest.raises(StatisticsError, match="imaginary"):
        frechet_distance(np.zeros(2), s, np.zeros(2), s)


def _stats(seed: int = 0, **desc) -> FidStatistics:
    rng = np.random.default_rng(seed)
    mu, sigma = feature_statistics(rng.normal(size=(50, 8)))
    description = {"source": "test", "preprocessing": "p", "weights_sha256": "w", **desc}
    return FidStatistics(mu=mu, sigma=sigma, count=50, description=description)


def test_statistics_round_trip(tmp_path):
    stats = _stats()
    path = stats.save(tmp_path / "sub" / "ref.npz")
    loaded = FidStatistics.load(path)
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert loaded.count == 50 and loaded.description == stats.description
    with np.load(path) as data:  # pytorch-fid reads exactly these keys
        assert {"mu", "sigma"} <= set(data.files)
    assert not list(tmp_path.glob("sub/.*tmp"))  # no temp file left behind


def test_compact_statistics_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    features_a, features_b = rng.normal(size=(400, 64)), rng.normal(0.3, 1.2, size=(400, 64))
    mu, sigma = feature_statistics(features_a)
    stats = FidStatistics(mu=mu, sigma=sigma, count=400, description={"source": "t", "preprocessing": "p",
                                                                      "weights_sha256": "w"})
    path = stats.save(tmp_path / "ref.npz", compact=True)
    loaded = FidStatistics.load(path)
    np.testing.assert_array_equal(loaded.mu, mu)
    np.testing.assert_array_equal(loaded.sigma, loaded.sigma.T)  # rebuilt symmetric
    np.testing.assert_allclose(loaded.sigma, sigma, rtol=1e-6, atol=1e-7)
    assert loaded.description == stats.description
    mu_b, sigma_b = feature_statistics(features_b)
    exact = frechet_distance(mu, sigma, mu_b, sigma_b)
    assert abs(frechet_distance(loaded.mu, loaded.sigma, mu_b, sigma_b) - exact) < 1e-4 * exact
    with np.load(path) as data:
        assert data["sigma_triu"].dtype == np.float32 and data["sigma_triu"].size == 64 * 65 // 2


def test_statistics_file_errors(tmp_path):
    with pytest.raises(StatisticsError, match=".npz"):
        _stats().save(tmp_path / "ref.npy")
    with pytest.raises(StatisticsError, match="does not exist"):
        FidStatistics.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "pfid.npz", mu=np.zeros(2), sigma=np.eye(2))
    with pytest.raises(StatisticsError, match="lacks the keys"):
        FidStatistics.load(tmp_path / "pfid.npz")
    meta = json.dumps({"format": STATS_FORMAT, "version": 99})
    np.savez(tmp_path / "new.npz", mu=np.zeros(2), sigma=np.eye(2), count=3, description=np.array(meta))
    with pytest.raises(StatisticsError, match="version 99"):
        FidStatistics.load(tmp_path / "new.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(StatisticsError, match="not a readable"):
        FidStatistics.load(tmp_path / "junk.npz")
    with pytest.raises(StatisticsError):
        FidStatistics(mu=np.zeros(3), sigma=np.eye(2), count=10)


def test_incompatible_statistics_are_refused():
    a, b = _stats(0), _stats(1, weights_sha256="other")
    with pytest.raises(StatisticsError, match="weights_sha256"):
        a.check_compatible(b)
    a.check_compatible(_stats(1))
    assert a.frechet_distance(a) == pytest.approx(0.0, abs=1e-9)


def test_errors_share_the_project_family():
    from pqcad_deploy.errors import PqcadError

    assert issubclass(StatisticsError, FidError) and issubclass(FidError, PqcadError)




def test_compute_statistics_and_fid_from_images_with_fake_extractor():
    from pqcad_deploy.eval.fid import compute_statistics, fid_from_images

    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, size=(40, 8, 8, 1), dtype=np.uint8)
    ref = compute_statistics(images, progress=False, source="ref", extractor=FakeExtractor())
    assert ref.count == 40 and ref.description["source"] == "ref"
    assert fid_from_images(images, ref, progress=False, extractor=FakeExtractor()) == pytest.approx(0, abs=1e-9)
    other = FakeExtractor(sha="different")
    with pytest.raises(StatisticsError, match="weights_sha256"):
        fid_from_images(images, ref, progress=False, extractor=other)
    assert other.calls == 0  # refused before the slow feature extraction
