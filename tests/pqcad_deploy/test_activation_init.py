"""Activation scale initialisation: percentile and MSE search (PQ stage 2)."""

from __future__ import annotations

import pytest
import torch

from pqcad_deploy.errors import ConfigError
from pqcad_deploy.quant import primitives as P


def _heavy_tailed(n=20000, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    x[:5] = torch.tensor([40.0, -35.0, 30.0, 25.0, -50.0])  # a few outliers set the max
    return x


def _mse(x, scale, bits):
    qmin, qmax = P.act_qrange(bits)
    return float((torch.clamp(torch.round(x / scale), qmin, qmax) * scale - x).pow(2).mean())


@pytest.mark.parametrize("bits", [8, 4])
def test_mse_search_never_worse_than_minmax_and_clips_outliers(bits):
    x = _heavy_tailed()
    amax = float(x.abs().max())
    minmax = P.minmax_activation_scale(amax, bits)
    mse = P.mse_activation_scale(x, amax, bits)
    assert _mse(x, mse, bits) <= _mse(x, minmax, bits)
    assert float(mse) < float(minmax)  # the outliers are clipped
    if bits == 4:  # at 4 bits clipping pays off a lot (measured: 0.296 against 1.008)
        assert _mse(x, mse, bits) < 0.35 * _mse(x, minmax, bits)


def test_percentile_scale_maps_the_percentile_to_qmax():
    x = torch.arange(1, 10001, dtype=torch.float32)
    s = P.percentile_activation_scale(x, 8, percentile=99.0)
    expected = float(torch.quantile(x.double(), 0.99)) / 127
    assert float(s) == pytest.approx(expected, rel=1e-6)


def test_calibrate_activations_init_choices(small_unet_dir):
    from pqcad_deploy.calibration.trajectories import collect_trajectory_calibration
    from pqcad_deploy.schedule import make_ddim_scheduler
    from pqcad_deploy.config import CalibrationConfig
    from pqcad_deploy.methods.brecq import calibrate_activations
    from pqcad_deploy.methods.minmax import minmax_quantize
    from pqcad_deploy.models import load_model
    from pqcad_deploy.quant.replace import LayerBits, quant_layers, quantizable_layers

    fp = load_model(str(small_unet_dir))
    cal = collect_trajectory_calibration(fp.unet, make_ddim_scheduler(fp.scheduler_config, 10), (1, 32, 32),
                                         CalibrationConfig(num_trajectories=2, timesteps_kept=4, batch_size=2),
                                         seed=0, progress=False)
    plan = {n: LayerBits(8, 8) for n in quantizable_layers(fp.unet)}
    student = minmax_quantize(fp.unet, plan, cal, 4, progress=False)
    minmax_scales = {n: float(l.input_quantizer.scale) for n, l in quant_layers(student).items()}
    calibrate_activations(student, cal, 4, init="mse", progress=False)
    mse_scales = {n: float(l.input_quantizer.scale) for n, l in quant_layers(student).items()}
    assert all(mse_scales[n] <= minmax_scales[n] * (1 + 1e-6) for n in minmax_scales)
    assert any(mse_scales[n] < minmax_scales[n] * 0.99 for n in minmax_scales)
    assert all(l.input_quantizer.enabled and not l.input_quantizer.observing for l in quant_layers(student).values())
    with pytest.raises(ConfigError, match="minmax, percentile, mse"):
        calibrate_activations(student, cal, 4, init="nope", progress=False)
