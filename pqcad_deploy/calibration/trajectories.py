"""Calibration pairs (x_t, t) from the FP model's DDIM trajectories.

The quantized model will only ever see inputs on such trajectories, so they are the right data for
setting activation ranges; no real images are needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from pqcad_deploy.calibration.timesteps import normal_timesteps_on_grid
from pqcad_deploy.config import CalibrationConfig

if TYPE_CHECKING:
    from diffusers import DDIMScheduler

__all__ = ["CalibrationSet", "uniform_step_indices", "collect_trajectory_calibration"]


@dataclass
class CalibrationSet:
    """Model inputs for calibration: x [M, C, H, W] and the matching timesteps t [M] (float32)."""

    x: torch.Tensor
    t: torch.Tensor
    description: dict

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def batches(self, batch_size: int):
        """Yield (x, t) batches in a fixed order."""
        for start in range(0, len(self), batch_size):
            yield self.x[start:start + batch_size], self.t[start:start + batch_size]


def uniform_step_indices(num_steps: int, count: int) -> list[int]:
    """`count` step indices spread evenly over a trajectory of `num_steps` (both ends included)."""
    count = min(count, num_steps)
    return sorted({int(round(i)) for i in np.linspace(0, num_steps - 1, count)})


def _kept_steps(scheduler, config: CalibrationConfig, seed: int) -> np.ndarray:
    """How often each (trajectory, step index) pair is kept: int64 [num_trajectories, num_steps]."""
    steps = [int(t) for t in scheduler.timesteps]
    counts = np.zeros((config.num_trajectories, len(steps)), dtype=np.int64)
    if config.timestep_sampling == "uniform":
        counts[:, uniform_step_indices(len(steps), config.timesteps_kept)] = 1
        return counts
    drawn = normal_timesteps_on_grid(
        steps, config.num_trajectories * config.timesteps_kept, mean=config.timestep_mean,
        std=config.timestep_std, num_train_timesteps=int(scheduler.config.num_train_timesteps), seed=seed)
    position = {t: i for i, t in enumerate(steps)}
    for j, row in enumerate(drawn.reshape(config.num_trajectories, config.timesteps_kept)):
        for t in row:
            counts[j, position[int(t)]] += 1
    return counts


@torch.no_grad()
def collect_trajectory_calibration(
    unet: torch.nn.Module,
    scheduler: DDIMScheduler,
    image_shape: tuple[int, int, int],
    config: CalibrationConfig,
    seed: int,
    device: str = "cpu",
    progress: bool = True,
) -> CalibrationSet:
    """Run FP DDIM (eta 0) from seeded noise and keep (x_t, t) at evenly spread steps.

    Args:
        unet: the FP UNet (eval mode).
        scheduler: the DDIM sampler the calibration should match, its timesteps set
            (`pqcad_deploy.schedule.make_ddim_scheduler`); stepping it changes no state.
        image_shape: (C, H, W).
        config: how many trajectories and kept timesteps.
        seed: seeds the initial noise and which steps are kept.
    """
    num_steps = len(scheduler.timesteps)
    keep_counts = _kept_steps(scheduler, config, seed)  # [trajectory, step] -> times kept
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((config.num_trajectories, *image_shape), generator=generator)
    xs: list[torch.Tensor] = []
    ts: list[torch.Tensor] = []
    n_batches = (config.num_trajectories + config.batch_size - 1) // config.batch_size
    bar = tqdm(total=n_batches * len(scheduler.timesteps), desc="calibration trajectories",
               unit="step", disable=not progress)
    for start in range(0, config.num_trajectories, config.batch_size):
        x = noise[start:start + config.batch_size].to(device)
        for i, t in enumerate(scheduler.timesteps):
            t_batch = torch.full((x.shape[0],), float(t), device=device)
            repeats = keep_counts[start:start + x.shape[0], i]
            if repeats.any():
                index = torch.repeat_interleave(torch.arange(x.shape[0]), torch.from_numpy(repeats))
                xs.append(x.cpu()[index])
                ts.append(t_batch.cpu()[index])
            eps = unet(x, t_batch).sample
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
            bar.update(1)
    bar.close()
    return CalibrationSet(
        x=torch.cat(xs), t=torch.cat(ts),
        description={"source": "fp_ddim_trajectories", "num_steps": num_steps, "seed": seed,
                     "num_trajectories": config.num_trajectories,
                     "timestep_sampling": config.timestep_sampling,
                     "timesteps_kept": sorted({int(scheduler.timesteps[i])
                                               for i in np.nonzero(keep_counts.any(axis=0))[0]})},
    )
