"""CAD target maths: the student grid against diffusers' grids, the x0 target against two real
diffusers DDIM steps of a UNet, the last-step case and the truncated-SNR weight."""

from __future__ import annotations

import pytest
import torch

from _unets import UNET_CONFIGS
from pqcad_deploy.distill.grid import PAST_ZERO, distill_grid
from pqcad_deploy.distill.target import (DDIMCoefficients, eps_from_x0, predict_x0, teacher_target,
                                         truncated_snr_weight)
from pqcad_deploy.errors import ConfigError
from pqcad_deploy.schedule import ddim_timesteps, make_ddim_scheduler


@pytest.fixture(scope="module")
def builtin_config() -> dict:
    from pqcad_deploy.models import load_model

    return dict(load_model("builtin").scheduler_config)


@pytest.fixture(scope="module")
def unet64():
    """A random-weight tiny UNet in float64 (the reference computation is then float64 too)."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(**UNET_CONFIGS["c1_32_attn1_default"]).double().eval()


def test_student_grid_is_every_other_teacher_point_builtin(builtin_config):
    grid = distill_grid(builtin_config, 100)
    teacher, half = ddim_timesteps(builtin_config, 100), ddim_timesteps(builtin_config, 50)
    assert grid.teacher == tuple(teacher) and grid.student == tuple(half)
    # "leading" spacing: diffusers' 50-step grid is the 100-step grid at odd indices
    assert half == teacher[1::2] and grid.source == "diffusers"
    assert grid.teacher_path(980) == (980, 970) and grid.student_next(980) == 960
    assert grid.teacher_path(20) == (20, 10) and grid.student_next(20) == 0
    # the last student step is the teacher's own last step: one teacher step to past 0
    assert grid.teacher_path(0) == (0,) and grid.student_next(0) == PAST_ZERO
    for t in grid.student:  # t'' of the teacher is the student's next step everywhere
        path = grid.teacher_path(t)
        assert grid.teacher_next(path[-1]) == grid.student_next(t)


def test_student_grid_other_spacings(builtin_config):
    trailing = distill_grid(dict(builtin_config, timestep_spacing="trailing"), 100)
    assert trailing.source == "diffusers" and trailing.student == trailing.teacher[0::2]
    assert trailing.teacher_path(19) == (19, 9) and trailing.student_next(19) == PAST_ZERO
    linspace = distill_grid(dict(builtin_config, timestep_spacing="linspace"), 100)
    assert tuple(ddim_timesteps(dict(builtin_config, timestep_spacing="linspace"), 50)) != linspace.student
    assert linspace.source == "teacher_even" and linspace.student == linspace.teacher[0::2]
    assert all(len(linspace.teacher_path(t)) == 2 for t in linspace.student)
    for bad in (0, 7, 101):
        with pytest.raises(ConfigError):
            distill_grid(builtin_config, bad)


@pytest.mark.parametrize("spacing,clip,alpha_to_one", [
    ("leading", True, True), ("leading", False, False), ("trailing", True, True), ("trailing", False, False)])
def test_x0_target_lands_one_student_step_on_two_teacher_steps(builtin_config, unet64, spacing, clip, alpha_to_one):
    cfg = dict(builtin_config, timestep_spacing=spacing, clip_sample=clip, set_alpha_to_one=alpha_to_one)
    n = 10
    grid = distill_grid(cfg, n)
    coeffs = DDIMCoefficients.from_config(cfg)
    teacher_sched = make_ddim_scheduler(cfg, n)
    student_sched = make_ddim_scheduler(dict(cfg, clip_sample=False), n // 2)  # the unclipped DDIM step
    assert [int(t) for t in student_sched.timesteps] == list(grid.student)
    t = torch.tensor(grid.student, dtype=torch.int64)  # every student step, the last one included
    x_t = torch.randn((len(t), 1, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    target, x_end = teacher_target(unet64, x_t, t, grid, coeffs)
    alpha, sigma = coeffs.alpha_sigma(t)
    for b, tb in enumerate(t.tolist()):
        # the direct computation: diffusers' own DDIMScheduler.step along the teacher path
        x = x_t[b:b + 1]
        with torch.no_grad():
            for s in grid.teacher_path(tb):
                x = teacher_sched.step(unet64(x, torch.tensor([float(s)], dtype=torch.float64)).sample,
                                       s, x, eta=0.0).prev_sample
        torch.testing.assert_close(x_end[b:b + 1], x, rtol=0, atol=1e-6)
        # ONE student step with the eps implied by x0_target lands on the teacher's x_{t''}
        eps = eps_from_x0(x_t[b:b + 1], target[b:b + 1], alpha[b:b + 1], sigma[b:b + 1])
        landed = student_sched.step(eps, tb, x_t[b:b + 1], eta=0.0).prev_sample
        torch.testing.assert_close(landed, x, rtol=0, atol=1e-5)
    last = len(t) - 1
    if alpha_to_one:  # sigma_{t''} = 0 past 0: the target is the teacher's end point itself
        assert coeffs.alpha_sigma(torch.tensor([PAST_ZERO]))[1].item() == 0.0
        assert torch.equal(target[last], x_end[last])


def test_predict_x0_and_eps_are_inverse(builtin_config):
    coeffs = DDIMCoefficients.from_config(builtin_config)
    t = torch.tensor([999, 500, 0])
    alpha, sigma = coeffs.alpha_sigma(t)
    x_t = torch.randn((3, 1, 4, 4), dtype=torch.float64)
    eps = torch.randn_like(x_t)
    torch.testing.assert_close(eps_from_x0(x_t, predict_x0(x_t, eps, alpha, sigma), alpha, sigma), eps)
    assert coeffs.alphabar(torch.tensor([PAST_ZERO])).item() == 1.0
    no_one = DDIMCoefficients.from_config(dict(builtin_config, set_alpha_to_one=False))
    assert no_one.alphabar(torch.tensor([PAST_ZERO])).item() == no_one.alphas_cumprod[0].item()


def test_truncated_snr_weight_values(builtin_config):
    alpha = torch.tensor([0.6, 0.8, 1.0], dtype=torch.float64)
    sigma = torch.tensor([0.8, 0.6, 0.0], dtype=torch.float64)
    w = truncated_snr_weight(alpha, sigma)
    assert w[0].item() == 1.0  # SNR 0.5625 < 1: floored at 1
    assert w[1].item() == pytest.approx(0.64 / 0.36)
    assert w[2].item() > 1e10  # noise-free: effectively infinite, never NaN
    coeffs = DDIMCoefficients.from_config(builtin_config)
    a, s = coeffs.alpha_sigma(torch.tensor([0, 999]))
    ab0 = coeffs.alphas_cumprod[0].item()
    assert truncated_snr_weight(a, s).tolist() == pytest.approx([ab0 / (1 - ab0), 1.0])
