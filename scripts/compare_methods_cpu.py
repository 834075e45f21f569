"""The CPU proxy of issue 4: each method's student against the FP model, on the same inputs.

For each (method, bits): compress the embedded model, then measure
- noise-prediction SQNR on a common held-out set (FP DDIM trajectories from another seed, uniform
  timesteps), so that no method is scored on its own calibration data;
- PSNR of its DDIM images against the FP model's images from the same initial noise (image i
  seeded with i, diffusers DDIMPipeline), averaged over the images.
Prints one JSON line per row and writes all rows to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--methods", default="minmax,brecq,pqcad")
    ap.add_argument("--bits", default="4/8", help="comma-separated W/A pairs, e.g. 8/8,4/8")
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--seeds", type=int, default=64)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--avg-weight-bits", type=float, default=None,
                    help="mixed-precision budget for the 4-bit-weight rows (compress --avg-weight-bits)")
    ap.add_argument("--calibration-selection", default="none", help="compress --calibration-selection")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch

    from pqcad_deploy.artifact import load_artifact
    from pqcad_deploy.calibration.trajectories import collect_trajectory_calibration
    from pqcad_deploy.schedule import make_ddim_scheduler
    from pqcad_deploy.compress import compress
    from pqcad_deploy.config import CalibrationConfig, CompressConfig
    from pqcad_deploy.eval.pipeline_sampling import generate_images
    from pqcad_deploy.eval.psnr import mean_psnr
    from pqcad_deploy.eval.sqnr import sqnr_db
    from pqcad_deploy.models import load_model

    fp = load_model("builtin")
    held_out = collect_trajectory_calibration(
        fp.unet, make_ddim_scheduler(fp.scheduler_config, args.steps), (1, 32, 32),
        CalibrationConfig(num_trajectories=8, timesteps_kept=16, batch_size=8), seed=12345, progress=False)
    fp_images = generate_images(fp.unet, fp.scheduler_config, args.seeds, args.steps, seed=0,
                                batch_size=args.seeds, progress=False).images

    def sqnr(student) -> float:
        with torch.no_grad():
            ref = fp.unet(held_out.x, held_out.t).sample.double()
            out = student(held_out.x, held_out.t).sample.double()
        return sqnr_db(ref.numpy(), out.numpy())

    rows = []
    for bits in args.bits.split(","):
        wb, ab = (int(b) for b in bits.split("/"))
        for method in args.methods.split(","):
            art = Path(f"/tmp/compare_{method}_w{wb}a{ab}_{args.preset}")
            t = time.perf_counter()
            avg = args.avg_weight_bits if wb < 8 else None
            config = CompressConfig(method=method, weight_bits=wb, act_bits=ab, teacher_steps=args.steps,
                                    preset=args.preset, seed=0, avg_weight_bits=avg, distill=False)
            if args.calibration_selection != "none":
                config = dataclasses.replace(config, calibration=dataclasses.replace(
                    config.calibration_config, selection=args.calibration_selection))
            compress(config, art, overwrite=True, progress=False)
            seconds = time.perf_counter() - t
            student = load_artifact(art).build_student()
            images = generate_images(student, fp.scheduler_config, args.seeds, args.steps, seed=0,
                                     batch_size=args.seeds, progress=False).images
            psnr = mean_psnr(images, fp_images)
            row = {"method": method, "weight_bits": wb, "act_bits": ab, "preset": args.preset,
                   "avg_weight_bits": avg, "calibration_selection": args.calibration_selection,
                   "compress_seconds": round(seconds, 1), "heldout_sqnr_db": round(sqnr(student), 2),
                   "psnr_vs_fp_db": round(psnr, 2), "seeds": args.seeds, "steps": args.steps}
            print(json.dumps(row), flush=True)
            rows.append(row)
            Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
