"""The momentum transition rule on synthetic loss curves, the ladder, and normal timestep calibration."""

from __future__ import annotations

import numpy as np
import pytest

from pqcad_deploy.calibration.timesteps import normal_timesteps_on_grid
from pqcad_deploy.errors import ConfigError
from pqcad_deploy.progressive import TransitionRule, TransitionTracker, bit_ladder


def _run(losses, rule):
    tracker = TransitionTracker(rule)
    for i, loss in enumerate(losses):
        if tracker.update(loss):
            return i + 1, tracker.reason
    return None, None


RULE = TransitionRule(beta=0.9, threshold=1e-3, min_iters=20, max_iters=1000)


def test_steps_down_on_a_plateau_not_while_falling():
    # falls exponentially for 200 iterations, then flat
    falling = [1.0 * 0.98 ** k for k in range(200)]
    plateau = [falling[-1]] * 300
    stop, reason = _run(falling + plateau, RULE)
    assert reason == "converged"
    assert 200 < stop < 260  # after the fall ends, once the momentum has decayed


def test_never_before_min_iters_even_if_flat():
    stop, reason = _run([0.5] * 100, RULE)
    assert (stop, reason) == (20, "converged")


def test_max_iters_bounds_a_level_that_keeps_improving():
    rule = TransitionRule(beta=0.9, threshold=1e-3, min_iters=10, max_iters=150)
    stop, reason = _run([1.0 / (1 + k) for k in range(1000)], rule)
    assert (stop, reason) == (150, "max_iters")


def test_threshold_is_relative_to_the_loss():
    # the same relative improvement rate at two loss scales gives the same decision
    a = _run([1e-6 * 0.999 ** k for k in range(2000)], RULE)
    b = _run([1e3 * 0.999 ** k for k in range(2000)], RULE)
    assert a == b and a[1] == "converged"


def test_noisy_plateau_converges():
    rng = np.random.default_rng(0)
    losses = list(0.1 + 0.002 * rng.standard_normal(400))
    stop, reason = _run(losses, RULE)
    assert reason == "converged" and stop <= 60


@pytest.mark.parametrize("kwargs,match", [
    (dict(beta=1.0), "beta"), (dict(threshold=-1), "threshold"), (dict(min_iters=0), "min_iters"),
    (dict(min_iters=10, max_iters=5), "min_iters <= max_iters")])
def test_rule_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TransitionRule(**kwargs)


def test_bit_ladder():
    assert bit_ladder(4) == (8, 6, 4)
    assert bit_ladder(8) == (8,)
    assert bit_ladder(6) == (8, 6)
    assert bit_ladder(4, ladder=(8, 4)) == (8, 4)
    with pytest.raises(ConfigError, match="end at 4"):
        bit_ladder(4, ladder=(8, 6))
    with pytest.raises(ConfigError, match="decrease strictly"):
        bit_ladder(4, ladder=(6, 8, 4))


def test_normal_timesteps_snap_to_grid_and_follow_the_distribution():
    grid = list(range(990, -1, -10))  # DDIM-100 leading grid
    ts = normal_timesteps_on_grid(grid, 20000, mean=0.4, std=0.3, seed=1)
    assert set(ts.tolist()) <= set(grid)
    assert abs(ts.mean() - 0.4 * 1000) < 10  # clipping at 0 and 999 shifts it a little
    # clipping puts the left tail on the first grid point: P(t < 5) = Phi((5 - 400) / 300)
    from math import erf, sqrt

    def phi(z):
        return 0.5 * (1 + erf(z / sqrt(2)))

    assert abs((ts == 0).mean() - phi((5 - 400) / 300)) < 0.01
    # away from the clipped ends the histogram peaks near mu * T
    values, counts = np.unique(ts[(ts > 0) & (ts < 990)], return_counts=True)
    smooth = np.convolve(counts, np.ones(9) / 9, mode="same")
    assert abs(values[smooth.argmax()] - 400) <= 60
    # deterministic per seed
    assert np.array_equal(ts, normal_timesteps_on_grid(grid, 20000, mean=0.4, std=0.3, seed=1))
    with pytest.raises(ConfigError):
        normal_timesteps_on_grid(grid, 0)


def test_normal_calibration_keeps_trajectory_states_at_drawn_timesteps(small_unet_dir):
    """C_QC with normal timesteps: every kept x_t is the trajectory's state at a drawn grid step."""
    import torch

    from pqcad_deploy.calibration.trajectories import collect_trajectory_calibration

    from pqcad_deploy.schedule import make_ddim_scheduler
    from pqcad_deploy.config import CalibrationConfig
    from pqcad_deploy.models import load_model

    loaded = load_model(str(small_unet_dir))
    uniform = CalibrationConfig(num_trajectories=3, timesteps_kept=10, batch_size=3)
    normal = CalibrationConfig(num_trajectories=3, timesteps_kept=10, batch_size=3, timestep_sampling="normal",
                               timestep_mean=0.4, timestep_std=0.3)
    every = CalibrationConfig(num_trajectories=3, timesteps_kept=10, batch_size=3)  # 10 of 10 steps
    full = collect_trajectory_calibration(loaded.unet, make_ddim_scheduler(loaded.scheduler_config, 10), (1, 32, 32), every, seed=5,
                                          progress=False)
    got = collect_trajectory_calibration(loaded.unet, make_ddim_scheduler(loaded.scheduler_config, 10), (1, 32, 32), normal, seed=5,
                                         progress=False)
    assert len(got) == 30 and got.description["timestep_sampling"] == "normal"
    drawn = normal_timesteps_on_grid(list(range(900, -1, -100)), 30, mean=0.4, std=0.3, seed=5)
    assert sorted(got.t.long().tolist()) == sorted(drawn.tolist())
    # each kept state equals one of the full trajectories' states at the same timestep
    for x, t in zip(got.x, got.t):
        same_t = full.x[full.t == t]
        assert any(torch.equal(x, y) for y in same_t)
    u = collect_trajectory_calibration(loaded.unet, make_ddim_scheduler(loaded.scheduler_config, 10), (1, 32, 32), uniform, seed=5,
                                       progress=False)
    assert torch.equal(u.x, full.x)  # uniform with all steps kept = the whole trajectory
