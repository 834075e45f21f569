"""Issue 6: what users would run instead of pqcad-deploy, on the same model, calibration data and seeds.

Why this exists: a compression tool is only worth its complexity if it beats the quantizers people
already have. For an ONNX model on a CPU that is ONNX Runtime's own static quantizer
(``onnxruntime.quantization.quantize_static``); for NVIDIA targets it is NVIDIA ModelOpt's ONNX PTQ
(``modelopt.onnx.quantization.quantize``). Both start from our FP32 ONNX of the model
(``pqcad-deploy export ART --fp``) and are fed the same calibration inputs that ``pqcad-deploy
compress`` uses: (x_t, t) pairs from the FP model's own DDIM trajectories
(``collect_trajectory_calibration``, 32 trajectories x 16 uniformly spread timesteps, seed 0 by
default, the ``default`` preset). Every model, ours included, is then scored the same way:

- quality: DDIM (eta 0) images from the same initial noise, sampled with the torch-free numpy
  sampler of ``engines/`` (``engines.sampler.sample_images``, the code behind ``pqcad-deploy
  sample``: noise of all n images drawn at once from ``numpy.random.default_rng(seed)``), compared with
  the FP32 ONNX's images; mean PSNR (dB, uint8 range) over the images. Also the noise-prediction
  SQNR against FP32 on held-out trajectory pairs (seed 12345, not the calibration set);
- speed: UNet evaluation latency at batch 8, one ONNX Runtime thread, ORT_ENABLE_ALL, warm-up then
  timed repetitions taken round-robin over the models (so load from other processes hits all alike);
- size on disk, and what ONNX Runtime's optimizer makes of the graph: op types of the
  ORT_ENABLE_ALL optimized model (``SessionOptions.optimized_model_filepath``), i.e. how many
  Q/DQ groups became integer kernels (QLinearConv, QLinearMatMul, MatMulInteger, ConvInteger, ...)
  and how many Conv/MatMul stayed float.

ORT settings follow ORT's guide (docs/performance/model-optimizations/quantization.md): pre-process
with ``quant_pre_process`` (symbolic shape inference + optimization + ONNX shape inference), QDQ
format, per-channel int8 weights, S8S8 ("the default setting ... should be the first choice") and
U8S8 as the x86 alternative; this CPU has VNNI, so no ``reduce_range``. Calibration methods MinMax,
Percentile and Entropy, collected in chunks (``CalibStridedMinMax``) to bound memory.

ModelOpt is run in a child process (it patches ONNX Runtime's calibrator classes on import, which must
not leak into the ORT rows), from an isolated ``--modelopt-site`` directory so that its pins
(onnx~=1.21, onnxruntime-gpu, cupy) never touch the project venv.

Example (the issue 6 numbers; about 15 minutes on 2 shared CPU cores):
    pqcad-deploy compress --method minmax --preset fast --out /tmp/h2/art --overwrite
    pqcad-deploy export /tmp/h2/art --fp --onnx /tmp/h2/fp32.onnx --overwrite
    python -m benchmarks.alternatives --fp32 /tmp/h2/fp32.onnx --work /tmp/h2/alt \\
        --ours minmax_fast_w8a8=/tmp/h2/ours_minmax_fast_w8a8.onnx \\
        --modelopt-site /tmp/modelopt_site --json docs/measurements/issue6_alternatives.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
from pqcad_deploy.eval.psnr import mean_psnr as mean_psnr_db  # noqa: E402  (numpy only; the proxy's one definition)
from pqcad_deploy.eval.sqnr import sqnr_db  # noqa: E402  (numpy only; the one SQNR)
from pqcad_deploy.engines.ort_session import ort_session  # noqa: E402  (the one session factory)

__all__ = [
    "ORT_CONFIGS",
    "OrtConfig",
    "TrajectoryDataReader",
    "calibration_inputs",
    "preprocess",
    "ort_quantize",
    "modelopt_quantize",
    "parse_modelopt_variant",
    "session",
    "run_model",
    "sqnr_db",
    "mean_psnr_db",
    "sample_onnx",
    "optimized_op_counts",
    "summarize_ops",
    "latencies",
    "size_mb",
    "qdq_node_counts",
]

INTEGER_OPS = ("QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat",
               "DynamicQuantizeMatMul", "QGemm", "QAttention")
FLOAT_CONV_OPS = ("Conv", "FusedConv")
FLOAT_MATMUL_OPS = ("MatMul", "FusedMatMul", "Gemm", "FusedGemm")


# --- calibration data ------------------------------------------------------------------------------

def calibration_inputs(num_trajectories: int = 32, timesteps_kept: int = 16, seed: int = 0, steps: int = 100,
                       model: str = "builtin") -> tuple[dict[str, np.ndarray], dict]:
    """(x_t, t) pairs from the FP model's DDIM trajectories, as ``compress`` draws them.

    With the defaults this is the calibration set of ``pqcad-deploy compress --preset default --seed 0``
    (uniform timesteps, no selection). Returns ``({"sample": [M, C, H, W], "timestep": [M]}, description)``,
    float32 numpy arrays named like the ONNX inputs.
    """
    import torch

    from pqcad_deploy.calibration.trajectories import collect_trajectory_calibration
    from pqcad_deploy.config import CalibrationConfig
    from pqcad_deploy.models import load_model
    from pqcad_deploy.schedule import make_ddim_scheduler

    loaded = load_model(model)
    cfg = dict(loaded.unet.config)
    size = cfg["sample_size"]
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    shape = (int(cfg["in_channels"]), int(h), int(w))
    cal_cfg = CalibrationConfig(num_trajectories=num_trajectories, timesteps_kept=timesteps_kept,
                                batch_size=min(32, num_trajectories))
    with torch.no_grad():
        cal = collect_trajectory_calibration(loaded.unet.eval(), make_ddim_scheduler(loaded.scheduler_config, steps),
                                             shape, cal_cfg, seed=seed, progress=False)
    inputs = {"sample": cal.x.numpy().astype(np.float32), "timestep": cal.t.numpy().astype(np.float32)}
    return inputs, dict(cal.description)


def _reader_base() -> type:
    try:
        from onnxruntime.quantization import CalibrationDataReader
    except ImportError:  # the module stays importable; quantizing needs onnxruntime.quantization anyway
        return object
    return CalibrationDataReader


class TrajectoryDataReader(_reader_base()):  # type: ignore[misc]
    """Feeds ``{"sample", "timestep"}`` batches to ORT's calibrator.

    Implements ``__len__`` and ``set_range`` (in batches), which ``quantize_static`` uses with
    ``extra_options={"CalibStridedMinMax": k}`` to collect k batches at a time: the histogram
    calibrators otherwise keep every intermediate tensor of every batch in memory at once.
    """

    def __init__(self, inputs: dict[str, np.ndarray], batch_size: int = 16) -> None:
        self.inputs = inputs
        n = len(next(iter(inputs.values())))
        self.spans = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
        self._it: Iterator[tuple[int, int]] = iter(())
        self.rewind()

    def __len__(self) -> int:
        return len(self.spans)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = iter(self.spans[start_index:end_index])

    def rewind(self) -> None:
        self.set_range(0, len(self.spans))

    def get_next(self) -> dict[str, np.ndarray] | None:
        span = next(self._it, None)
        if span is None:
            return None
        s, e = span
        return {k: np.ascontiguousarray(v[s:e]) for k, v in self.inputs.items()}


# --- ONNX Runtime's quantizer ---------------------------------------------------------------------

@contextlib.contextmanager
def _in_directory(path: Path):
    # quant_pre_process leaves sym_shape_infer_temp.onnx (+ external data) in the cwd when symbolic
    # shape inference fails; keep that out of the caller's directory.
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def preprocess(fp32_onnx: str | os.PathLike, out: str | os.PathLike) -> dict:
    """ORT's recommended pre-processing; returns how it went (the default path may fail, see 'attempts')."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_onnx, out = Path(fp32_onnx).resolve(), Path(out).resolve()
    attempts = []
    with tempfile.TemporaryDirectory(prefix="alt_pre_") as tmp, _in_directory(Path(tmp)):
        for kwargs in ({}, {"auto_merge": True}, {"skip_symbolic_shape": True}):
            try:
                quant_pre_process(str(fp32_onnx), str(out), **kwargs)
                attempts.append({"kwargs": kwargs, "ok": True})
                return {"used": kwargs, "attempts": attempts}
            except Exception as exc:  # report and fall back to the next ORT-documented option
                attempts.append({"kwargs": kwargs, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
    raise RuntimeError(f"quant_pre_process failed every way: {attempts}")


@dataclass(frozen=True)
class OrtConfig:
    """One ``quantize_static`` recipe."""

    name: str
    calibrate_method: str  # MinMax | Percentile | Entropy
    activation_type: str = "QInt8"  # QInt8 (S8S8, ORT's first choice) | QUInt8 (U8S8)
    op_types_to_quantize: tuple[str, ...] | None = None  # None: every op ORT can quantize
    extra_options: dict = field(default_factory=dict)
    # Calibrator arguments quantize_static cannot pass (e.g. num_bins): when set, the ranges are computed
    # with create_calibrator(...) and handed to quantize_static as its JSON calibration cache.
    calibrator_options: dict = field(default_factory=dict)
    nodes_to_exclude_prefixes: tuple[str, ...] = ()  # node-name prefixes left in float


_CONV_MATMUL = ("Conv", "MatMul", "Gemm")
ORT_CONFIGS: dict[str, OrtConfig] = {c.name: c for c in (
    # What a user gets from the guide: every op ORT can quantize (this includes the timestep embedding).
    OrtConfig("ort_s8s8_minmax", "MinMax"),
    OrtConfig("ort_s8s8_percentile", "Percentile"),
    OrtConfig("ort_s8s8_entropy", "Entropy"),
    OrtConfig("ort_u8s8_minmax", "MinMax", activation_type="QUInt8"),
    # The layer set our exporter quantizes (Conv and Linear = Conv/MatMul/Gemm), for a like-for-like row.
    OrtConfig("ort_s8s8_minmax_convmatmul", "MinMax", op_types_to_quantize=_CONV_MATMUL),
    OrtConfig("ort_s8s8_percentile_convmatmul", "Percentile", op_types_to_quantize=_CONV_MATMUL),
    # quantize_static's Entropy histogram has 128 bins = 128 quantized bins, so its KL search has only the
    # full range to choose from (= MinMax); TensorRT-style 2048 bins through ORT's own calibrator.
    OrtConfig("ort_s8s8_entropy2048_convmatmul", "Entropy", op_types_to_quantize=_CONV_MATMUL,
              calibrator_options={"num_bins": 2048}),
)}


@contextlib.contextmanager
def _calibrator_threads(threads: int | None):
    """Open ORT's calibration session with `threads` intra-op threads (ORT's default is all cores)."""
    if threads is None:
        yield
        return
    from onnxruntime.quantization import calibrate

    original = calibrate.CalibraterBase.create_inference_session

    def create_inference_session(self) -> None:
        self.infer_session = ort_session(self.augmented_model_path, optimization_level="disabled",  # as ORT's own
                                         threads=threads, inter_op_threads=1, providers=self.execution_providers)

    calibrate.CalibraterBase.create_inference_session = create_inference_session
    try:
        yield
    finally:
        calibrate.CalibraterBase.create_inference_session = original


def _divisor_at_most(n: int, k: int) -> int:
    return max(d for d in range(1, min(n, k) + 1) if n % d == 0)


def ort_quantize(pre_onnx: str | os.PathLike, out: str | os.PathLike, config: OrtConfig,
                 inputs: dict[str, np.ndarray], batch_size: int = 16, chunk_batches: int = 4,
                 threads: int | None = 1) -> dict:
    """``quantize_static`` (QDQ, per-channel int8 weights) on `pre_onnx` with `inputs` as calibration data."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    reader = TrajectoryDataReader(inputs, batch_size)
    stride = _divisor_at_most(len(reader), chunk_batches)
    extra = {"CalibStridedMinMax": stride, **config.extra_options}
    method = getattr(CalibrationMethod, config.calibrate_method)
    op_types = list(config.op_types_to_quantize) if config.op_types_to_quantize else None
    exclude = None
    if config.nodes_to_exclude_prefixes:
        import onnx

        exclude = [n.name for n in onnx.load(str(pre_onnx)).graph.node
                   if n.name.startswith(config.nodes_to_exclude_prefixes)]
    kwargs = dict(quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=False,
                  activation_type=getattr(QuantType, config.activation_type), weight_type=QuantType.QInt8,
                  calibrate_method=method, op_types_to_quantize=op_types, nodes_to_exclude=exclude,
                  extra_options=extra)
    started = time.perf_counter()
    with _calibrator_threads(threads), tempfile.TemporaryDirectory(prefix="alt_cal_") as tmp:
        cache = None
        if config.calibrator_options:
            from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

            calibrator = create_calibrator(Path(pre_onnx), op_types, augmented_model_path=str(Path(tmp) / "aug.onnx"),
                                           calibrate_method=method, extra_options=dict(config.calibrator_options))
            for start in range(0, len(reader), stride):
                reader.set_range(start, start + stride)
                calibrator.collect_data(reader)
            cache = Path(tmp) / "ranges.json"
            save_tensors_data(calibrator.compute_data(), cache)
            del calibrator
        quantize_static(str(pre_onnx), str(out), reader, calibration_cache_path=cache, **kwargs)
    seconds = time.perf_counter() - started
    if exclude is not None:
        kwargs["nodes_to_exclude"] = f"{len(exclude)} nodes named {', '.join(config.nodes_to_exclude_prefixes)}*"
    shown = {k: (str(v) if not isinstance(v, (list, dict, bool, type(None))) else v) for k, v in kwargs.items()}
    return {"tool": "onnxruntime.quantization.quantize_static", "settings": shown, "calibration_batch": batch_size,
            "calibrator_options": dict(config.calibrator_options), "quantize_seconds": round(seconds, 1)}


# --- NVIDIA ModelOpt (child process) ---------------------------------------------------------------

def modelopt_quantize(fp32_onnx: str | os.PathLike, out: str | os.PathLike, calibration_npz: str | os.PathLike,
                      method: str, modelopt_site: str | None = None, high_precision_dtype: str = "fp32",
                      dq_only: bool | None = None, timeout_s: int = 1800) -> dict:
    """Run ``modelopt.onnx.quantization.quantize(quantize_mode="int8", calibration_eps=["cpu"])`` in a child.

    The child is pinned to one CPU (ModelOpt's calibration session uses ORT's default thread count).
    Returns ``{"ok": bool, "command": ..., "error": ..., "quantize_seconds": ...}``; never raises for a
    failure inside ModelOpt (that failure is the measurement).
    """
    # ModelOpt 0.47 rewrites the file it is given (it saves the shape-inferred model over onnx_path):
    # hand it a copy, and record whether the copy changed.
    import hashlib
    import shutil

    given = Path(out).with_name(Path(out).stem + ".input.onnx")
    shutil.copyfile(fp32_onnx, given)
    digest = hashlib.sha256(given.read_bytes()).hexdigest()
    call = dict(onnx_path=str(given), quantize_mode="int8", calibration_method=method,
                calibration_eps=["cpu"], high_precision_dtype=high_precision_dtype, output_path=str(out))
    if dq_only is not None:
        call["dq_only"] = bool(dq_only)
    env = dict(os.environ)
    if modelopt_site:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(modelopt_site), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--modelopt-worker",
           json.dumps({"call": call, "npz": str(calibration_npz)})]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        rc, log = proc.returncode, (proc.stdout + proc.stderr)
    except subprocess.TimeoutExpired as exc:
        rc, log = -9, f"timed out after {timeout_s}s\n{exc.stdout or ''}{exc.stderr or ''}"
    seconds = time.perf_counter() - started
    python_call = ("modelopt.onnx.quantization.quantize(" + ", ".join(f"{k}={v!r}" for k, v in call.items())
                   + ", calibration_data={'sample': x[M,1,32,32], 'timestep': t[M]})")
    result = {"tool": "modelopt.onnx.quantization.quantize", "call": python_call, "ok": rc == 0 and Path(out).is_file(),
              "returncode": rc, "quantize_seconds": round(seconds, 1),
              "modelopt_site": str(modelopt_site) if modelopt_site else None,
              "rewrote_its_input_onnx": given.is_file() and hashlib.sha256(given.read_bytes()).hexdigest() != digest}
    given.unlink(missing_ok=True)
    marker = "MODELOPT_VERSION="
    for line in log.splitlines():
        if line.startswith(marker):
            result["modelopt_version"] = line[len(marker):].strip()
    if not result["ok"]:
        result["error"] = _last_error(log)
    result["log_tail"] = _log_tail(log)
    return result


def _log_tail(log: str, lines: int = 40) -> list[str]:
    """The last `lines` meaningful lines of a ModelOpt run (its own messages, warnings, errors; no progress bars)."""
    keep = [ln.rstrip() for ln in log.replace("\r", "\n").splitlines()
            if ln.strip() and "it/s]" not in ln and "?it/s" not in ln]
    return keep[-lines:]


def parse_modelopt_variant(spec: str) -> tuple[str, dict]:
    """'max', 'entropy', 'max+dq_only', 'max+fp16' -> (row name, modelopt_quantize keyword arguments)."""
    method, *flags = spec.split("+")
    kwargs: dict[str, Any] = {"method": method}
    for flag in flags:
        if flag == "dq_only":
            kwargs["dq_only"] = True
        elif flag in ("fp16", "bf16", "fp32"):
            kwargs["high_precision_dtype"] = flag
        else:
            raise ValueError(f"unknown ModelOpt variant flag {flag!r} in {spec!r} (dq_only, fp16, bf16, fp32)")
    return "modelopt_int8_" + "_".join([method, *flags]), kwargs


def _last_error(log: str) -> str:
    lines = [ln for ln in log.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if "Error" in ln or "Exception" in ln:
            return ln.strip()
    return lines[-1].strip() if lines else "no output"


def _modelopt_worker(spec_json: str) -> int:
    spec = json.loads(spec_json)
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[0]})
    data = dict(np.load(spec["npz"]))
    import modelopt
    from modelopt.onnx.quantization import quantize

    print(f"MODELOPT_VERSION={getattr(modelopt, '__version__', '?')}", flush=True)
    quantize(calibration_data=data, **spec["call"])
    return 0


# --- evaluation ------------------------------------------------------------------------------------

def session(onnx_path: str | os.PathLike, threads: int = 1, optimized_path: str | os.PathLike | None = None):
    """A CPU InferenceSession, ORT_ENABLE_ALL, `threads` intra-op threads (optionally saving the optimized graph)."""
    return ort_session(onnx_path, optimization_level="all", threads=threads, inter_op_threads=1,
                       optimized_model_path=optimized_path)


def run_model(sess, inputs: dict[str, np.ndarray], batch_size: int = 64) -> np.ndarray:
    """The model's only output on `inputs`, batched."""
    n = len(inputs["sample"])
    outs = [sess.run(None, {k: v[s:s + batch_size] for k, v in inputs.items()})[0] for s in range(0, n, batch_size)]
    return np.concatenate(outs)



def sample_onnx(onnx_path: str | os.PathLike, manifest, n: int = 64, seed: int = 0, steps: int = 100,
                batch_size: int = 64, threads: int = 1) -> tuple[np.ndarray, float]:
    """uint8 DDIM images of `onnx_path` with the engines' numpy sampler; returns (images, seconds).

    `manifest` is the FP32 ONNX's (read_onnx_manifest): the quantizers keep input/output names but
    not necessarily our metadata, and all models share the model's scheduler and image shape.
    """
    from pqcad_deploy.engines.ort import OnnxRuntimeRunner
    from pqcad_deploy.engines.sampler import sample_images

    runner = OnnxRuntimeRunner(onnx_path, manifest, intra_op_threads=threads)
    with runner:
        result = sample_images(runner, manifest, n, seed, steps=steps, batch_size=batch_size, progress=False)
    return result.images, result.seconds


def _op_key(node) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}"


def optimized_op_counts(onnx_path: str | os.PathLike, workdir: str | os.PathLike, threads: int = 1) -> dict[str, int]:
    """Op types (``domain:op`` outside the default domain) of ORT's ORT_ENABLE_ALL optimized graph."""
    import onnx

    out = Path(workdir) / (Path(onnx_path).stem + ".ort_optimized.onnx")
    session(onnx_path, threads, optimized_path=out)
    model = onnx.load(str(out))
    return dict(sorted(Counter(_op_key(n) for n in model.graph.node).items()))


def summarize_ops(counts: dict[str, int]) -> dict[str, Any]:
    """Integer kernels vs float Conv/MatMul (any domain) vs Q/DQ left in an optimized graph."""
    def total(names) -> int:
        return sum(v for k, v in counts.items() if k.split(":")[-1] in names)

    return {"integer": {k: v for k, v in counts.items() if k.split(":")[-1] in INTEGER_OPS or
                        k.split(":")[-1].startswith("QLinear")},
            "integer_total": sum(v for k, v in counts.items() if k.split(":")[-1] in INTEGER_OPS or
                                 k.split(":")[-1].startswith("QLinear")),
            "float_conv": total(FLOAT_CONV_OPS), "float_matmul_gemm": total(FLOAT_MATMUL_OPS),
            "QuantizeLinear": total(("QuantizeLinear",)), "DequantizeLinear": total(("DequantizeLinear",))}


def qdq_node_counts(onnx_path: str | os.PathLike) -> dict[str, int]:
    """QuantizeLinear / DequantizeLinear nodes of the (unoptimized) file."""
    import onnx

    c = Counter(n.op_type for n in onnx.load(str(onnx_path)).graph.node)
    return {"QuantizeLinear": c.get("QuantizeLinear", 0), "DequantizeLinear": c.get("DequantizeLinear", 0)}


def size_mb(path: str | os.PathLike) -> float:
    return os.path.getsize(path) / 1e6


def latencies(onnx_paths: dict[str, str | os.PathLike], image_shape: tuple[int, int, int], batch: int = 8,
              warmup: int = 3, reps: int = 20, threads: int = 1, seed: int = 0) -> dict[str, dict]:
    """UNet latency per model (ms; median/min/max over `reps`), calls taken round-robin over the models."""
    rng = np.random.default_rng(seed)
    feed = {"sample": rng.standard_normal((batch, *image_shape), dtype=np.float32),
            "timestep": np.full((batch,), 500.0, dtype=np.float32)}
    sessions = {name: session(p, threads) for name, p in onnx_paths.items()}
    for s in sessions.values():
        for _ in range(warmup):
            s.run(None, feed)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(reps):
        for name, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feed)
            times[name].append((time.perf_counter() - t) * 1e3)
    return {name: {"batch": batch, "threads": threads, "warmup": warmup, "reps": reps,
                   "median_ms": round(statistics.median(v), 2), "min_ms": round(min(v), 2), "max_ms": round(max(v), 2)}
            for name, v in times.items()}


# --- the whole measurement -------------------------------------------------------------------------

def _fmt_ops(summary: dict) -> str:
    if not summary:
        return "-"
    ints = ", ".join(f"{k.split(':')[-1]} {v}" for k, v in summary["integer"].items()) or "none"
    return (f"{ints}; float Conv {summary['float_conv']}, float MatMul/Gemm {summary['float_matmul_gemm']}; "
            f"Q/DQ left {summary['QuantizeLinear']}/{summary['DequantizeLinear']}")


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | PSNR vs FP32 (dB) | noise SQNR (dB) | latency b8 ms median [min-max] | size MB | "
             "DDIM steps, s for the images | ORT-optimized graph: integer kernels; float Conv, MatMul/Gemm; Q/DQ left |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if not r.get("ok", True):
            lines.append(f"| {r['name']} | failed: {r.get('error', '?')} | | | | | |")
            continue
        lat = r.get("latency") or {}
        lat_s = f"{lat['median_ms']:.1f} [{lat['min_ms']:.1f}-{lat['max_ms']:.1f}]" if lat else "-"
        psnr = r.get("psnr_vs_fp32_db")
        psnr_s = "reference" if r["name"] == "fp32" else (f"{psnr:.2f}" if psnr is not None else "-")
        sq = r.get("noise_sqnr_db")
        sq_s = "reference" if r["name"] == "fp32" else (f"{sq:.2f}" if sq is not None else "-")
        steps_s = f"{r.get('sampling_steps', '-')}, {r.get('image_seconds', '-')}"
        lines.append(f"| {r['name']} | {psnr_s} | {sq_s} | {lat_s} | {r['size_mb']:.2f} | {steps_s} | "
                     f"{_fmt_ops(r.get('optimized_ops_summary', {}))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp32", help="our FP32 ONNX (pqcad-deploy export ART --fp --onnx ...)")
    ap.add_argument("--work", default="/tmp/pqcad_alternatives", help="directory for the quantized models")
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--ort-configs", default=",".join(ORT_CONFIGS), help=f"comma-separated, of {', '.join(ORT_CONFIGS)}")
    ap.add_argument("--ours", action="append", default=[], metavar="NAME=ONNX",
                    help="our exported ONNX to score alongside (repeatable)")
    ap.add_argument("--modelopt-variants", default="max,entropy,max+dq_only,max+fp16",
                    help="ModelOpt int8 runs: calibration method (max, entropy) plus optional +dq_only / +fp16 "
                         "(ModelOpt's default high_precision_dtype; the others use fp32 for the CPU); '' skips")
    ap.add_argument("--modelopt-site", default=None, help="directory holding nvidia-modelopt (prepended to PYTHONPATH)")
    ap.add_argument("--modelopt-timeout", type=int, default=1800)
    ap.add_argument("--trajectories", type=int, default=32)
    ap.add_argument("--timesteps-kept", type=int, default=16)
    ap.add_argument("--calib-seed", type=int, default=0)
    ap.add_argument("--calib-batch", type=int, default=16, help="pairs per calibration inference")
    ap.add_argument("--steps", type=int, default=100, help="DDIM steps for calibration trajectories and images")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--image-seed", type=int, default=0)
    ap.add_argument("--latency-batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modelopt-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.modelopt_worker is not None:
        return _modelopt_worker(args.modelopt_worker)
    if not args.fp32:
        ap.error("--fp32 is required")

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from pqcad_deploy.engines.manifest import read_onnx_manifest

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    fp32 = Path(args.fp32).resolve()
    manifest = read_onnx_manifest(fp32)
    image_shape = tuple(manifest.image_shape)
    results: dict[str, Any] = {
        "issue": 6, "what": "alternatives users would pick instead of pqcad-deploy, same model/calibration/seeds",
        "date": time.strftime("%Y-%m-%d"), "machine": "this 2-core CPU, shared with other processes",
        "cpu_flags": _cpu_flags(), "versions": _versions(), "fp32_onnx": str(fp32),
        "fp32_onnx_sha256": __import__("hashlib").sha256(fp32.read_bytes()).hexdigest(),
        "argv": sys.argv if argv is None else argv, "rows": []}

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n")

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    log("calibration trajectories")
    t0 = time.perf_counter()
    inputs, desc = calibration_inputs(args.trajectories, args.timesteps_kept, args.calib_seed, args.steps)
    results["calibration"] = {**desc, "pairs": int(len(inputs["sample"])), "seconds": round(time.perf_counter() - t0, 1),
                              "source": "pqcad_deploy.calibration.trajectories.collect_trajectory_calibration"}
    held_out, held_desc = calibration_inputs(8, 16, 12345, args.steps)
    results["held_out"] = {**held_desc, "pairs": int(len(held_out["sample"]))}
    npz = work / "calibration.npz"
    np.savez(npz, **inputs)

    models: dict[str, dict] = {"fp32": {"name": "fp32", "kind": "reference", "path": str(fp32)}}

    log("quant_pre_process")
    pre = work / "fp32_preprocessed.onnx"
    results["preprocess"] = preprocess(fp32, pre)
    for name in [c for c in args.ort_configs.split(",") if c]:
        cfg = ORT_CONFIGS[name]
        out = work / f"{name}.onnx"
        log(f"{name}: quantize_static")
        row = {"name": name, "kind": "onnxruntime", "path": str(out)}
        try:
            row.update(ort_quantize(pre, out, cfg, inputs, batch_size=args.calib_batch, threads=args.threads))
        except Exception as exc:
            row.update(ok=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-3000:])
        models[name] = row
    for spec in [m for m in args.modelopt_variants.split(",") if m]:
        name, kwargs = parse_modelopt_variant(spec)
        out = work / f"{name}.onnx"
        log(f"{name}: modelopt (child process)")
        row = {"name": name, "kind": "modelopt", "path": str(out)}
        row.update(modelopt_quantize(fp32, out, npz, modelopt_site=args.modelopt_site, timeout_s=args.modelopt_timeout,
                                     **kwargs))
        models[name] = row
        log(f"{name}: ok={row['ok']} {row.get('error', '')}")
    for spec in args.ours:
        name, path = spec.split("=", 1)
        models[f"ours_{name}"] = {"name": f"ours_{name}", "kind": "pqcad-deploy", "path": str(Path(path).resolve())}

    ok = {k: r for k, r in models.items() if r.get("ok", True)}
    log("reference: FP32 images")
    fp_sess = session(fp32, args.threads)
    fp_noise = run_model(fp_sess, held_out)
    fp_images, fp_seconds = sample_onnx(fp32, manifest, args.images, args.image_seed, args.steps, threads=args.threads)
    results["sampling"] = {"sampler": "engines.sampler.sample_images (numpy DDIM, eta 0)", "images": args.images,
                           "seed": args.image_seed, "steps": args.steps, "batch": 64,
                           "noise": "numpy.random.default_rng(seed).standard_normal((n, C, H, W)), all n at once"}
    for name, row in ok.items():
        path = Path(row["path"])
        log(f"{name}: evaluate")
        try:
            row["size_mb"] = round(size_mb(path), 3)
            row["qdq_nodes"] = qdq_node_counts(path)
            counts = optimized_op_counts(path, work, args.threads)
            row["optimized_ops"] = counts
            row["optimized_ops_summary"] = summarize_ops(counts)
            if name == "fp32":
                row["image_seconds"] = round(fp_seconds, 1)
                row["sampling_steps"] = args.steps
            else:
                row["noise_sqnr_db"] = round(sqnr_db(fp_noise, run_model(session(path, args.threads), held_out)), 2)
                own, steps = manifest, args.steps
                if row["kind"] == "pqcad-deploy":
                    own = read_onnx_manifest(path)
                    if own.student_steps < own.teacher_steps:  # distilled (CAD): its own N/2 timesteps
                        steps = None
                    row["precision"] = own.precision
                images, seconds = sample_onnx(path, own, args.images, args.image_seed, steps, threads=args.threads)
                row["sampling_steps"] = args.steps if steps is not None else own.student_steps
                row["psnr_vs_fp32_db"] = round(mean_psnr_db(images, fp_images), 2)
                row["image_seconds"] = round(seconds, 1)
        except Exception as exc:
            row.update(ok=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-3000:])
        log(f"{name}: {json.dumps({k: row.get(k) for k in ('psnr_vs_fp32_db', 'noise_sqnr_db', 'size_mb')})}")
        results["rows"] = list(models.values())
        save()

    log("latency (round-robin)")
    ok = {k: r for k, r in models.items() if r.get("ok", True)}
    lat = latencies({k: r["path"] for k, r in ok.items()}, image_shape, args.latency_batch, args.warmup, args.reps,
                    args.threads)
    for k, v in lat.items():
        models[k]["latency"] = v
    results["rows"] = list(models.values())
    results["table_markdown"] = markdown_table(results["rows"])
    save()
    print(results["table_markdown"], flush=True)
    return 0


def _cpu_flags() -> list[str]:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return sorted(f for f in flags if f in {"avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8"})


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for mod in ("onnxruntime", "onnx", "numpy", "torch", "diffusers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing module is just not reported
            pass
    return out


if __name__ == "__main__":
    raise SystemExit(main())
