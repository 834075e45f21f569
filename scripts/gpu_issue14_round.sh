#!/usr/bin/env bash
# Issue 14's GPU round on one H200 (docs/RESULTS.md section 18): the speed comparison first, on an idle
# GPU, then every FID row as detached workers side by side (scripts/gpu_quant_table.py). Run from the
# repository root on the GPU machine, detached; the FID weights arrive later (`score` is started
# separately once /tmp/default_1.pt is whole).
#
#   setsid nohup bash scripts/gpu_issue14_round.sh /tmp/q14 > /tmp/q14.log 2>&1 &
set -u
CACHE=${1:-/tmp/q14}
mkdir -p "$CACHE"
for model in builtin builtin:cifar10; do
  python3 -m benchmarks.gpu_speed --model "$model" --sampler-batches 64,512 --steps 10,5,50 \
    --pipeline-steps 100,20 --unet-batches 64 --reps 5 --out "$CACHE/speed_${model/:/_}"
done
# Row grammar: scripts/gpu_quant_table.py's docstring. In priority order (workers take rows round-robin):
# the 20 -> 10 -> 5 table at W8A8, then W4A8, the RDD and schedule variants, then 100 -> 50.
F=fresh:bs=64:it=1000
ROWS=(
  fmnist:pqcad:8:8:steps=20:sample=10+5 cifar10:pqcad:8:8:steps=20:sample=10+5
  fmnist:pqcad:8:8:steps=20:cad:r=2:$F cifar10:pqcad:8:8:steps=20:cad:r=2:$F
  fmnist:pqcad:8:8:steps=20:cad cifar10:pqcad:8:8:steps=20:cad
  fmnist:pqcad:4:8:steps=20:sample=10+5 cifar10:pqcad:4:8:steps=20:sample=10+5
  fmnist:pqcad:4:8:steps=20:cad:r=2:$F cifar10:pqcad:4:8:steps=20:cad:r=2:$F
  fmnist:pqcad:8:8:steps=20:cad:$F:rdd=0.1 cifar10:pqcad:8:8:steps=20:cad:$F:rdd=0.1
  fmnist:pqcad:8:8:steps=20:cad:$F:wu=100:cos cifar10:pqcad:8:8:steps=20:cad:$F:wu=100:cos
  fmnist:pqcad:8:8:sample=50 cifar10:pqcad:8:8:sample=50
  fmnist:pqcad:8:8:cad:$F cifar10:pqcad:8:8:cad:$F
  fmnist:pqcad:4:8:sample=50 cifar10:pqcad:4:8:sample=50
  fmnist:pqcad:4:8:cad:$F cifar10:pqcad:4:8:cad:$F
)
python3 -m scripts.gpu_quant_table launch --workers 10 --cache "$CACHE" --rows "$(IFS=,; echo "${ROWS[*]}")"
