"""FID (10k, DDIM, shared seeds) of compressed students made on the GPU, one row per method/bits.

Each row: compress the embedded model with `--device cuda`, then sample its fake-quant student
through diffusers' DDIMPipeline (image i seeded with seed + i, as for the FP rows of
docs/RESULTS.md) and compute FID against the shipped reference statistics. Rows are written to
results.json as they finish; rows that would start after --budget-s are skipped and listed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", default="pqcad:4:8,brecq:4:8", help="method:weight_bits:act_bits,...")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--budget-s", type=float, default=330.0)
    args = ap.parse_args()

    import torch

    from pqcad_deploy.artifact import load_artifact
    from pqcad_deploy.compress import compress
    from pqcad_deploy.config import CompressConfig
    from pqcad_deploy.eval.fid import FidStatistics, compute_statistics
    from pqcad_deploy.eval.fid_sources import default_reference_path
    from pqcad_deploy.eval.generate import generate_images
    from pqcad_deploy.eval.inception import InceptionFeatures
    from pqcad_deploy.models import load_model

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "n": args.n,
               "steps": args.steps, "preset": args.preset, "rows": {}, "skipped": [], "errors": []}
    save = lambda: (out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))  # noqa: E731
    ref = FidStatistics.load(default_reference_path())
    extractor = InceptionFeatures("cuda", weights=args.weights, batch_size=500)
    scheduler_config = load_model("builtin").scheduler_config
    for row in args.rows.split(","):
        method, wb, ab = row.split(":")
        name = f"{method}_w{wb}a{ab}_ddim{args.steps}"
        if time.perf_counter() - t0 > args.budget_s:
            results["skipped"].append(name)
            continue
        try:
            art = Path(f"/tmp/{name}")
            t = time.perf_counter()
            result = compress(CompressConfig(method=method, weight_bits=int(wb), act_bits=int(ab),
                                             teacher_steps=args.steps, preset=args.preset, device="cuda", seed=0),
                              art, overwrite=True, progress=False)
            compress_s = time.perf_counter() - t
            student = load_artifact(art).build_student()
            gen = generate_images(student, scheduler_config, args.n, args.steps, seed=0, batch_size=1000,
                                  device="cuda", progress=False)
            stats = compute_statistics(gen.images, device="cuda", batch_size=500, progress=False, source=name,
                                       extractor=extractor)
            results["rows"][name] = {"fid": stats.frechet_distance(ref), "compress_seconds": compress_s,
                                     "calibration_sqnr_db": result.noise_pred_sqnr_db,
                                     "generate_seconds": gen.seconds}
            print(name, json.dumps(results["rows"][name]), flush=True)
        except Exception as exc:  # one failing row must not cost the others
            results["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
            print("failed", results["errors"][-1], flush=True)
        save()
    results["total_seconds"] = time.perf_counter() - t0
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
