"""Which data should bias correction be estimated on? A CPU proxy over one compressed artifact.

RESULTS section 15 found bias correction (estimated on the calibration set: the FP model's DDIM
trajectories at pqcad's normally distributed timesteps) fixing the CIFAR-10 model's colour drift
but brightening the Fashion-MNIST model's images. This script applies variants of the correction to
the student of one artifact compressed *without* it and measures, on `--n` images sampled at the
teacher's steps (image i seeded with i, the FID protocol), the per-channel mean (0-255) against the
FP model's images from the same seeds and the mean PSNR against them:

- ``none``: the student as compressed;
- ``qc``: what ``compress --bias-correction`` does (the artifact's own calibration set, redrawn);
- ``uniform``: the FP trajectories' every timestep equally (how the sampler visits them;
  ``compress --bias-correction-data fp-uniform``);
- ``student``: the student's own DDIM trajectories, every timestep equally (FP and student layers
  both evaluated on the student's x_t; ``compress --bias-correction-data student``);
- ``out``: only conv_out corrected, on the calibration set;
- ``weights_only``: no correction, every input quantizer switched off (the weights' share of the drift).

    python -m scripts.bias_correction_variants_cpu ART [--n 32] [--variants none,qc,uniform,student,out]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--variants", default="none,qc,uniform,student,out")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import numpy as np

    from pqcad_deploy.artifact import load_artifact
    from pqcad_deploy.calibration.qc import collect_qc_calibration
    from pqcad_deploy.calibration.trajectories import collect_trajectory_calibration
    from pqcad_deploy.schedule import make_ddim_scheduler
    from pqcad_deploy.config import CalibrationConfig
    from pqcad_deploy.eval.pipeline_sampling import generate_images
    from pqcad_deploy.eval.psnr import mean_psnr
    from pqcad_deploy.layer_precision import LAST_LAYER
    from pqcad_deploy.quant.bias_correction import correct_biases
    from pqcad_deploy.quant.replace import quant_layers

    art = load_artifact(args.artifact)
    m = art.manifest
    teacher = art.build_teacher()
    cal_cfg = CalibrationConfig(**m.options["calibration"])
    steps = m.teacher_steps

    def sample(unet):
        return generate_images(unet, m.scheduler_config, args.n, m.student_steps, seed=0, batch_size=args.n,
                               progress=False).images

    def means(images) -> list[float]:
        return [round(float(v), 3) for v in images.reshape(-1, images.shape[-1]).astype(np.float64).mean(axis=0)]

    fp_images = sample(teacher)
    results = {"artifact": str(args.artifact), "n": args.n, "fp_means": means(fp_images), "variants": {}}
    print("fp", results["fp_means"], flush=True)
    for variant in args.variants.split(","):
        started = time.perf_counter()
        student = art.build_student()
        names = list(quant_layers(student)) + [LAST_LAYER]
        report = None
        if variant == "weights_only":
            for layer in quant_layers(student).values():
                layer.input_quantizer.enabled = False
        elif variant != "none":
            if variant in ("qc", "out"):
                data = collect_qc_calibration(teacher, m.scheduler_config, tuple(m.image_shape), steps, cal_cfg,
                                              seed=int(m.options["seed"]), progress=False)
            elif variant in ("uniform", "student"):  # what compress --bias-correction-data fp-uniform / student use
                spread = dataclasses.replace(cal_cfg, timestep_sampling="uniform", selection="none")
                data = collect_trajectory_calibration(teacher if variant == "uniform" else student,
                                                      make_ddim_scheduler(m.scheduler_config, steps),
                                                      tuple(m.image_shape), spread,
                                                      seed=int(m.options["seed"]), progress=False)
            else:
                raise SystemExit(f"unknown variant {variant!r}")
            report = correct_biases(teacher, student, [LAST_LAYER] if variant == "out" else names, data,
                                    progress=False)
        images = sample(student)
        row_means = means(images)
        row = {"means": row_means, "drift": [round(a - b, 3) for a, b in zip(row_means, results["fp_means"])],
               "psnr_vs_fp_db": round(float(mean_psnr(images, fp_images)), 3),
               "seconds": round(time.perf_counter() - started, 1)}
        if report is not None:
            row["estimation_samples"] = report["samples"]
        results["variants"][variant] = row
        print(variant, json.dumps(row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
