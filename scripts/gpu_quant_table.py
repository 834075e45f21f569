"""Issue 13's quantization table on the GPU machine: both builtin models, every method and bit-width,
each improvement's ablation row; FID at 10,000 samples with shared seeds and per-channel pixel means.

Two phases, so that the work runs as detached processes side by side on the one GPU while the FID
weights are still travelling in pieces (docs/RESULTS.md section 15):

- ``make ROWS``: for each row, sample its student through diffusers' DDIMPipeline
  (pqcad_deploy.eval.pipeline_sampling: image i seeded with i, the protocol of every FID in RESULTS) and write
  one entry per sampling, ``CACHE/ENTRY.npy`` (uint8 images) and ``CACHE/ENTRY.json`` (times,
  calibration SQNR, per-channel means, the report's summaries). The PQ student of a row is compressed
  once per distinct PQ row (``--device cuda --preset default --no-distill``, ``CACHE/pq_NAME``) and
  shared by every row that starts from it, across workers. A row without ``cad`` samples it at the
  teacher's steps (entry ``NAME``) or at each ``sample=K1+K2`` (entries ``NAME_atK``); a ``cad`` row
  distils it round by round (distill.rounds) and samples after every round (entries ``NAME_atK``).
  A row with ``NAME.done`` is skipped (resumable).
- ``score``: FID of every cached row against its model's shipped reference statistics, written to
  ``OUT/results.json`` with the FP rows' channel means beside each row's.

A row is ``model:method:weight_bits:act_bits[:flag...]`` with model ``fmnist``, ``cifar10`` or ``latent``
(issue 17's class-conditional latent model: ``$PQCAD_LATENT_MODEL``, default builtin:cifar10-latent once it ships),
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
``traj=`` (pool trajectories), ``gs=W`` (issue 17: ``--guidance-scale W`` of a conditional model;
an ``fp`` row samples with it), ``kf=P1+P2`` (``--keep-float P1 --keep-float P2``), ``guard=fid`` (compress's ``--guard fid``: the make process waits for
``$PQCAD_FID_WEIGHTS`` to exist before the first guard, since the weights arrive in pieces), e.g. ``cifar10:pqcad:8:8:cad:steps=20:fresh:ema=0.999:cos:it=4000``.

    python -m scripts.gpu_quant_table make --rows fmnist:pqcad:8:8,... --cache /tmp/q13
    python -m scripts.gpu_quant_table score --weights /tmp/default_1.pt --cache /tmp/q13 --out $OUT \\
        [--expect 40 --follow-s 600]   # score rows as they are made
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

MODELS = {"fmnist": "builtin:fashion-mnist", "cifar10": "builtin:cifar10",
          # issue 17's class-conditional latent model: the shipped builtin, or the folder a GPU round has just trained
          "latent": os.environ.get("PQCAD_LATENT_MODEL", "builtin:cifar10-latent")}  # not shipped yet: set the env
REFERENCES = {"fmnist": ROOT / "pqcad_deploy/eval/data/fashion_mnist_train_fid_stats.npz",
              "cifar10": ROOT / "pqcad_deploy/eval/data/cifar10_train_fid_stats.npz",
              "latent": ROOT / "pqcad_deploy/eval/data/cifar10_train_fid_stats.npz"}
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
    options: dict = {"distill": False, "guard": "psnr"}  # the rows of RESULTS 18-22; guard=fid for section 24's
    for flag in flags:
        key, _, value = flag.partition("=")
        if key in DISTILL_FLAGS or flag in ("cos", "fresh") or key in ("steps", "sample"):
            continue
        if key == "r" and value:
            options["rounds"] = int(value)
        elif key == "guard" and value:
            options["guard"] = value
        elif key == "gs" and value:
            options["guidance_scale"] = float(value)
        elif key == "kf" and value:  # --keep-float patterns joined by '+', e.g. kf=*attn2.to_k+*attn2.to_v
            options["keep_float"] = tuple(value.split("+"))
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

    from pqcad_deploy import presets

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
        saved = presets.PRESETS[preset]
        presets.PRESETS[preset] = dataclasses.replace(
            saved, distill=dataclasses.replace(saved.distill, **changes["distill"]),
            dc=dataclasses.replace(saved.dc, **changes["dc"]))
        try:
            yield changes
        finally:
            presets.PRESETS[preset] = saved
    return patched()


def row_samples(row: str) -> list[int] | None:
    """The step counts a non-CAD row samples at (``sample=10+5``), or None without the flag."""
    for flag in row.split(":")[4:]:
        if flag.startswith("sample="):
            return [int(k) for k in flag.partition("=")[2].split("+")]
    return None


def pq_row(row: str) -> str:
    """The row of the PQ student a CAD row starts from: the row without its CAD flags (and ``sample=``)."""
    keep = []
    for flag in row.split(":")[4:]:
        key = flag.partition("=")[0]
        if flag in ("cad", "cos", "fresh") or key in DISTILL_FLAGS or key in ("r", "sample", "guard"):
            continue
        keep.append(flag)
    return ":".join(row.split(":")[:4] + keep)


def shared_pq_artifact(row: str, cache: Path, steps: int, preset: str, device: str, log) -> Path:
    """The PQ student every CAD row of the same PQ row starts from, compressed once (``--no-distill``).

    The first worker to need it takes ``pq_NAME.lock`` and compresses; the others wait for the
    artifact (written atomically, so its manifest file means it is complete) or for the builder's error.
    """
    import os

    from pqcad_deploy.artifact import MANIFEST_FILE
    from pqcad_deploy.compress import compress
    from pqcad_deploy.config import CompressConfig

    base = pq_row(row)
    art, lock, failed = (cache / f"pq_{row_name(base)}", cache / f"pq_{row_name(base)}.lock",
                         cache / f"pq_{row_name(base)}.error")
    try:
        os.close(os.open(lock, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        while not (art / MANIFEST_FILE).exists():
            if failed.exists():
                raise RuntimeError(f"the shared PQ student {base} failed: {failed.read_text()}")
            time.sleep(2)
        return art
    model, method, wb, ab, options = parse_row(base)
    started = time.perf_counter()
    try:
        config = CompressConfig(model=MODELS[model], method=method, weight_bits=wb, act_bits=ab,
                                teacher_steps=steps, preset=preset, device=device, seed=0, **options)
        compress(config, art, overwrite=True, progress=False)
    except Exception as exc:
        failed.write_text(f"{type(exc).__name__}: {exc}")
        raise
    log(f"shared PQ student {base}: compressed in {time.perf_counter() - started:.1f}s")
    return art


def _save_entry(cache: Path, entry: str, info: dict, images) -> None:
    """CACHE/ENTRY.npy and CACHE/ENTRY.json (the json last: score reads rows whose json exists)."""
    import numpy as np

    np.save(cache / f"{entry}.npy", images)
    info = {**info, "channel_means_0_255": [float(v) for v in images.reshape(-1, images.shape[-1])
                                            .astype(np.float64).mean(axis=0)]}
    tmp = cache / f".{entry}.json.tmp"
    tmp.write_text(json.dumps(info, indent=1, sort_keys=True))
    tmp.replace(cache / f"{entry}.json")  # whole or absent: score may be polling
    print(entry, json.dumps(info), flush=True)


def make_cad(row: str, cache: Path, steps: int, n: int, preset: str, device: str) -> None:
    """A CAD row from the shared PQ student: distil it round by round (distill.rounds) and sample the
    kept student after every round, one entry ``NAME_atK`` per round (K: the round's student steps)."""
    import tempfile

    import torch

    from pqcad_deploy.artifact import load_artifact
    from pqcad_deploy.checkpoint import Checkpoint
    from pqcad_deploy.conditioning import conditioning_for
    from pqcad_deploy.config import CompressConfig
    from pqcad_deploy.distill.rounds import distill_rounds
    from pqcad_deploy.eval.pipeline_sampling import generate_images
    from pqcad_deploy.models import load_model
    from pqcad_deploy.schedule import ddim_timesteps

    name = row_name(row)
    base: dict = {"row": row, "torch": torch.__version__, "preset": preset,
                  "gpu": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"}
    art = shared_pq_artifact(row, cache, steps, preset, device, log=lambda m: print(m, flush=True))
    artifact = load_artifact(art)
    model, method, wb, ab, options = parse_row(row)
    loaded = load_model(MODELS[model]).to(device)
    fp_unet = loaded.unet.eval()
    student = artifact.build_student().to(device)
    config = CompressConfig(model=MODELS[model], method=method, weight_bits=wb, act_bits=ab, teacher_steps=steps,
                            preset=preset, device=device, seed=0, **options)
    conditioning = conditioning_for(loaded, config.guidance_scale, config.null_class)
    round_started = [time.perf_counter()]

    def sample_round(r: int, kept: torch.nn.Module, report: dict, timesteps: list[int]) -> None:
        k = len(timesteps)
        if timesteps != ddim_timesteps(loaded.scheduler_config, k):
            raise RuntimeError(f"round {r + 1}'s timesteps {timesteps} are not diffusers' {k}-step grid")
        distill_seconds = time.perf_counter() - round_started[0]
        gen = generate_images(kept, loaded.scheduler_config, n, k, seed=0, batch_size=1000, device=device,
                              progress=False, conditioning=conditioning, decode=loaded.decode)
        info = {**base, "round": r + 1, "sample_steps": k, "distill_seconds": distill_seconds,
                "generate_seconds": gen.seconds, "guard": report.get("guard"), "heldout": report.get("heldout"),
                "final_loss": (report.get("losses") or [None])[-1], "distill_overrides": changes}
        _save_entry(cache, f"{name}_at{k}", info, gen.images)
        round_started[0] = time.perf_counter()

    if config.guard == "fid":
        _wait_for_fid_weights(log=lambda m: print(m, flush=True))
    with distill_overrides(row, preset) as changes, tempfile.TemporaryDirectory() as tmp:
        distill_rounds(config, student, fp_unet, loaded.scheduler_config, tuple(artifact.manifest.image_shape),
                       device, False, Checkpoint(Path(tmp) / "checkpoint", "gpu-table"), on_round=sample_round,
                       conditioning=conditioning, decode=loaded.decode)


def _wait_for_fid_weights(log, limit_s: float = 1500.0) -> None:
    """Until ``$PQCAD_FID_WEIGHTS`` is a file: the GPU round's later calls bring the weights in pieces
    and put them there whole (one ``mv``), while the first rows are already compressing."""
    import os

    path = Path(os.environ.get("PQCAD_FID_WEIGHTS", "/tmp/default_1.pt"))
    os.environ["PQCAD_FID_WEIGHTS"] = str(path)
    deadline = time.perf_counter() + limit_s
    if not path.is_file():
        log(f"waiting for the FID weights at {path}")
    while not path.is_file():
        if time.perf_counter() > deadline:
            raise RuntimeError(f"the FID weights never arrived at {path}")
        time.sleep(5)


def make_plain(row: str, cache: Path, steps: int, n: int, preset: str, device: str) -> None:
    """An FP or PQ row (no CAD), sampled at each of its ``sample=`` step counts (entries ``NAME_atK``)
    or at the teacher's steps (entry ``NAME``); a PQ row's student is the shared PQ artifact."""
    import torch

    from pqcad_deploy.artifact import load_artifact
    from pqcad_deploy.conditioning import conditioning_for
    from pqcad_deploy.eval.pipeline_sampling import generate_images
    from pqcad_deploy.models import load_model

    name = row_name(row)
    model, method, *_ = parse_row(row)
    started = time.perf_counter()
    info: dict = {"row": row, "torch": torch.__version__, "preset": preset,
                  "gpu": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"}
    loaded = load_model(MODELS[model]).to(device)
    unet = loaded.unet
    options = parse_row(row)[4]
    conditioning = conditioning_for(loaded, options.get("guidance_scale", 1.0))
    info["conditioning"] = conditioning.to_dict()
    if method != "fp":
        art = shared_pq_artifact(row, cache, steps, preset, device, log=lambda m: print(m, flush=True))
        report = json.loads((art / "report.json").read_text())
        info.update(compress_seconds=time.perf_counter() - started, calibration_sqnr_db=report["noise_pred_sqnr_db"],
                    float_mac_share=report["precision_policy"]["float_mac_share"], rewrites=report.get("rewrites"))
        if "bias_correction" in report:
            info["bias_correction_data"] = report["bias_correction"].get("data")
        if "act_scale_check" in report:
            info["act_scale_check"] = report["act_scale_check"]
        unet = load_artifact(art).build_student()
    samples = row_samples(row)
    entries = [(name, steps)] if samples is None else [(f"{name}_at{k}", k) for k in samples]
    for entry, k in entries:
        gen = generate_images(unet, loaded.scheduler_config, n, k, seed=0, batch_size=1000, device=device,
                              progress=False, conditioning=conditioning, decode=loaded.decode)
        _save_entry(cache, entry, {**info, "sample_steps": k, "generate_seconds": gen.seconds}, gen.images)


def make(rows: list[str], cache: Path, steps: int, n: int, preset: str = "default", device: str = "cuda") -> None:
    """Every row in turn (skipping rows already done: ``NAME.done``); a failing row writes its error
    as entry ``NAME`` and the others go on. The teacher steps are the row's ``steps=`` or `steps`."""
    cache.mkdir(parents=True, exist_ok=True)
    for row in rows:
        name = row_name(row)
        if (cache / f"{name}.done").exists():
            continue
        started = time.perf_counter()
        try:
            _model, _method, _wb, _ab, options = parse_row(row)
            run = make_cad if options["distill"] else make_plain
            run(row, cache, row_steps(row, steps), n, preset, device)
            outcome = {"row": row, "seconds": time.perf_counter() - started}
        except Exception as exc:  # one failing row must not cost the others
            outcome = {"row": row, "error": f"{type(exc).__name__}: {exc}", "seconds": time.perf_counter() - started}
            (cache / f"{name}.json").write_text(json.dumps(outcome, indent=1, sort_keys=True))
            print(name, json.dumps(outcome), flush=True)
        (cache / f"{name}.done").write_text(json.dumps(outcome))


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
        subprocess.Popen([sys.executable, "-m", "scripts.gpu_quant_table", "make", "--rows", ",".join(mine),
                          "--cache", str(cache), *extra],
                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=ROOT)
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
