"""Issue 6's CPU speed table in one command: prepare the models, time them, write one JSON.

Why this script exists: the speed figures of issue 6 were first measured with throwaway scripts on
hand-made files (docs/measurements/issue6_ort_integer_kernels.md). This script reproduces the whole
table with one documented command, through the real user commands and the runtime's own code:

    python -m benchmarks.speed --work bench --out bench.json          # full table
    python -m benchmarks.speed --work bench --out bench.json --quick  # batch 1 and 8, 3 repetitions

1. Preparation (skipped per stage when its output exists in --work, so a rerun resumes), each a
   subprocess call of the ``pqcad-deploy`` console script:
   - ``compress --out W/fp_art --method minmax --no-distill --preset fast`` and
     ``export W/fp_art --fp --onnx W/fp32.onnx`` (the FP32 teacher as ONNX);
   - the half-step students ``compress --preset fast --out W/w8a8`` (default method: PQ + CAD) and
     the same with ``--weight-bits 4`` (``W/w4a8``);
   - each student exported with the default target (``qdq``), ``--target ort-x86`` (exact integer
     Convs) and ``--target ort-qlinear`` (QLinearConv, one extra rounding per Conv output), W4A8 also
     at ``--opset 21`` (INT4 weight storage);
   - ``build-engine`` (default options) for every ONNX, the FP32 one included.
   An interrupted ``compress`` (its ``OUT.checkpoint/`` exists) is rerun with ``--resume``.
2. UNet evaluation: latency (ms per call) and throughput (images/s) at batch 1, 8 and 64 for every
   engine, through ``engines.generate.open_runner`` (ONNX Runtime CPU), all at the same intra-op
   thread count (``--threads``, default: every core this process may use).
3. Whole sampler, images/s at ``--sampler-batch`` (8) images in one batch: diffusers' PyTorch FP32
   ``DDIMPipeline`` at 100 steps (the baseline users run), the FP32 engine at 100 and 50 steps and
   the ``ort-x86`` and ``ort-qlinear`` W8A8 / W4A8 engines at their manifest's (half-step student)
   timesteps, all through
   ``engines.sampler.sample_images`` except the diffusers row.
4. Every row runs in its own child process; its peak resident memory is the child's ``ru_maxrss``
   (``os.wait4``) and its own ``VmHWM``. Sizes on disk of every artifact, ONNX and engine.
5. A table with ratios against the diffusers row and the FP32 engine's 100-step row, and --out JSON
   with every row and the machine (CPU model, cores, versions, load average, date).

Timing: one warm-up (UNet: 2 calls; sampler: one 5-step run of the same batch, which allocates the
same buffers), then --reps timed repetitions (default 5; 3 with --quick; the diffusers row takes
max(3, reps) at --quick and reps otherwise); median, min and max. The models are loaded before timing.
The pure helpers (summaries, ratios, sizes, the stage list) are importable and tested in
tests/benchmarks/test_speed.py.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
UNET_BATCHES = (1, 8, 64)
QUICK_UNET_BATCHES = (1, 8)
UNET_TIMESTEP = 500
SAMPLER_SEED = 0
SAMPLER_WARMUP_STEPS = 5


# ------------------------------------------------------------------------------------------------
# pure helpers (tested)
# ------------------------------------------------------------------------------------------------
def summarize(seconds: Sequence[float]) -> dict:
    """Median / min / max (seconds) and the repetition count of a list of timings."""
    if not seconds:
        raise ValueError("no timings to summarize")
    values = [float(s) for s in seconds]
    return {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values), "reps": len(values)}


def time_calls(fn: Callable[[], object], reps: int, warmup: Callable[[], object] | None = None, warmup_calls: int = 1) -> dict:
    """Warm up (``warmup`` or ``fn``, ``warmup_calls`` times), then time ``reps`` calls of ``fn``."""
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    for _ in range(warmup_calls):
        (warmup or fn)()
    seconds = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t)
    return summarize(seconds)


def ratio(value: float | None, reference: float | None) -> float | None:
    """value / reference, or None where either is missing or the reference is not positive."""
    if value is None or reference is None or reference <= 0:
        return None
    return value / reference


def per_second(items: int, summary: dict) -> dict:
    """Throughput (items/s) at the median, and at the fastest and slowest repetition."""
    return {"per_s": items / summary["median_s"], "per_s_best": items / summary["min_s"], "per_s_worst": items / summary["max_s"]}


def size_on_disk(path: str | os.PathLike[str]) -> int | None:
    """Bytes of a file, or of every file under a directory (links not followed); None if missing."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if not p.is_dir():
        return None
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())


def add_ratios(rows: list[dict], key: str, references: dict[str, dict | None]) -> list[dict]:
    """Copy rows, adding ``{key}_vs_{name}`` = row[key] / reference[key] for every reference row."""
    out = []
    for row in rows:
        row = dict(row)
        for name, ref in references.items():
            row[f"{key}_vs_{name}"] = ratio(row.get(key), ref.get(key) if ref else None)
        out.append(row)
    return out


@dataclass(frozen=True)
class Stage:
    """One preparation step: a ``pqcad-deploy`` argv that writes ``output`` (relative to --work)."""

    name: str
    output: str
    argv: tuple[str, ...]


@dataclass(frozen=True)
class Model:
    """An engine that is timed: its label, ONNX, engine dir and the artifact it came from."""

    label: str
    onnx: str
    engine: str
    artifact: str


MODELS: tuple[Model, ...] = (
    Model("ORT FP32", "fp32.onnx", "eng_fp32", "fp_art"),
    Model("W8A8 qdq", "w8a8.onnx", "eng_w8a8", "w8a8"),
    Model("W8A8 ort-x86", "w8a8_ort-x86.onnx", "eng_w8a8_ort-x86", "w8a8"),
    Model("W8A8 ort-qlinear", "w8a8_ort-qlinear.onnx", "eng_w8a8_ort-qlinear", "w8a8"),
    Model("W4A8 qdq", "w4a8.onnx", "eng_w4a8", "w4a8"),
    Model("W4A8 qdq INT4 (opset 21)", "w4a8_int4.onnx", "eng_w4a8_int4", "w4a8"),
    Model("W4A8 ort-x86", "w4a8_ort-x86.onnx", "eng_w4a8_ort-x86", "w4a8"),
    Model("W4A8 ort-qlinear", "w4a8_ort-qlinear.onnx", "eng_w4a8_ort-qlinear", "w4a8"),
)


def models(include_w4a8: bool = True) -> list[Model]:
    """The timed engines (``include_w4a8=False`` leaves out those built from the W4A8 student)."""
    return [m for m in MODELS if include_w4a8 or m.artifact != "w4a8"]


def stages(include_w4a8: bool = True) -> list[Stage]:
    """The preparation commands, in order (paths relative to --work)."""
    s = [
        Stage("compress FP artifact (minmax, no distill)", "fp_art",
              ("compress", "--out", "fp_art", "--method", "minmax", "--no-distill", "--preset", "fast", "--quiet")),
        Stage("export FP32 ONNX", "fp32.onnx", ("export", "fp_art", "--fp", "--onnx", "fp32.onnx")),
        Stage("compress W8A8 student (PQ + CAD)", "w8a8", ("compress", "--preset", "fast", "--out", "w8a8", "--quiet")),
        Stage("compress W4A8 student (PQ + CAD)", "w4a8",
              ("compress", "--preset", "fast", "--weight-bits", "4", "--out", "w4a8", "--quiet")),
        Stage("export W8A8 qdq", "w8a8.onnx", ("export", "w8a8", "--onnx", "w8a8.onnx", "--target", "qdq")),
        Stage("export W8A8 ort-x86", "w8a8_ort-x86.onnx", ("export", "w8a8", "--onnx", "w8a8_ort-x86.onnx", "--target", "ort-x86")),
        Stage("export W8A8 ort-qlinear", "w8a8_ort-qlinear.onnx",
              ("export", "w8a8", "--onnx", "w8a8_ort-qlinear.onnx", "--target", "ort-qlinear")),
        Stage("export W4A8 qdq", "w4a8.onnx", ("export", "w4a8", "--onnx", "w4a8.onnx", "--target", "qdq")),
        Stage("export W4A8 qdq INT4 (opset 21)", "w4a8_int4.onnx", ("export", "w4a8", "--onnx", "w4a8_int4.onnx", "--target", "qdq", "--opset", "21")),
        Stage("export W4A8 ort-x86", "w4a8_ort-x86.onnx", ("export", "w4a8", "--onnx", "w4a8_ort-x86.onnx", "--target", "ort-x86")),
        Stage("export W4A8 ort-qlinear", "w4a8_ort-qlinear.onnx",
              ("export", "w4a8", "--onnx", "w4a8_ort-qlinear.onnx", "--target", "ort-qlinear")),
    ]
    if not include_w4a8:
        s = [st for st in s if not st.output.startswith("w4a8")]
    for m in models(include_w4a8):
        s.append(Stage(f"build-engine {m.label}", m.engine, ("build-engine", m.onnx, "-o", m.engine)))
    return s


def pending_stages(work: str | os.PathLike[str], include_w4a8: bool = True) -> list[Stage]:
    """The stages whose output does not exist yet (outputs are written atomically by the CLI)."""
    return [st for st in stages(include_w4a8) if not (Path(work) / st.output).exists()]


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# preparation
# ------------------------------------------------------------------------------------------------
def cli_command() -> list[str]:
    """The installed ``pqcad-deploy`` console script next to this interpreter (or on PATH)."""
    beside = Path(sys.executable).parent / "pqcad-deploy"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("pqcad-deploy")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; sys.argv[0] = 'pqcad-deploy'; from pqcad_deploy import cli; cli.main()"]


def prepare(work: Path, log: Callable[[str], None] = print, include_w4a8: bool = True) -> list[dict]:
    """Run the missing stages; return what ran and how long it took."""
    work.mkdir(parents=True, exist_ok=True)
    done = []
    all_stages = stages(include_w4a8)
    pending = {st.output for st in pending_stages(work, include_w4a8)}
    for i, st in enumerate(all_stages, 1):
        head = f"[prepare {i}/{len(all_stages)}] {st.name}"
        if st.output not in pending:
            log(f"{head}: {st.output} exists, skipped")
            done.append({"stage": st.name, "output": st.output, "skipped": True})
            continue
        argv = [*cli_command(), *st.argv]
        if st.argv[0] == "compress" and (work / f"{st.output}.checkpoint").is_dir():
            argv.append("--resume")  # an interrupted compress continues from its checkpoint
        log(f"{head}: pqcad-deploy {' '.join(st.argv)}")
        t = time.perf_counter()
        proc = subprocess.run(argv, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seconds = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(f"error: stage {st.name!r} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")
        log(f"{head}: done in {seconds:.1f} s")
        done.append({"stage": st.name, "output": st.output, "skipped": False, "seconds": seconds,
                     "log_tail": proc.stdout[-1500:]})
    return done


# ------------------------------------------------------------------------------------------------
# rows (each runs inside a child process)
# ------------------------------------------------------------------------------------------------
def _vmhwm_kib() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def unet_row(engine_dir: str, batch: int, reps: int, threads: int) -> dict:
    import numpy as np

    from pqcad_deploy.engines.generate import open_runner

    runner, manifest = open_runner(engine_dir, threads)
    c, h, w = manifest.onnx.image_shape
    feed = {"sample": np.random.default_rng(0).standard_normal((batch, c, h, w), dtype=np.float32),
            "timestep": np.full((batch,), UNET_TIMESTEP, np.float32)}
    with runner:
        s = time_calls(lambda: runner.infer(feed), reps, warmup_calls=2)
    return {**s, "ms_per_call": 1e3 * s["median_s"], "images_per_s": batch / s["median_s"],
            "precision": manifest.onnx.precision}


def engine_sampler_row(engine_dir: str, steps: int | None, n: int, reps: int, threads: int) -> dict:
    from pqcad_deploy.engines.generate import open_runner
    from pqcad_deploy.engines.sampler import sample_images, sampling_timesteps

    runner, manifest = open_runner(engine_dir, threads)
    n_steps = len(sampling_timesteps(manifest.onnx, steps))
    with runner:
        run = lambda: sample_images(runner, manifest, n, SAMPLER_SEED, steps=steps, batch_size=n, progress=False)  # noqa: E731
        warm = lambda: sample_images(runner, manifest, n, SAMPLER_SEED, steps=SAMPLER_WARMUP_STEPS, batch_size=n, progress=False)  # noqa: E731
        s = time_calls(run, reps, warmup=warm)
    return {**s, "steps": n_steps, "images_per_s": n / s["median_s"], **per_second(n, s)}


def diffusers_sampler_row(steps: int, n: int, reps: int, threads: int) -> dict:
    import torch
    from diffusers import DDIMPipeline, DDIMScheduler

    from pqcad_deploy.models import load_model

    torch.set_num_threads(threads)
    fp = load_model("builtin")
    pipe = DDIMPipeline(unet=fp.unet.eval(), scheduler=DDIMScheduler.from_config(fp.scheduler_config))
    pipe.set_progress_bar_config(disable=True)

    def gen(k: int):
        with torch.no_grad():
            return pipe(batch_size=n, generator=torch.Generator("cpu").manual_seed(SAMPLER_SEED),
                        num_inference_steps=k, eta=0.0, output_type="np")

    s = time_calls(lambda: gen(steps), reps, warmup=lambda: gen(SAMPLER_WARMUP_STEPS))
    return {**s, "steps": steps, "images_per_s": n / s["median_s"], **per_second(n, s), "torch": torch.__version__}


def child_main(spec: dict) -> dict:
    kind = spec["kind"]
    if kind == "unet":
        row = unet_row(spec["engine"], spec["batch"], spec["reps"], spec["threads"])
    elif kind == "engine_sampler":
        row = engine_sampler_row(spec["engine"], spec["steps"], spec["n"], spec["reps"], spec["threads"])
    elif kind == "diffusers_sampler":
        row = diffusers_sampler_row(spec["steps"], spec["n"], spec["reps"], spec["threads"])
    else:
        raise ValueError(f"unknown row kind {kind!r}")
    row["vmhwm_kib"] = _vmhwm_kib()
    return row


_RESULT_PREFIX = "SPEED_ROW_RESULT "


def run_child(spec: dict) -> dict:
    """Run one row in a fresh interpreter; add its peak RSS (ru_maxrss of that child) in MiB."""
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                                stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT, env=env)
        out = proc.stdout.read()  # type: ignore[union-attr]
        proc.stdout.close()  # type: ignore[union-attr]
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        err_text = err.read()
    result = next((json.loads(line[len(_RESULT_PREFIX):]) for line in out.splitlines() if line.startswith(_RESULT_PREFIX)), None)
    if proc.returncode != 0 or result is None:
        return {"error": f"exit {proc.returncode}: {(err_text or out)[-1500:]}"}
    result["peak_rss_mib"] = usage.ru_maxrss / 1024  # KiB on Linux
    if result.get("vmhwm_kib") is not None:
        result["vmhwm_mib"] = result.pop("vmhwm_kib") / 1024
    return result


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------
def machine_info(threads: int) -> dict:
    from importlib import metadata

    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for pkg in ("onnxruntime", "onnx", "numpy", "torch", "diffusers", "pqcad-deploy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip() or None
    except OSError:
        commit = None
    return {"cpu_model": cpu, "logical_cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "threads": threads, "load_average_at_start": list(os.getloadavg()), "platform": platform.platform(),
            "python": platform.python_version(), "versions": versions, "git_commit": commit,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def sampler_references(rows: list[dict]) -> dict[str, dict | None]:
    diffusers = next((r for r in rows if r.get("kind") == "diffusers_sampler" and "error" not in r), None)
    ort100 = next((r for r in rows if r.get("label") == "ORT FP32" and r.get("steps") == 100 and "error" not in r), None)
    return {"diffusers": diffusers, "ort_fp32_100": ort100}


def unet_table(rows: list[dict]) -> str:
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["label"], r["batch"], "error", "", "", "", "", ""])
            continue
        body.append([r["label"], r["batch"], fmt(1e3 * r["median_s"]), f"{fmt(1e3 * r['min_s'])} / {fmt(1e3 * r['max_s'])}",
                     fmt(r["images_per_s"], 1), fmt(r.get("speedup_vs_ort_fp32")), fmt(r.get("peak_rss_mib"), 0), r["reps"]])
    return markdown_table(["engine", "batch", "ms/call (median)", "min / max ms", "images/s", "x ORT FP32", "peak RSS MiB", "reps"], body)


def sampler_table(rows: list[dict]) -> str:
    body = []
    for r in rows:
        if "error" in r:
            body.append([r["label"], "", "error", "", "", "", "", ""])
            continue
        body.append([r["label"], r["steps"], fmt(r["images_per_s"]), f"{fmt(r['min_s'])} / {fmt(r['median_s'])} / {fmt(r['max_s'])}",
                     fmt(r.get("images_per_s_vs_diffusers")), fmt(r.get("images_per_s_vs_ort_fp32_100")),
                     fmt(r.get("peak_rss_mib"), 0), r["reps"]])
    return markdown_table(["sampler", "steps", "images/s", "s per batch min / median / max", "x diffusers",
                           "x ORT FP32 100", "peak RSS MiB", "reps"], body)


def sizes_table(sizes: dict) -> str:
    fp = sizes.get("fp32.onnx")
    body = [[name, f"{b:,}" if b is not None else "-", fmt(ratio(fp, b))] for name, b in sizes.items()]
    return markdown_table(["path", "bytes", "FP32 ONNX / this"], body)


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, help="directory for the artifacts, ONNX files and engines (reused on a rerun)")
    ap.add_argument("--out", type=Path, help="results JSON to write")
    ap.add_argument("--quick", action="store_true", help="batch 1 and 8 only, 3 repetitions")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads for every row (default: all usable cores)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 5; 3 with --quick)")
    ap.add_argument("--sampler-batch", type=int, default=8, help="images per sampler run (one batch)")
    ap.add_argument("--no-w4a8", action="store_true",
                    help="leave out the W4A8 student (its compress is the slowest stage): FP32 and W8A8 rows only")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child is not None:
        row = child_main(json.loads(args.child))
        print(_RESULT_PREFIX + json.dumps(row), flush=True)
        return 0
    if args.work is None or args.out is None:
        ap.error("--work and --out are required")

    threads = args.threads or len(os.sched_getaffinity(0))
    reps = args.reps or (3 if args.quick else 5)
    diffusers_reps = max(3, reps) if args.quick else max(5, reps)
    batches = QUICK_UNET_BATCHES if args.quick else UNET_BATCHES
    n = args.sampler_batch
    work = args.work.resolve()

    results: dict = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                     "machine": machine_info(threads), "quick": args.quick, "reps": reps, "sampler_batch": n,
                     "work": str(work), "prepare": [], "unet": [], "sampler": [], "sizes": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        args.out.write_text(json.dumps(results, indent=1) + "\n")

    include_w4a8 = not args.no_w4a8
    timed = models(include_w4a8)
    results["include_w4a8"] = include_w4a8
    results["prepare"] = prepare(work, include_w4a8=include_w4a8)
    results["sizes"] = {p: size_on_disk(work / p) for p in
                        [*dict.fromkeys(m.artifact for m in timed), *[m.onnx for m in timed], *[m.engine for m in timed]]}
    save()

    # UNet evaluation
    unet_specs = [(m, b) for m in timed for b in batches]
    for i, (m, b) in enumerate(unet_specs, 1):
        print(f"[unet {i}/{len(unet_specs)}] {m.label} batch {b}", flush=True)
        row = {"label": m.label, "engine": m.engine, "batch": b,
               **run_child({"kind": "unet", "engine": str(work / m.engine), "batch": b, "reps": reps, "threads": threads})}
        results["unet"].append(row)
        save()
    fp_by_batch = {r["batch"]: r for r in results["unet"] if r["label"] == "ORT FP32" and "error" not in r}
    for r in results["unet"]:
        ref = fp_by_batch.get(r["batch"])
        r["speedup_vs_ort_fp32"] = ratio(r.get("images_per_s"), ref["images_per_s"] if ref else None)

    # whole sampler
    sampler_specs = [
        ("diffusers DDIMPipeline PyTorch FP32", {"kind": "diffusers_sampler", "steps": 100, "reps": diffusers_reps}),
        ("ORT FP32", {"kind": "engine_sampler", "engine": "eng_fp32", "steps": 100}),
        ("ORT FP32", {"kind": "engine_sampler", "engine": "eng_fp32", "steps": 50}),
        ("W8A8 ort-x86 (student steps)", {"kind": "engine_sampler", "engine": "eng_w8a8_ort-x86", "steps": None}),
        ("W8A8 ort-qlinear (student steps)", {"kind": "engine_sampler", "engine": "eng_w8a8_ort-qlinear", "steps": None}),
        ("W4A8 ort-x86 (student steps)", {"kind": "engine_sampler", "engine": "eng_w4a8_ort-x86", "steps": None}),
        ("W4A8 ort-qlinear (student steps)", {"kind": "engine_sampler", "engine": "eng_w4a8_ort-qlinear", "steps": None}),
    ]
    if not include_w4a8:
        sampler_specs = [(label, spec) for label, spec in sampler_specs if "w4a8" not in spec.get("engine", "")]
    for i, (label, spec) in enumerate(sampler_specs, 1):
        spec = {"reps": reps, "n": n, "threads": threads, **spec}
        if "engine" in spec:
            spec["engine"] = str(work / spec["engine"])
        print(f"[sampler {i}/{len(sampler_specs)}] {label} steps {spec['steps'] or 'student'}, {n} images", flush=True)
        row = {"label": label, "kind": spec["kind"], "batch": n, "steps": spec["steps"], **run_child(spec)}
        results["sampler"].append(row)
        save()
    results["sampler"] = add_ratios(results["sampler"], "images_per_s", sampler_references(results["sampler"]))
    results["machine"]["load_average_at_end"] = list(os.getloadavg())
    save()

    m = results["machine"]
    print(f"\nCPU: {m['cpu_model']} ({m['usable_cores']} usable cores), {threads} threads, onnxruntime "
          f"{m['versions']['onnxruntime']}, torch {m['versions']['torch']}, {m['date']}\n")
    print("UNet evaluation (ONNX Runtime CPU, engines):\n" + unet_table(results["unet"]) + "\n")
    print(f"Whole sampler, {n} images in one batch:\n" + sampler_table(results["sampler"]) + "\n")
    print("Sizes on disk:\n" + sizes_table(results["sizes"]))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
