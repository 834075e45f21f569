"""Calibration pairs (x_t, t) from the FP model's DDIM trajectories.

The quantized model will only ever see inputs on such trajectories, so they are the right data for
setting activation ranges; no real images are needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from pqcad_deploy.calibration.timesteps import normal_timesteps_on_grid
from pqcad_deploy.conditioning import UNCONDITIONAL, Conditioning, concat_rows, guided_eps, select_rows
from pqcad_deploy.config import CalibrationConfig

if TYPE_CHECKING:
    from diffusers import DDIMScheduler

__all__ = ["CalibrationSet", "uniform_step_indices", "collect_trajectory_calibration"]


@dataclass
class CalibrationSet:
    """Model inputs for calibration: x [M, C, H, W], the matching timesteps t [M] (float32) and, for a
    conditional model, the conditioning of every pair (``cond``: UNet keyword -> tensor [M, ...]; empty
    for an unconditional model, pqcad_deploy.conditioning)."""

    x: torch.Tensor
    t: torch.Tensor
    description: dict
    cond: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def batches(self, batch_size: int):
        """Yield (x, t, cond) batches in a fixed order; call the model as ``model(x, t, **cond)``."""
        for start in range(0, len(self), batch_size):
            rows = slice(start, start + batch_size)
            yield self.x[rows], self.t[rows], select_rows(self.cond, rows)

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(x, t, cond) of the pairs `index`, e.g. a random batch."""
        return self.x[index], self.t[index], select_rows(self.cond, index)


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
    conditioning: Conditioning = UNCONDITIONAL,
) -> CalibrationSet:
    """Run FP DDIM (eta 0) from seeded noise and keep (x_t, t) at evenly spread steps.

    A conditional model's trajectory j runs with the conditioning of sample j (class ``j % classes``)
    and the model's guidance (the guided trajectories are what the student will walk); every kept x_t is
    kept with that condition and, when guidance runs, once more with the unconditional one: the
    deployed student sees both halves of every guided step.

    Args:
        unet: the FP UNet (eval mode).
        scheduler: the DDIM sampler the calibration should match, its timesteps set
            (`pqcad_deploy.schedule.make_ddim_scheduler`); stepping it changes no state.
        image_shape: (C, H, W).
        config: how many trajectories and kept timesteps.
        seed: seeds the initial noise and which steps are kept.
        conditioning: the model's conditioning and guidance (pqcad_deploy.conditioning).
    """
    num_steps = len(scheduler.timesteps)
    keep_counts = _kept_steps(scheduler, config, seed)  # [trajectory, step] -> times kept
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((config.num_trajectories, *image_shape), generator=generator)
    conditions = conditioning.draw(torch.arange(config.num_trajectories))
    xs: list[torch.Tensor] = []
    ts: list[torch.Tensor] = []
    conds: list[dict[str, torch.Tensor]] = []
    n_batches = (config.num_trajectories + config.batch_size - 1) // config.batch_size
    bar = tqdm(total=n_batches * len(scheduler.timesteps), desc="calibration trajectories",
               unit="step", disable=not progress)
    for start in range(0, config.num_trajectories, config.batch_size):
        x = noise[start:start + config.batch_size].to(device)
        cond = select_rows(conditions, slice(start, start + x.shape[0]))
        for i, t in enumerate(scheduler.timesteps):
            t_batch = torch.full((x.shape[0],), float(t), device=device)
            repeats = keep_counts[start:start + x.shape[0], i]
            if repeats.any():
                index = torch.repeat_interleave(torch.arange(x.shape[0]), torch.from_numpy(repeats))
                halves = [select_rows(cond, index)] + ([conditioning.null(len(index))] if conditioning.guides else [])
                for half in halves:
                    xs.append(x.cpu()[index])
                    ts.append(t_batch.cpu()[index])
                    conds.append(half)
            eps = guided_eps(unet, x, t_batch, cond, conditioning)
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
            bar.update(1)
    bar.close()
    description = {"source": "fp_ddim_trajectories", "num_steps": num_steps, "seed": seed,
                   "num_trajectories": config.num_trajectories,
                   "timestep_sampling": config.timestep_sampling,
                   "timesteps_kept": sorted({int(scheduler.timesteps[i])
                                             for i in np.nonzero(keep_counts.any(axis=0))[0]})}
    if conditioning is not UNCONDITIONAL:  # an unconditional set's description (and artifact) stays as it was
        description["conditioning"] = conditioning.to_dict()
    return CalibrationSet(x=torch.cat(xs), t=torch.cat(ts), description=description, cond=concat_rows(conds))
