"""C_QC, the quantization calibration set that compress uses (docs/ARCHITECTURE.md, The method).

FP DDIM trajectories from seeded noise, (x_t, t) kept at uniform or normally distributed timesteps
(calibration.trajectories); optionally followed by EDA-DM's density-and-diversity selection
(calibration.selection): draw `selection_oversample` times as many trajectories, embed every
candidate by the FP model's pooled mid-block features, and keep the requested number of pairs.
Oversampling trajectories rather than keeping more steps of the same ones, because neighbouring
steps of one trajectory are near duplicates in feature space; the price is `selection_oversample`
times the FP sampling, plus one forward pass over the candidates for their features.
"""

from __future__ import annotations

import dataclasses

import torch

from pqcad_deploy.calibration.selection import select_calibration
from pqcad_deploy.calibration.trajectories import CalibrationSet, collect_trajectory_calibration
from pqcad_deploy.conditioning import UNCONDITIONAL, Conditioning
from pqcad_deploy.config import CalibrationConfig
from pqcad_deploy.schedule import make_ddim_scheduler

__all__ = ["collect_qc_calibration"]


def collect_qc_calibration(
    unet: torch.nn.Module,
    scheduler_config: dict,
    image_shape: tuple[int, int, int],
    num_steps: int,
    config: CalibrationConfig,
    seed: int,
    device: str = "cpu",
    progress: bool = True,
    conditioning: Conditioning = UNCONDITIONAL,
) -> CalibrationSet:
    """The calibration set `config` describes: trajectories, then the selection if one is asked for.

    Arguments as :func:`collect_trajectory_calibration`. With ``config.selection ==
    "density_diversity"`` the result has exactly as many pairs as without a selection would, its
    description records the selection (candidates, selected, gamma, oversampling) and its
    ``timesteps_kept`` are those of the selected pairs. Deterministic for a seed.
    """
    scheduler = make_ddim_scheduler(scheduler_config, num_steps)
    if config.selection == "none":
        calibration = collect_trajectory_calibration(unet, scheduler, image_shape, config, seed=seed, device=device,
                                                     progress=progress, conditioning=conditioning)
        calibration.description["selection"] = "none"
        return calibration
    candidates_cfg = dataclasses.replace(config, num_trajectories=config.num_trajectories * config.selection_oversample)
    candidates = collect_trajectory_calibration(unet, scheduler, image_shape, candidates_cfg, seed=seed, device=device,
                                                progress=progress, conditioning=conditioning)
    wanted = len(candidates) // config.selection_oversample  # the pairs that the trajectories alone give
    selected = select_calibration(unet, candidates, wanted, batch_size=config.batch_size, device=device)
    selected.description.update({
        "selection_oversample": config.selection_oversample,
        "timesteps_kept": sorted({int(t) for t in selected.t.tolist()}),
    })
    return selected
