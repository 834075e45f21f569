#!/usr/bin/env bash
# The README main job's engine against the FP32 engine of the same model, on this CPU, in one run
# (issue 12, docs/RESULTS.md section 13). Runs the README's first command's steps (compress --preset
# fast with the default method, export at the default target, build-engine), exports and builds the
# FP32 teacher and the old default (--target qdq, TensorRT's form) beside it, then, with one ONNX
# Runtime thread:
#   1. `pqcad-deploy sample -n 64 --seed 0` on both engines, twice, alternating (images/s as printed);
#   2. UNet calls at batch 8 on both optimized models, interleaved call by call (40 each), so both
#      see the same machine load; prints median / min per call and their ratio.
# Usage: bash benchmarks/main_job_speed.sh [WORK_DIR]   (default /tmp/pqcad-main-job)
set -euo pipefail
cd "$(dirname "$0")/.."
W="${1:-/tmp/pqcad-main-job}"
export OMP_NUM_THREADS=1
mkdir -p "$W"
lscpu | grep -m1 'Model name' || true
pqcad-deploy compress --out "$W/artifact" --preset fast --overwrite --quiet
pqcad-deploy export "$W/artifact" --onnx "$W/model.onnx" --overwrite
pqcad-deploy export "$W/artifact" --onnx "$W/fp32.onnx" --fp --overwrite
pqcad-deploy build-engine "$W/model.onnx" -o "$W/engine" --overwrite
pqcad-deploy build-engine "$W/fp32.onnx" -o "$W/engine_fp32" --overwrite
pqcad-deploy export "$W/artifact" --onnx "$W/qdq.onnx" --target qdq --overwrite
pqcad-deploy build-engine "$W/qdq.onnx" -o "$W/engine_qdq" --overwrite
for round in 1 2; do
  for e in engine engine_qdq engine_fp32; do
    echo "round $round $e (own steps): $(pqcad-deploy sample "$W/$e" -n 64 --seed 0 -o "$W/img_$e" --threads 1 --overwrite --quiet)"
  done
  echo "round $round engine_fp32 (--steps 50): $(pqcad-deploy sample "$W/engine_fp32" -n 64 --seed 0 --steps 50 -o "$W/img_fp32_50" --threads 1 --overwrite --quiet)"
done
W="$W" python - <<'PY'
import os, statistics, time
import numpy as np
import onnxruntime as ort

w = os.environ["W"]
sessions = {}
for name in ("engine", "engine_qdq", "engine_fp32"):
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    sessions[name] = ort.InferenceSession(f"{w}/{name}/model.onnx", options, providers=["CPUExecutionProvider"])
x = np.random.default_rng(0).standard_normal((8, 1, 32, 32)).astype(np.float32)
feed = {"sample": x, "timestep": np.full((8,), 500, np.float32)}
for s in sessions.values():
    for _ in range(3):
        s.run(None, feed)
times = {n: [] for n in sessions}
for _ in range(40):
    for n, s in sessions.items():
        t0 = time.perf_counter()
        s.run(None, feed)
        times[n].append(time.perf_counter() - t0)
for n, v in times.items():
    print(f"{n}: batch 8 median {statistics.median(v) * 1e3:.1f} ms, min {min(v) * 1e3:.1f} ms (40 calls)")
q, f = statistics.median(times["engine"]), statistics.median(times["engine_fp32"])
print(f"per call at batch 8: FP32 / default = {f / q:.2f}x (medians), {min(times['engine_fp32']) / min(times['engine']):.2f}x (mins); "
      f"FP32 / qdq = {f / statistics.median(times['engine_qdq']):.2f}x (medians)")
PY
