"""FID (10k, DDIM, shared seeds) of compressed students made on the GPU, one row per method/bits.

Each row: compress the embedded model with `--device cuda`, then sample its fake-quant student
through diffusers' DDIMPipeline (image i seeded with seed + i, as for the FP rows of
docs/RESULTS.md) and compute FID against the shipped reference statistics. Rows are written to
results.json as they finish; rows that would start after --budget-s are skipped and listed.

A row is ``method:weight_bits:act_bits`` plus optional flags after more colons:
- ``cad``: compress with CAD (``--distill``): the student is sampled on its own N/2-step timesteps
  (for the builtin model diffusers' N/2 grid; checked against the artifact).
- ``half``: also sample the (undistilled) student with N/2 DDIM steps: plain halving of a PQ model.
- ``diag``: two extra --diag-n-sample FIDs of the same student: its activation scales replaced by
  min-max ones on the same calibration set (does learning the scales help the free-running
  sampler?) and no activation quantization (the weights' share); one N-sample FP FID is added once.

Every sampled row also gets the CPU proxy's number on the GPU: mean PSNR of its first --psnr-seeds
images against the FP model's N-step images from the same seeds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", default="pqcad:4:8,brecq:4:8", help="method:weight_bits:act_bits,...")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--budget-s", type=float, default=330.0)
    ap.add_argument("--diag-n", type=int, default=2000)
    ap.add_argument("--psnr-seeds", type=int, default=64)
    args = ap.parse_args()

    import torch

    from pqcad_deploy.artifact import load_artifact
    from pqcad_deploy.compress import compress
    from pqcad_deploy.config import CompressConfig
    from pqcad_deploy.eval.fid import FidStatistics, compute_statistics
    from pqcad_deploy.eval.fid_sources import default_reference_path
    from pqcad_deploy.eval.pipeline_sampling import generate_images
    from pqcad_deploy.eval.inception import InceptionFeatures
    from pqcad_deploy.eval.psnr import mean_psnr
    from pqcad_deploy.models import load_model
    from pqcad_deploy.schedule import ddim_timesteps

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "n": args.n,
               "steps": args.steps, "preset": args.preset, "rows": {}, "skipped": [], "errors": []}
    save = lambda: (out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))  # noqa: E731
    ref = FidStatistics.load(default_reference_path())
    extractor = InceptionFeatures("cuda", weights=args.weights, batch_size=500)
    fp = load_model("builtin")
    scheduler_config = fp.scheduler_config

    def generate_and_score(unet, n: int, steps: int, source: str):
        """(the n generated images, their FID)."""
        gen = generate_images(unet, scheduler_config, n, steps, seed=0, batch_size=1000, device="cuda",
                              progress=False)
        stats = compute_statistics(gen.images, device="cuda", batch_size=500, progress=False, source=source,
                                   extractor=extractor)
        return gen, stats.frechet_distance(ref)

    def fid_of(unet, n: int, source: str) -> float:
        return generate_and_score(unet, n, args.steps, source)[1]

    fp_images = generate_images(fp.unet, scheduler_config, args.psnr_seeds, args.steps, seed=0,
                                batch_size=args.psnr_seeds, device="cuda", progress=False).images

    def sample_row(unet, steps: int, source: str) -> dict:
        gen, fid = generate_and_score(unet, args.n, steps, source)
        return {"fid": fid, "sample_steps": steps, "generate_seconds": gen.seconds,
                "psnr_vs_fp_db": mean_psnr(gen.images[:args.psnr_seeds], fp_images)}

    for row in args.rows.split(","):
        method, wb, ab, *flags = row.split(":")
        unknown = set(flags) - {"cad", "half", "diag"}
        if unknown:
            raise SystemExit(f"unknown row flags {sorted(unknown)} in {row!r}")
        name = f"{method}_w{wb}a{ab}_ddim{args.steps}" + ("_cad" if "cad" in flags else "")
        if time.perf_counter() - t0 > args.budget_s:
            results["skipped"].append(name)
            continue
        try:
            if "diag" in flags and "diag_fp_fid" not in results:
                results["diag_fp_fid"] = fid_of(fp.unet, args.diag_n, "fp")
                print("diag fp", results["diag_fp_fid"], flush=True)
            art = Path(f"/tmp/{name}")
            t = time.perf_counter()
            result = compress(CompressConfig(method=method, weight_bits=int(wb), act_bits=int(ab),
                                             teacher_steps=args.steps, preset=args.preset, device="cuda", seed=0,
                                             distill="cad" in flags),
                              art, overwrite=True, progress=False)
            compress_s = time.perf_counter() - t
            artifact = load_artifact(art)
            steps = artifact.manifest.student_steps
            if list(artifact.manifest.student_timesteps) != ddim_timesteps(scheduler_config, steps):
                raise RuntimeError("the student's timesteps are not diffusers' grid; DDIMPipeline would not run them")
            row_out = {"compress_seconds": compress_s, "calibration_sqnr_db": result.noise_pred_sqnr_db,
                       **sample_row(artifact.build_student(), steps, name)}
            report = json.loads((art / "report.json").read_text())
            if "act_scale_check" in report:
                row_out["act_scale_check"] = report["act_scale_check"]
            if "distillation" in report:
                row_out["distill_final_loss"] = sum(report["distillation"]["losses"][-100:]) / 100
            results["rows"][name] = row_out
            print(name, json.dumps(row_out), flush=True)
            if "half" in flags:
                results["rows"][name + "_at_half_steps"] = sample_row(artifact.build_student(), steps // 2,
                                                                      name + "_half")
                print(name, "at half steps", json.dumps(results["rows"][name + "_at_half_steps"]), flush=True)
            if "diag" in flags:
                results["rows"][name]["diag"] = diagnostics(artifact, fid_of, args.diag_n, name)
                print(name, "diag", json.dumps(results["rows"][name]["diag"]), flush=True)
        except Exception as exc:  # one failing row must not cost the others
            results["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
            print("failed", results["errors"][-1], flush=True)
        save()
    results["total_seconds"] = time.perf_counter() - t0
    save()
    return 0


def diagnostics(artifact, fid_of, n: int, name: str) -> dict:
    """FID at n samples: as compressed, min-max activation scales, and no activation quantization."""
    import torch

    from pqcad_deploy.calibration.qc import collect_qc_calibration
    from pqcad_deploy.config import CalibrationConfig
    from pqcad_deploy.methods.minmax import calibrate_activations_minmax
    from pqcad_deploy.quant.replace import quant_layers

    out = {"n": n, "as_compressed": fid_of(artifact.build_student(), n, name)}
    student = artifact.build_student().to("cuda").eval()
    teacher = artifact.build_teacher().to("cuda").eval()
    cal = collect_qc_calibration(teacher, artifact.manifest.scheduler_config, tuple(artifact.manifest.image_shape),
                                 artifact.manifest.teacher_steps,
                                 CalibrationConfig(**artifact.manifest.options["calibration"]), seed=0,
                                 device="cuda", progress=False)
    with torch.no_grad():
        calibrate_activations_minmax(student, cal, 32, device="cuda", progress=False)
    out["minmax_act_scales"] = fid_of(student, n, name + "_mm")
    for layer in quant_layers(student).values():
        layer.input_quantizer.enabled = False
    out["weights_only"] = fid_of(student, n, name + "_w")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
