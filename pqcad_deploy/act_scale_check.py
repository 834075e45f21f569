"""Keep the learned activation scales only if the free-running sampler agrees (brecq / pqcad stage 2).

Stage 2 learns activation scales by block reconstruction on the calibration inputs, i.e. on the FP
model's trajectories. Measured on the GPU (docs/RESULTS.md section 5), that helps at 4-bit weights
(pqcad W4A8, 2,000-sample FID 26.2 learned vs 47.5 with the min-max start) but hurts at 8-bit weights
(pqcad W8A8: 42.9 learned vs 22.9): the learned scales clip tighter, the block losses on the
calibration set go down, and the student's own trajectories, which leave that set, go wrong. The
block losses cannot see this; sampling can. So after stage 2 the student samples a few images with
the teacher's DDIM grid from fixed seeds, once with its learned scales and once with the stage's
starting scales (re-observed on the same calibration set with the same frozen weights, so identical
to the start of stage 2), and keeps whichever gives images closer to the FP model's (mean PSNR).
Weights are not touched.
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

from pqcad_deploy.calibration.trajectories import CalibrationSet
from pqcad_deploy.conditioning import UNCONDITIONAL, Conditioning
from pqcad_deploy.eval.pipeline_sampling import Decode, generate_images
from pqcad_deploy.eval.psnr import mean_psnr
from pqcad_deploy.presets import ScaleCheckConfig
from pqcad_deploy.quant.replace import quant_layers

__all__ = ["ScaleCheckConfig", "keep_better_activation_scales"]

_SEED_OFFSET = 1_000_003
"""Check images are seeded away from the calibration noise (which uses seed, seed + 1, ...)."""


def _act_scales(student: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: layer.input_quantizer.scale.detach().clone()
            for name, layer in quant_layers(student).items()
            if layer.input_quantizer.quantizes and layer.input_quantizer.enabled}


def _set_act_scales(student: torch.nn.Module, scales: dict[str, torch.Tensor]) -> None:
    layers = quant_layers(student)
    for name, scale in scales.items():
        layers[name].input_quantizer.set_scale(scale)


@torch.no_grad()
def keep_better_activation_scales(fp_unet: torch.nn.Module, student: torch.nn.Module, calibration: CalibrationSet,
                                  scheduler_config: dict, steps: int, act_scale_init: str, batch_size: int,
                                  config: ScaleCheckConfig, seed: int, device: str,
                                  conditioning: Conditioning = UNCONDITIONAL, decode: Decode | None = None) -> dict:
    """Compare learned and starting activation scales on sampled images; keep the better in `student`.

    Returns the report entry: both PSNRs, the number of images and steps, and which scales were kept.
    """
    from pqcad_deploy.methods.brecq import calibrate_activations

    check_seed = seed + _SEED_OFFSET

    def images(unet: torch.nn.Module) -> np.ndarray:
        return generate_images(unet, scheduler_config, config.images, steps, seed=check_seed,
                               batch_size=config.images, device=device, progress=False,
                               conditioning=conditioning, decode=decode).images

    reference = images(fp_unet)
    learned = _act_scales(student)
    psnr_learned = mean_psnr(images(student), reference)
    # the weights are frozen in stage 2, so observing again gives exactly the scales it started from
    calibrate_activations(student, calibration, batch_size, init=act_scale_init, device=device, progress=False,
                          seed=seed)
    psnr_initial = mean_psnr(images(student), reference)
    kept = "initial" if psnr_initial > psnr_learned else "learned"
    if kept == "learned":
        _set_act_scales(student, learned)
    student.eval()
    return {"config": asdict(config), "steps": steps, "seed": check_seed, "psnr_learned_db": psnr_learned,
            "psnr_initial_db": psnr_initial, "initial": act_scale_init, "kept": kept}
