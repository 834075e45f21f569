"""Normally distributed timestep calibration (PTQ4DM), snapped to the sampler's grid.

Quantization calibration should see the timesteps where activations matter most; PTQ4DM draws
t ~ Normal(mu * T, s * T), clipped to [0, T-1]. Our samplers only ever evaluate the model on their
own grid, so each draw is snapped to the nearest grid timestep (docs/ARCHITECTURE.md, The method).
"""

from __future__ import annotations

import numpy as np

from pqcad_deploy.errors import ConfigError

__all__ = ["normal_timesteps_on_grid"]


def normal_timesteps_on_grid(grid: list[int] | np.ndarray, count: int, mean: float = 0.4, std: float = 0.3,
                             num_train_timesteps: int = 1000, seed: int = 0) -> np.ndarray:
    """`count` grid timesteps drawn from Normal(mean*T, std*T), clipped to [0, T-1] and snapped.

    Args:
        grid: the sampler's timesteps (any order).
        count: how many to draw (repeats allowed: a timestep drawn twice gets twice the weight).
        mean, std: as fractions of T = num_train_timesteps (defaults are our choice, docs/ARCHITECTURE.md).
        seed: seeds the draw.

    Returns:
        int64 array of `count` timesteps, each an element of `grid`.
    """
    if count < 1:
        raise ConfigError(f"calibration timestep count must be >= 1; got {count}.")
    if not 0.0 <= mean <= 1.0 or std <= 0.0:
        raise ConfigError(f"normal timestep calibration needs mean in [0, 1] and std > 0; got {mean}, {std}.")
    grid_arr = np.asarray(sorted(int(t) for t in grid), dtype=np.int64)
    if grid_arr.size == 0:
        raise ConfigError("the sampler's timestep grid is empty.")
    rng = np.random.default_rng(seed)
    draws = np.clip(rng.normal(mean * num_train_timesteps, std * num_train_timesteps, size=count),
                    0, num_train_timesteps - 1)
    nearest = np.abs(draws[:, None] - grid_arr[None, :]).argmin(axis=1)
    return grid_arr[nearest]
