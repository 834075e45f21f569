"""The paired FID check of the distillation guard: exact full-sample FIDs, an eigenvalue trace that
agrees with scipy's sqrtm, and a bootstrap spread that tells a real difference from noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pqcad_deploy.eval.fid import feature_statistics, frechet_distance
from pqcad_deploy.eval.fid_paired import _bootstrap_fid, paired_fid_gain


def _features(n: int, dim: int, shift: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).normal(size=(dim, dim)) / np.sqrt(dim)  # correlated features
    return rng.normal(size=(n, dim)) @ mixing + shift


def test_full_sample_fids_are_eval_fids_and_the_gain_is_b_minus_a():
    ref, a, b = _features(300, 16, 0.0, 0), _features(300, 16, 0.05, 1), _features(300, 16, 0.6, 2)
    paired = paired_fid_gain(ref, a, b, resamples=0)
    mu_r, s_r = feature_statistics(ref)
    assert paired.fid_a == pytest.approx(frechet_distance(*feature_statistics(a), mu_r, s_r), rel=1e-8)
    assert paired.fid_b == pytest.approx(frechet_distance(*feature_statistics(b), mu_r, s_r), rel=1e-8)
    assert paired.gain == pytest.approx(paired.fid_b - paired.fid_a) and paired.gain > 0
    assert paired.standard_error == 0.0 and paired.resamples == 0


def test_the_eigenvalue_trace_matches_sqrtm_on_the_whole_sample():
    ref, a = _features(400, 24, 0.0, 3), _features(400, 24, 0.3, 4)
    mu_r, s_r = feature_statistics(ref)
    w, v = np.linalg.eigh(s_r)
    root = torch.as_tensor((v * np.sqrt(np.clip(w, 0, None))) @ v.T)
    every = torch.arange(len(a))
    bootstrap_form = float(_bootstrap_fid(torch.as_tensor(a), every, torch.as_tensor(mu_r),
                                          torch.as_tensor(s_r).trace(), root))
    assert bootstrap_form == pytest.approx(frechet_distance(*feature_statistics(a), mu_r, s_r), rel=1e-8)


def test_the_bootstrap_separates_a_real_difference_from_noise():
    """Two draws of one distribution: a gain within two standard errors. A shifted one: far outside."""
    ref = _features(500, 16, 0.0, 5)
    same_a, same_b = _features(500, 16, 0.0, 6), _features(500, 16, 0.0, 7)
    noise = paired_fid_gain(ref, same_a, same_b, resamples=40, seed=1)
    assert noise.standard_error > 0 and abs(noise.gain) < 3 * noise.standard_error
    real = paired_fid_gain(ref, same_a, _features(500, 16, 0.4, 7), resamples=40, seed=1)
    assert real.gain > 5 * real.standard_error
    again = paired_fid_gain(ref, same_a, _features(500, 16, 0.4, 7), resamples=40, seed=1)
    assert again == real  # seeded: same decision on every run


def test_unpaired_shapes_are_refused():
    with pytest.raises(ValueError, match="one shape"):
        paired_fid_gain(_features(10, 4, 0, 0), _features(10, 4, 0, 1), _features(9, 4, 0, 2))
