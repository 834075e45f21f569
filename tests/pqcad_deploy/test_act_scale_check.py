"""The activation-scale check keeps whichever scales give sampled images closer to the FP model's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pqcad_deploy.act_scale_check import ScaleCheckConfig, keep_better_activation_scales
from pqcad_deploy.calibration.trajectories import collect_trajectory_calibration
from pqcad_deploy.schedule import make_ddim_scheduler
from pqcad_deploy.config import CalibrationConfig
from pqcad_deploy.eval.psnr import mean_psnr
from pqcad_deploy.methods.minmax import minmax_quantize
from pqcad_deploy.models import load_model
from pqcad_deploy.quant.replace import LayerBits, quant_layers

STEPS = 4


@pytest.fixture(scope="module")
def setup(unet_dirs):
    fp = load_model(str(unet_dirs["c1_32_attn1_default"]))
    calibration = collect_trajectory_calibration(
        fp.unet, make_ddim_scheduler(fp.scheduler_config, STEPS), (1, 32, 32),
        CalibrationConfig(num_trajectories=2, timesteps_kept=3, batch_size=2), seed=0, progress=False)
    plan = {n: LayerBits(8, 8) for n, m in fp.unet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    return fp, calibration, plan


def _student(setup):
    fp, calibration, plan = setup
    return minmax_quantize(fp.unet, plan, calibration, batch_size=2, progress=False)


def _scales(student) -> dict[str, float]:
    return {n: float(layer.input_quantizer.scale) for n, layer in quant_layers(student).items()}


def _check(setup, student):
    fp, calibration, _ = setup
    return keep_better_activation_scales(fp.unet, student, calibration, fp.scheduler_config, STEPS, "minmax", 2,
                                         ScaleCheckConfig(images=2), seed=0, device="cpu")


def test_mean_psnr_matches_the_formula():
    a = np.zeros((2, 4, 4, 1), np.uint8)
    b = a.copy()
    b[0] = 10  # mse 100 -> 10 log10(255^2 / 100); the identical image is capped at mse 1e-12
    expected = (10 * np.log10(255.0 ** 2 / 100) + 10 * np.log10(255.0 ** 2 / 1e-12)) / 2
    assert mean_psnr(b, a) == pytest.approx(expected)


def test_bad_learned_scales_are_replaced_by_the_starting_ones(setup):
    student = _student(setup)
    start = _scales(student)
    with torch.no_grad():  # "learned" scales that clip almost everything
        for layer in quant_layers(student).values():
            layer.input_quantizer.set_scale(float(layer.input_quantizer.scale) * 0.01)
    entry = _check(setup, student)
    assert entry["kept"] == "initial" and entry["psnr_initial_db"] > entry["psnr_learned_db"]
    assert entry["steps"] == STEPS and entry["config"] == {"images": 2}
    assert _scales(student) == pytest.approx(start, rel=1e-6)


def test_learned_scales_that_sample_no_worse_are_kept(setup):
    student = _student(setup)
    start = _scales(student)
    entry = _check(setup, student)  # learned == starting scales: a tie keeps the learned ones
    assert entry["kept"] == "learned" and entry["psnr_learned_db"] == entry["psnr_initial_db"]
    assert _scales(student) == start
