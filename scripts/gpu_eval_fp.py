"""Issue 3's measurements, in one run on the GPU machine (see docs/RESULTS.md for the command).

1. Reference statistics of the 60,000 Fashion-MNIST training images (project code, standard FID
   Inception weights), written compact so they fit the machine's 16 MiB return limit.
2. FID of the embedded FP model with DDIM 100 and 50 steps, 10,000 samples each, image i seeded
   with seed + i (pqcad_deploy.eval.pipeline_sampling), plus a rerun of DDIM-100 with the same seeds to show
   the number reproduces.
3. If time is left: the min-max PTQ baselines (W8A8, W4A8, W4A4) at DDIM-100 on the same seeds.
Everything printed also goes to results.json in --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--weights", required=True, help="FID Inception weights (default_1.pt)")
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--ref-limit", type=int, default=None, help="only for smoke tests")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--extras-budget-s", type=float, default=330.0,
                    help="run the min-max baselines only while the elapsed time is below this")
    args = ap.parse_args()

    import numpy as np
    import torch

    from pqcad_deploy.engines.images import save_grid
    from pqcad_deploy.eval.fid import FidStatistics, compute_statistics
    from pqcad_deploy.eval.pipeline_sampling import generate_images
    from pqcad_deploy.eval.inception import InceptionFeatures
    from pqcad_deploy.eval.reference_stats import reference_statistics
    from pqcad_deploy.models import load_model

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"n": args.n, "seed": args.seed, "device": args.device,
                     "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
                     "torch": torch.__version__, "rows": {}}

    def save_results() -> None:
        (out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))

    extractor = InceptionFeatures(args.device, weights=args.weights, batch_size=500)
    t = time.perf_counter()
    ref = reference_statistics(Path("/tmp/fid_ref_cache.npz"), device=args.device, batch_size=500,
                               data_dir=args.data_dir, progress=False, recompute=True, limit=args.ref_limit,
                               weights=args.weights, extractor=extractor)
    ref.save(out / "fashion_mnist_train_fid_stats.npz", compact=True)
    ref_compact = FidStatistics.load(out / "fashion_mnist_train_fid_stats.npz")
    results["reference"] = {"count": ref.count, "seconds": time.perf_counter() - t}
    print("reference stats", ref.count, f"{results['reference']['seconds']:.1f}s", flush=True)

    def fid_row(name: str, unet, scheduler_config: dict, steps: int) -> np.ndarray:
        gen = generate_images(unet, scheduler_config, args.n, steps, seed=args.seed,
                              batch_size=args.batch_size, device=args.device, progress=False)
        t = time.perf_counter()
        stats = compute_statistics(gen.images, device=args.device, batch_size=500, progress=False,
                                   source=name, extractor=extractor)
        fid = stats.frechet_distance(ref)
        fid_compact = stats.frechet_distance(ref_compact)
        results["rows"][name] = {"fid": fid, "fid_vs_compact_reference": fid_compact, "steps": steps,
                                 "generate_seconds": gen.seconds, "images_per_second": gen.images_per_second,
                                 "fid_seconds": time.perf_counter() - t}
        print(name, json.dumps(results["rows"][name]), flush=True)
        save_results()
        return gen.images

    model = load_model("builtin")
    images100 = fid_row("fp_ddim100", model.unet, model.scheduler_config, 100)
    images50 = fid_row("fp_ddim50", model.unet, model.scheduler_config, 50)
    save_grid(images100[:64], out / "grid_fp_ddim100.png", ncols=8)
    save_grid(images50[:64], out / "grid_fp_ddim50.png", ncols=8)
    feats = extractor(images100[:256])
    np.savez(out / "crosscheck_fp_ddim100_first256.npz", images=images100[:256], features=feats)
    rerun = fid_row("fp_ddim100_rerun", model.unet, model.scheduler_config, 100)
    results["rerun_identical_images"] = bool(np.array_equal(rerun, images100))

    from pqcad_deploy.artifact import load_artifact
    from pqcad_deploy.compress import compress
    from pqcad_deploy.config import CompressConfig

    for wb, ab in ((8, 8), (4, 8), (4, 4)):
        if time.perf_counter() - t0 > args.extras_budget_s:
            results.setdefault("skipped", []).append(f"minmax_w{wb}a{ab}")
            continue
        art = Path(f"/tmp/minmax_w{wb}a{ab}")
        try:
            t = time.perf_counter()
            compress(CompressConfig(method="minmax", distill=False, weight_bits=wb, act_bits=ab, teacher_steps=100,
                                    preset="default", device=args.device, seed=args.seed),
                     art, overwrite=True, progress=False)
            compress_s = time.perf_counter() - t
            student = load_artifact(art).build_student()
            fid_row(f"minmax_w{wb}a{ab}_ddim100", student, model.scheduler_config, 100)
            results["rows"][f"minmax_w{wb}a{ab}_ddim100"]["compress_seconds"] = compress_s
        except Exception as exc:  # extras must never cost the main rows
            results.setdefault("errors", []).append(f"minmax_w{wb}a{ab}: {type(exc).__name__}: {exc}")
            print("extra failed", results["errors"][-1], flush=True)
    results["total_seconds"] = time.perf_counter() - t0
    save_results()
    print("total", f"{results['total_seconds']:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
