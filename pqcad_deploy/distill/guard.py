"""The distillation guard: an artifact is never worse than plain step halving of its own PQ student.

CAD trains the student to take the teacher's two DDIM steps in one. Measured (issue 14's table), it
sometimes makes the student worse than simply sampling the undistilled PQ student on the halved grid.
The block losses and the distillation loss cannot see that; the sampler can. So after CAD both
students sample the same few images on the student's K-step grid from held-out seeds, each is scored
by its mean PSNR against the FP model's images at the original teacher's steps from the same seeds
(the quality CAD aims at: 2K steps in round 1, 2^R K after R rounds), and the distilled student is
kept only when it is better beyond the noise of that check (``GuardConfig.min_z``). Both numbers, the
gain with its standard error and the decision go into the report (``distillation.guard``).
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

from pqcad_deploy.eval.pipeline_sampling import generate_images
from pqcad_deploy.eval.psnr import mean_psnr, psnr_per_image
from pqcad_deploy.presets import GuardConfig

__all__ = ["GuardConfig", "GUARD_SEED_OFFSET", "guard_distillation", "paired_gain"]

GUARD_SEED_OFFSET = 2_000_003
"""Guard images are seeded away from the calibration noise, C_DC and the activation-scale check."""


def paired_gain(psnr_distilled: np.ndarray, psnr_undistilled: np.ndarray) -> tuple[float, float]:
    """(mean per-image PSNR gain of the distilled student, the standard error of that mean), in dB.

    Both students sample from the same seeds, so the per-image differences are paired: their spread is
    the noise of the check, whatever the images' own spread. One image gives no spread (error 0).
    """
    gains = np.asarray(psnr_distilled, dtype=np.float64) - np.asarray(psnr_undistilled, dtype=np.float64)
    error = float(gains.std(ddof=1) / np.sqrt(len(gains))) if len(gains) > 1 else 0.0
    return float(gains.mean()), error


@torch.no_grad()
def guard_distillation(fp_unet: torch.nn.Module, distilled: torch.nn.Module, undistilled: torch.nn.Module,
                       scheduler_config: dict, teacher_steps: int, student_steps: int, config: GuardConfig,
                       seed: int, device: str, also_against: int | None = None) -> tuple[torch.nn.Module, dict]:
    """(the kept student, the report entry) by per-image PSNR against FP at `teacher_steps`.

    The distilled student is kept when its mean gain is positive and larger than `config.min_z`
    standard errors (:func:`paired_gain`); ties and gains within the noise keep the undistilled one.
    `also_against` records both students' PSNR against FP at other steps too, without changing the
    decision. `distill_rounds` judges every round against FP at the original teacher steps and records
    the round's own teacher steps here: GPU round 2 of issue 14 (RESULTS section 20) judged round 2 of
    20 -> 10 -> 5 against FP-10 and rejected it in 3 of 4 runs (-0.17 to -0.49 dB) although against
    FP-20 it was 2.0-7.2 dB better in all 4; FP-10 is itself a poor sampler (CIFAR-10 FID 30.2 against
    the 10-step student's 23.7), and where round 2 was kept its FID at 5 steps fell from 49.7 to 33.5.
    """
    check_seed = seed + GUARD_SEED_OFFSET

    def images(unet: torch.nn.Module, steps: int) -> np.ndarray:
        return generate_images(unet, scheduler_config, config.images, steps, seed=check_seed,
                               batch_size=config.images, device=device, progress=False).images

    students = images(distilled, student_steps), images(undistilled, student_steps)
    reference = images(fp_unet, teacher_steps)
    per_image = [psnr_per_image(x, reference) for x in students]
    gain, error = paired_gain(*per_image)
    kept = "distilled" if gain > 0 and gain > config.min_z * error else "undistilled"
    report = {"config": asdict(config), "seed": check_seed, "reference_steps": teacher_steps,
              "student_steps": student_steps, "psnr_distilled_db": float(per_image[0].mean()),
              "psnr_undistilled_db": float(per_image[1].mean()), "psnr_gain_db": gain,
              "psnr_gain_standard_error_db": error, "kept": kept}
    if also_against is not None and also_against != teacher_steps:
        other = images(fp_unet, also_against)
        report["also_against"] = {"reference_steps": also_against, "psnr_distilled_db": mean_psnr(students[0], other),
                                  "psnr_undistilled_db": mean_psnr(students[1], other)}
    return (distilled if kept == "distilled" else undistilled).eval(), report
