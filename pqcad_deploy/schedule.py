"""Timestep grids from a scheduler config, computed by diffusers itself.

The student's exact timestep list is recorded in the artifact from here, so export and engines never
recompute it.
"""

from __future__ import annotations

__all__ = ["ddim_timesteps", "make_ddim_scheduler"]


def make_ddim_scheduler(scheduler_config: dict, num_steps: int):
    """A diffusers DDIMScheduler with its timesteps set for `num_steps` steps."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(num_steps)
    return scheduler


def ddim_timesteps(scheduler_config: dict, num_steps: int) -> list[int]:
    """The descending DDIM timestep list diffusers uses for `num_steps` steps."""
    return [int(t) for t in make_ddim_scheduler(scheduler_config, num_steps).timesteps]
