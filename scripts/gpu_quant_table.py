"""Issue 13's quantization table on the GPU machine: both builtin models, every method and bit-width,
each improvement's ablation row; FID at 10,000 samples with shared seeds and per-channel pixel means.

Two phases, so that the work runs as detached processes side by side on the one GPU while the FID
weights are still travelling in pieces (docs/RESULTS.md section 15):

- ``make ROWS``: for each row, compress with ``--device cuda --preset default --no-distill`` (unless
  ``cad``), sample the fake-quant student through diffusers' DDIMPipeline at the teacher's steps
  (pqcad_deploy.eval.generate: image i seeded with i, the protocol of every FID in RESULTS), and
  write ``CACHE/NAME.npy`` (uint8 images) and ``CACHE/NAME.json`` (compress time, calibration SQNR,
  per-channel means, the report's precision-policy and bias-correction summary). A row whose json
  exists is skipped (resumable).
- ``score``: FID of every cached row against its model's shipped reference statistics, written to
  ``OUT/results.json`` with the FP rows' channel means beside each row's.

A row is ``model:method:weight_bits:act_bits[:flag...]`` with model ``fmnist`` or ``cifar10``,
method ``fp`` (the FP model itself; bits ignored) / ``minmax`` / ``brecq`` / ``pqcad``, and flags
``all`` / ``safe`` (``--precision-policy all`` / ``tensorrt-safe``), ``bc`` / ``nobc``
(``--bias-correction`` / ``--no-bias-correction``); unflagged options take compress's defaults, which
were ``tensorrt-safe`` + bias correction for the first run of RESULTS section 15; ``fl=POLICY``
(``--first-last``), ``init=INIT`` (``--act-scale-init``), ``split=CHOICE`` (``--split-concat``),
``sq=ALPHA`` (``--smoothquant-alpha``), ``bcdata=DATA`` (``--bias-correction-data``), ``cad`` (distil;
sampled at its own steps). CAD rows (issue 14): ``steps=N`` (teacher steps; an ``fp`` row samples with
them), ``r=R`` (``--rounds``), and the distillation settings ``it=`` iterations, ``lr=``, ``bs=`` batch,
``ema=`` decay, ``wu=`` warm-up iterations, ``cos`` (cosine decay), ``rdd=`` weight, ``clip=`` gradient
norm, ``fresh`` (fresh C_DC pairs), ``mix=`` (their noise-injection share), ``dcn=`` (C_DC size),
``traj=`` (pool trajectories), e.g. ``cifar10:pqcad:8:8:cad:steps=20:fresh:ema=0.999:cos:it=4000``.

    python3 scripts/gpu_quant_table.py make --rows fmnist:pqcad:8:8,... --cache /tmp/q13
    python3 scripts/gpu_quant_table.py score --weights /tmp/default_1.pt --cache /tmp/q13 --out $OUT \\
        [--expect 40 --follow-s 600]   # score rows as they are made
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {"fmnist": "builtin:fashion-mnist", "cifar10": "builtin:cifar10"}
REFERENCES = {"fmnist": ROOT / "pqcad_deploy/eval/data/fashion_mnist_train_fid_stats.npz",
              "cifar10": ROOT / "pqcad_deploy/eval/data/cifar10_train_fid_stats.npz"}
OPTION_FLAGS = {"fl": "first_last", "init": "act_scale_init", "split": "split_concat", "sq": "smoothquant_alpha",
                "bcdata": "bias_correction_data"}
FLOAT_OPTIONS = {"smoothquant_alpha"}
# CAD settings of a row (issue 14's sweep): flag -> (preset table, field, type); applied to the row's
# preset for that row only (distill_overrides). ``cos`` and ``fresh`` take no value.
DISTILL_FLAGS = {"it": ("distill", "iters", int), "lr": ("distill", "lr", float), "bs": ("distill", "batch_size", int),
                 "ema": ("distill", "ema_decay", float), "wu": ("distill", "warmup_iters", int),
                 "rdd": ("distill", "rdd_weight", float), "clip": ("distill", "grad_clip", float),
                 "mix": ("dc", "mix", float), "dcn": ("dc", "size", int), "traj": ("dc", "trajectories", int)}


def row_name(row: str) -> str:
    return row.replace(":", "_").replace("=", "-")


def parse_row(row: str) -> tuple[str, str, int, int, dict]:
    """(model, method, weight bits, act bits, CompressConfig options); CAD flags: :func:`distill_overrides`,
    ``steps=N``: :func:`row_steps`."""
    model, method, wb, ab, *flags = row.split(":")
    if model not in MODELS:
        raise SystemExit(f"unknown model {model!r} in {row!r}")
    options: dict = {"distill": False}
    for flag in flags:
        key, _, value = flag.partition("=")
        if key in DISTILL_FLAGS or flag in ("cos", "fresh") or key == "steps":
            continue
        if key == "r" and value:
            options["rounds"] = int(value)
        elif key in OPTION_FLAGS and value:
            options[OPTION_FLAGS[key]] = float(value) if OPTION_FLAGS[key] in FLOAT_OPTIONS else value
        elif flag in ("all", "safe"):
            options["precision_policy"] = "all" if flag == "all" else "tensorrt-safe"
        elif flag in ("bc", "nobc"):
            options["bias_correction"] = flag == "bc"
        elif flag == "cad":
            options["distill"] = True
        else:
            raise SystemExit(f"unknown row flag {flag!r} in {row!r}")
    return model, method, int(wb), int(ab), options


def row_steps(row: str, default: int) -> int:
    """The row's teacher steps (``steps=N``; the FP rows sample with them), else `default`."""
    for flag in row.split(":")[4:]:
        if flag.startswith("steps="):
            return int(flag.partition("=")[2])
    return default


def distill_overrides(row: str, preset: str):
    """A context in which the preset's CAD tables carry the row's CAD flags (issue 14's sweep)."""
    import contextlib
    import dataclasses

    from pqcad_deploy.distill import cad, dc

    changes: dict[str, dict] = {"distill": {}, "dc": {}}
    for flag in row.split(":")[4:]:
        key, _, value = flag.partition("=")
        if key in DISTILL_FLAGS:
            table, field, kind = DISTILL_FLAGS[key]
            changes[table][field] = kind(value)
        elif flag == "cos":
            changes["distill"]["lr_decay"] = "cosine"
        elif flag == "fresh":
            changes["dc"]["fresh"] = True

    @contextlib.contextmanager
    def patched():
        saved = cad.PRESET_DISTILL[preset], dc.PRESET_DC[preset]
        cad.PRESET_DISTILL[preset] = dataclasses.replace(saved[0], **changes["distill"])
        dc.PRESET_DC[preset] = dataclasses.replace(saved[1], **changes["dc"])
        try:
            yield changes
        finally:
            cad.PRESET_DISTILL[preset], dc.PRESET_DC[preset] = saved
    return patched()


def make(rows: list[str], cache: Path, steps: int, n: int, preset: str = "default", device: str = "cuda") -> None:
    import numpy as np
    import torch

    from pqcad_deploy.artifact import load_artifact
    from pqcad_deploy.compress import compress
    from pqcad_deploy.config import CompressConfig
    from pqcad_deploy.eval.generate import generate_images
    from pqcad_deploy.models import load_model

    cache.mkdir(parents=True, exist_ok=True)
    for row in rows:
        name = row_name(row)
        if (cache / f"{name}.json").exists():
            continue
        model, method, wb, ab, options = parse_row(row)
        steps_row = row_steps(row, steps)
        started = time.perf_counter()
        info: dict = {"row": row, "torch": torch.__version__, "preset": preset,
                      "gpu": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"}
        try:
            loaded = load_model(MODELS[model])
            if method == "fp":
                unet, sample_steps = loaded.unet, steps_row
            else:
                art = cache / f"art_{name}"
                config = CompressConfig(model=MODELS[model], method=method, weight_bits=wb, act_bits=ab,
                                        teacher_steps=steps_row, preset=preset, device=device, seed=0, **options)
                with distill_overrides(row, preset) as changes:
                    result = compress(config, art, overwrite=True, progress=False)
                info["distill_overrides"] = changes
                info.update(compress_seconds=time.perf_counter() - started,
                            calibration_sqnr_db=result.noise_pred_sqnr_db, quantized_layers=result.num_quantized_layers)
                artifact = load_artifact(art)
                report = json.loads((art / "report.json").read_text())
                info["float_mac_share"] = report["precision_policy"]["float_mac_share"]
                info["rewrites"] = report.get("rewrites")
                if "bias_correction" in report:
                    info["bias_correction_data"] = report["bias_correction"].get("data")
                if "distillation" in report:
                    dist = report["distillation"]
                    info["distillation"] = {"guard": dist.get("guard"), "heldout": dist.get("heldout"),
                                            "final_loss": (dist.get("losses") or [None])[-1],
                                            "rounds": [{"guard": r.get("guard"), "heldout": r.get("heldout")}
                                                       for r in dist.get("rounds", [])]}
                if "act_scale_check" in report:
                    info["act_scale_check"] = report["act_scale_check"]
                unet, sample_steps = artifact.build_student(), artifact.manifest.student_steps
            gen = generate_images(unet, loaded.scheduler_config, n, sample_steps, seed=0, batch_size=1000,
                                  device=device, progress=False)
            np.save(cache / f"{name}.npy", gen.images)
            info.update(sample_steps=sample_steps, generate_seconds=gen.seconds,
                        channel_means_0_255=[float(v) for v in gen.images.reshape(-1, gen.images.shape[-1])
                                             .astype(np.float64).mean(axis=0)])
        except Exception as exc:  # one failing row must not cost the others
            info["error"] = f"{type(exc).__name__}: {exc}"
        info["seconds"] = time.perf_counter() - started
        (cache / f"{name}.json").write_text(json.dumps(info, indent=1, sort_keys=True))
        print(name, json.dumps(info), flush=True)


def score(cache: Path, weights: str, out: Path | None, expect: int = 0, follow_s: float = 0.0,
          device: str = "cuda") -> None:
    """FID of every cached row without one yet (``NAME.fid.json``); with `follow_s`, keep polling for
    rows still being made until `expect` rows are scored or the time is up; then ``OUT/results.json``."""
    import numpy as np

    from pqcad_deploy.eval.fid import FidStatistics, compute_statistics
    from pqcad_deploy.eval.inception import InceptionFeatures

    extractor = InceptionFeatures(device, weights=weights, batch_size=500)
    refs = {m: FidStatistics.load(p) for m, p in REFERENCES.items()}
    deadline = time.perf_counter() + follow_s
    while True:
        for path in sorted(cache.glob("*.json")):
            if path.name.endswith(".fid.json") or (cache / f"{path.stem}.fid.json").exists():
                continue
            info = json.loads(path.read_text())
            npy = cache / f"{path.stem}.npy"
            if "error" not in info and npy.exists():
                images = np.load(npy)
                stats = compute_statistics(images, device=device, batch_size=500, progress=False, source=path.stem,
                                           extractor=extractor)
                info["fid"] = stats.frechet_distance(refs[info["row"].split(":")[0]])
                info["n"] = len(images)
            (cache / f"{path.stem}.fid.json").write_text(json.dumps(info, indent=1, sort_keys=True))
            print(path.stem, info.get("fid"), info.get("channel_means_0_255"), info.get("error", ""), flush=True)
        done = len(list(cache.glob("*.fid.json")))
        if done >= expect or time.perf_counter() > deadline:
            break
        time.sleep(5)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        rows = {p.name[:-len(".fid.json")]: json.loads(p.read_text()) for p in sorted(cache.glob("*.fid.json"))}
        (out / "results.json").write_text(json.dumps({"rows": rows}, indent=1, sort_keys=True))


def launch(rows: list[str], workers: int, cache: Path, extra: list[str]) -> None:
    """Start `workers` detached ``make`` processes, rows dealt round-robin in the given order (put the
    slow learned rows first), each logging to CACHE/worker_K.log."""
    import os
    import subprocess

    cache.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for k in range(workers):
        mine = rows[k::workers]
        if not mine:
            continue
        log = open(cache / f"worker_{k}.log", "w")
        subprocess.Popen([sys.executable, __file__, "make", "--rows", ",".join(mine), "--cache", str(cache), *extra],
                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        print(f"worker {k}: {','.join(mine)}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase", choices=("launch", "make", "score"))
    ap.add_argument("--workers", type=int, default=12, help="launch: detached make processes")
    ap.add_argument("--rows", default="")
    ap.add_argument("--cache", default="/tmp/q13")
    ap.add_argument("--weights")
    ap.add_argument("--out")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--expect", type=int, default=0, help="score: rows to wait for")
    ap.add_argument("--follow-s", type=float, default=0.0, help="score: keep polling this long")
    args = ap.parse_args()
    if args.phase == "launch":
        extra = ["--steps", str(args.steps), "--n", str(args.n), "--preset", args.preset, "--device", args.device]
        launch([r for r in args.rows.split(",") if r], args.workers, Path(args.cache), extra)
    elif args.phase == "make":
        make([r for r in args.rows.split(",") if r], Path(args.cache), args.steps, args.n, args.preset, args.device)
    else:
        score(Path(args.cache), args.weights, Path(args.out) if args.out else None, args.expect, args.follow_s,
              args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
