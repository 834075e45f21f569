"""The numpy DDIM against diffusers' DDIMScheduler (the reference the student was trained with)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

from pqcad_deploy.engines.ddim import TIMESTEP_SPACINGS, DDIMConfig, DDIMSampler, ddim_timesteps, make_betas
from pqcad_deploy.engines.errors import ConfigError


@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
@pytest.mark.parametrize("steps", [1, 7, 10, 25, 50, 100, 333, 1000])
@pytest.mark.parametrize("offset", [0, 1])
def test_timesteps_equal_diffusers(spacing: str, steps: int, offset: int) -> None:
    cfg = {"timestep_spacing": spacing, "steps_offset": offset}
    ref = DDIMScheduler(**cfg)
    ref.set_timesteps(steps)
    ours = ddim_timesteps(cfg, steps)
    assert ours.dtype == np.int64
    np.testing.assert_array_equal(ours, ref.timesteps.numpy())


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("zero_snr", [False, True])
def test_alpha_tables_match_diffusers(schedule: str, zero_snr: bool) -> None:
    cfg = {"beta_schedule": schedule, "rescale_betas_zero_snr": zero_snr, "beta_start": 0.00085, "beta_end": 0.012}
    ours = DDIMSampler(cfg)
    if not zero_snr:
        ref = DDIMScheduler(**cfg)
        np.testing.assert_allclose(make_betas(ours.config), ref.betas.double().numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.double().numpy(), rtol=1e-4, atol=1e-7)
    else:
        # diffusers rescales in float32, which loses ~1e-4 to cancellation; pin against its algorithm in float64.
        base = DDIMScheduler(**{**cfg, "rescale_betas_zero_snr": False}).betas.double()
        expected = rescale_zero_terminal_snr(base).numpy()
        np.testing.assert_allclose(make_betas(ours.config), expected, rtol=1e-6, atol=1e-12)  # float32 ulps of the input betas
        assert ours.alphas_cumprod[-1] == pytest.approx(0.0, abs=1e-12)


def fake_model(x: np.ndarray, t: int) -> np.ndarray:
    """A deterministic stand-in for a UNet: smooth in x, different at every t."""
    return (np.tanh(x * 0.7 + t / 1000.0) * 0.9 + np.float32(0.1 * np.cos(t / 37.0))).astype(np.float32)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("clip_sample", [True, False])
@pytest.mark.parametrize("steps", [10, 50])
def test_full_loop_matches_diffusers(prediction_type: str, set_alpha_to_one: bool, clip_sample: bool, steps: int) -> None:
    cfg = {"prediction_type": prediction_type, "set_alpha_to_one": set_alpha_to_one, "clip_sample": clip_sample,
           "timestep_spacing": "leading", "steps_offset": 1}
    ref = DDIMScheduler(**cfg)
    ref.set_timesteps(steps)
    ours = DDIMSampler(cfg)
    ts = ddim_timesteps(cfg, steps)
    x0 = np.random.default_rng(0).standard_normal((2, 3, 4, 4), dtype=np.float32)

    x_ref = torch.from_numpy(x0.copy())
    for t in ref.timesteps:
        out = torch.from_numpy(fake_model(x_ref.numpy(), int(t)))
        x_ref = ref.step(out, t, x_ref, eta=0.0).prev_sample

    x = x0.copy()
    for t, prev_t in zip(ts, [*ts[1:], -1]):
        x = ours.step(fake_model(x, int(t)), int(t), int(prev_t), x)

    assert x.dtype == np.float32
    np.testing.assert_allclose(x, x_ref.numpy(), rtol=1e-5, atol=1e-5)
    assert np.abs(x - x0).max() > 0.1  # the loop did move the sample


def test_final_step_uses_final_alpha_cumprod() -> None:
    x = np.ones((1, 1, 1, 1), np.float32)
    eps = np.zeros_like(x)
    one = DDIMSampler({"set_alpha_to_one": True, "clip_sample": False})
    a0 = one.alphas_cumprod[0]
    # eps = 0: x0 = x / sqrt(a_t); the final step scales by sqrt(final_alpha_cumprod).
    assert one.step(eps, 0, -1, x)[0, 0, 0, 0] == pytest.approx(1 / np.sqrt(a0), rel=1e-6)
    not_one = DDIMSampler({"set_alpha_to_one": False, "clip_sample": False})
    assert not_one.final_alpha_cumprod == pytest.approx(a0)
    assert not_one.step(eps, 0, -1, x)[0, 0, 0, 0] == pytest.approx(1.0, rel=1e-6)


def test_thresholding_refused() -> None:
    with pytest.raises(ConfigError, match="thresholding=True .* does not support; export with thresholding=False"):
        DDIMConfig.from_dict({"thresholding": True})


def test_bad_choices_refused_with_the_allowed_list() -> None:
    with pytest.raises(ConfigError, match="timestep_spacing='uniform' is not supported; choose one of leading, trailing, linspace"):
        DDIMConfig.from_dict({"timestep_spacing": "uniform"})
    with pytest.raises(ConfigError, match="beta_schedule='sigmoid'"):
        DDIMConfig.from_dict({"beta_schedule": "sigmoid"})


def test_steps_out_of_range() -> None:
    with pytest.raises(ConfigError, match="steps=0 must be an integer between 1 and num_train_timesteps=1000"):
        ddim_timesteps({}, 0)
    with pytest.raises(ConfigError, match="steps=1001"):
        ddim_timesteps({}, 1001)


def test_unknown_diffusers_keys_ignored() -> None:
    cfg = DDIMConfig.from_dict({"_class_name": "DDIMScheduler", "_diffusers_version": "0.30", "variance_type": "fixed_small",
                                "num_train_timesteps": 500})
    assert cfg.num_train_timesteps == 500


def test_trained_betas() -> None:
    betas = np.linspace(1e-4, 2e-2, 1000)
    ref = DDIMScheduler(trained_betas=betas.tolist())
    ours = DDIMSampler({"trained_betas": betas.tolist()})
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.double().numpy(), rtol=1e-4)
    with pytest.raises(ConfigError, match="trained_betas has 3 values but num_train_timesteps=1000"):
        DDIMSampler({"trained_betas": [0.1, 0.2, 0.3]})
