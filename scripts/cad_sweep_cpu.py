"""A CPU proxy sweep of CAD's training settings (issue 14, item 2), before the GPU round.

One PQ student (``--preset fast --no-distill`` at the given teacher steps) is distilled once per
variant on C_DC drawn from the FP model, on the fast preset's sizes unless a variant says otherwise;
for each variant: the loss on held-out C_DC pairs before and after, and the mean PSNR of `n` images
sampled at the student's K steps against the FP model's at 2K steps from the same seeds (the guard's
measure, distill.guard), beside the undistilled student's PSNR at K steps (plain step halving). It is
a proxy (a few images, a short training), not FID.

    python -m scripts.cad_sweep_cpu --model builtin --steps 20 --json fm.json
    python -m scripts.cad_sweep_cpu --model builtin:cifar10 --steps 20 --json cf.json

Every variant changes one setting of the base (lr 1e-5, 200 iterations of batch 8, 64 fixed pairs, every
float parameter trained): the learning rate first measured 1e-4 and 1e-3 as much worse on both models.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import tempfile
import time
from pathlib import Path

VARIANTS: dict[str, tuple[dict, dict]] = {
    # name: (DistillConfig overrides, DCConfig overrides); the base is the fast preset at `--iters`
    "base lr 1e-5": ({}, {}),
    "lr 3e-6": ({"lr": 3e-6}, {}),
    "lr 1e-4": ({"lr": 1e-4}, {}),
    "lr 1e-3": ({"lr": 1e-3}, {}),
    "only quantizer params": ({"train_other": False}, {}),
    "fresh pairs": ({}, {"fresh": True, "trajectories": 16}),
    "fresh + EMA 0.99": ({"ema_decay": 0.99}, {"fresh": True, "trajectories": 16}),
    "warm-up 20 + cosine": ({"warmup_iters": 20, "lr_decay": "cosine"}, {}),
    "RDD 0.1": ({"rdd_weight": 0.1}, {}),
    "2x iterations": ({"iters": None}, {}),  # --iters doubled
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--steps", type=int, default=20, help="teacher steps (the student samples half)")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--n", type=int, default=16, help="images for the PSNR against FP")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    ap.add_argument("--json")
    args = ap.parse_args()

    from pqcad_deploy.artifact import load_artifact
    from pqcad_deploy.compress import compress
    from pqcad_deploy.config import CompressConfig
    from pqcad_deploy.distill.cad import distill
    from pqcad_deploy.distill.dc import HELDOUT_SEED_OFFSET, collect_dc
    from pqcad_deploy.distill.grid import distill_grid
    from pqcad_deploy.distill.guard import GuardConfig, guard_distillation
    from pqcad_deploy.presets import PRESETS

    with tempfile.TemporaryDirectory() as tmp:
        art_dir = Path(tmp) / "art"
        compress(CompressConfig(model=args.model, teacher_steps=args.steps, preset="fast", distill=False), art_dir,
                 progress=False)
        art = load_artifact(art_dir)
        fp, student0 = art.build_teacher().eval(), art.build_student().eval()
    sched = art.manifest.scheduler_config
    shape = tuple(art.manifest.image_shape)
    grid = distill_grid(sched, args.steps)
    heldout = collect_dc(fp, sched, grid, shape, dataclasses.replace(PRESETS["fast"].heldout, size=32,
                                                                     seed=HELDOUT_SEED_OFFSET), progress=False)
    rows = {}
    for name in args.variants.split(","):
        d_over, dc_over = VARIANTS[name]
        iters = 2 * args.iters if "iters" in d_over else args.iters
        d_over = {k: v for k, v in d_over.items() if k != "iters"}
        dcfg = dataclasses.replace(PRESETS["fast"].distill, iters=iters, heldout_every=max(iters // 4, 1), **d_over)
        dc_set = collect_dc(fp, sched, grid, shape, dataclasses.replace(PRESETS["fast"].dc, **dc_over), progress=False)
        started = time.perf_counter()
        student, report = distill(copy.deepcopy(student0), fp, sched, args.steps, dc_set, dcfg, progress=False,
                                  heldout=heldout)
        seconds = time.perf_counter() - started
        _, guard = guard_distillation(fp, student, student0, sched, args.steps, len(grid.student),
                                      GuardConfig(images=args.n), seed=0, device="cpu")
        rows[name] = {"heldout": report.heldout, "psnr_distilled_db": guard["psnr_distilled_db"],
                      "psnr_undistilled_db": guard["psnr_undistilled_db"], "seconds": seconds,
                      "distill": d_over, "dc": dc_over}
        print(f"{name:34s} held-out {report.heldout[0][1]:.4g} -> {report.heldout[-1][1]:.4g}  PSNR vs FP-{args.steps} "
              f"{guard['psnr_distilled_db']:.2f} dB (undistilled {guard['psnr_undistilled_db']:.2f})  {seconds:.0f} s",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "steps": args.steps, "iters": args.iters,
                                               "n": args.n, "rows": rows}, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
