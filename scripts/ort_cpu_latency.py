"""UNet latency of ONNX files on ONNX Runtime's CPU provider, and what ONNX Runtime fused (issue 6).

For each ONNX: optimize it at the given level (the optimized graph is saved to count its op types:
how many Conv/MatMul became integer kernels), then time one forward pass of a fixed batch, after
warm-up, `--runs` times (the files take turns, one run each), and report the median.
Single-threaded by default so numbers from a shared machine are comparable. Prints one JSON line per
file and writes them all to --out.

    OMP_NUM_THREADS=1 python -m scripts.ort_cpu_latency fp32.onnx w8a8.onnx w8a8_x86.onnx --batch 8
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_LEVELS = ("basic", "extended", "all")  # engines.ort_session.OPTIMIZATION_LEVELS less "disabled"
# Op types that run integer arithmetic (ONNX standard and onnxruntime contrib names).
INTEGER_OPS = ("ConvInteger", "QLinearConv", "MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat",
               "DynamicQuantizeMatMul", "QGemm", "MatMulNBits")


def op_counts(model) -> dict[str, int]:
    """{op_type: count}; com.microsoft contrib ops keep their bare op type (``MatMulIntegerToFloat``),
    other domains are prefixed (``com.microsoft.nchwc:Conv``, the blocked float Conv of level "all")."""
    def key(node) -> str:
        return node.op_type if node.domain in ("", "ai.onnx", "com.microsoft") else f"{node.domain}:{node.op_type}"

    return dict(sorted(collections.Counter(key(n) for n in model.graph.node).items()))


def load(path: Path, *, batch: int, threads: int, level: str) -> tuple[object, dict, dict]:
    """(session, feed, row without timings) for one ONNX, with its optimized graph's op counts."""
    import onnx
    from pqcad_deploy.engines.ort_session import ort_session

    with tempfile.TemporaryDirectory() as tmp:
        session = ort_session(path, optimization_level=level, threads=threads, inter_op_threads=1,
                              optimized_model_path=Path(tmp) / "optimized.onnx")
        optimized = onnx.load(str(Path(tmp) / "optimized.onnx"), load_external_data=False)
    source = onnx.load(str(path), load_external_data=False)
    dims = [d.dim_value for d in source.graph.input[0].type.tensor_type.shape.dim[1:]]
    rng = np.random.default_rng(0)
    feed = {"sample": rng.standard_normal([batch] + dims, dtype=np.float32),
            "timestep": np.linspace(900, 10, batch).astype(np.float32)}
    counts = op_counts(optimized)
    row = {
        "onnx": str(path), "size_bytes": path.stat().st_size, "batch": batch, "threads": threads,
        "optimization_level": level,
        "source_ops": {k: v for k, v in op_counts(source).items() if k in ("Conv", "MatMul", "Gemm")},
        "optimized_ops": counts,
        "integer_ops": {k: v for k, v in counts.items() if k in INTEGER_OPS},
        "float_conv_matmul_gemm": {k: counts.get(k, 0) for k in ("Conv", "MatMul", "Gemm", "FusedMatMul")},
    }
    return session, feed, row


def measure(paths: list[Path], *, batch: int, runs: int, warmup: int, threads: int, level: str) -> list[dict]:
    """Time the files round-robin (one run of each in turn), so load from other processes on a shared
    machine spreads over all of them instead of skewing one."""
    loaded = [load(p, batch=batch, threads=threads, level=level) for p in paths]
    for session, feed, _ in loaded:
        for _ in range(warmup):
            session.run(None, feed)
    times: list[list[float]] = [[] for _ in paths]
    for _ in range(runs):
        for i, (session, feed, _) in enumerate(loaded):
            start = time.perf_counter()
            session.run(None, feed)
            times[i].append(time.perf_counter() - start)
    rows = []
    for (_, _, row), t in zip(loaded, times):
        row.update(runs=runs, warmup=warmup, median_ms=round(1e3 * statistics.median(t), 2),
                   min_ms=round(1e3 * min(t), 2), max_ms=round(1e3 * max(t), 2))
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("onnx", nargs="+", type=Path)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--level", choices=sorted(_LEVELS), default="extended")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import onnxruntime as ort

    rows = measure(args.onnx, batch=args.batch, runs=args.runs, warmup=args.warmup, threads=args.threads,
                   level=args.level)
    for row in rows:
        row.update(onnxruntime=ort.__version__, machine=platform.processor() or platform.machine(),
                   cpu_count=os.cpu_count())
        print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
