#!/usr/bin/env bash
# Issue 14's fourth GPU round: the FID guard, longer training, and what quantization costs at 20 steps.
# - Two rounds 20 -> 10 -> 5 on every cell under `--guard fid` (FID of 2,000 images per student against
#   FP-20's, paired bootstrap): does it keep the students that lower the 10k FID where the PSNR guard
#   rejected one (CIFAR-10 W4A8 round 1, RESULTS section 22)? Their 10-step entries are also second runs
#   of section 22's rows where both guards keep round 1.
# - Three times the iterations (it=3000) at 20 -> 10, W8A8, both models: for Fashion-MNIST's 17 % gap
#   to FP-20.
# - The PQ students sampled at the teacher's 20 steps: how much of the gap quantization alone costs.
# Run from the repository root, detached, with PQCAD_FID_WEIGHTS naming where the weights will be:
#
#   PQCAD_FID_WEIGHTS=/tmp/default_1.pt setsid nohup bash scripts/gpu_issue14_round4.sh /tmp/q14d > /tmp/q14d.log 2>&1 &
#
# then score: python3 -m scripts.gpu_quant_table score --weights /tmp/default_1.pt \
#   --cache /tmp/q14d --out /tmp/q14d/out --expect 14 --follow-s 1500
set -u
CACHE=${1:-/tmp/q14d}
mkdir -p "$CACHE"
ROWS=(
  cifar10:pqcad:4:8:steps=20:cad:r=2:guard=fid
  fmnist:pqcad:8:8:steps=20:cad:r=2:guard=fid
  cifar10:pqcad:8:8:steps=20:cad:r=2:guard=fid
  fmnist:pqcad:8:8:steps=20:cad:it=3000:guard=fid
  cifar10:pqcad:8:8:steps=20:cad:it=3000:guard=fid
  fmnist:pqcad:4:8:steps=20:cad:r=2:guard=fid
)
PQ20=fmnist:pqcad:8:8:steps=20:sample=20,cifar10:pqcad:8:8:steps=20:sample=20,fmnist:pqcad:4:8:steps=20:sample=20,cifar10:pqcad:4:8:steps=20:sample=20
python3 -m scripts.gpu_quant_table launch --workers 6 --cache "$CACHE" --rows "$(IFS=,; echo "${ROWS[*]}")"
# the four sample-only rows in one more worker (they wait for the shared PQ students the others compress)
env OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 setsid nohup python3 -m scripts.gpu_quant_table make --rows "$PQ20" \
  --cache "$CACHE" --steps 100 --n 10000 --preset default --device cuda > "$CACHE/worker_6.log" 2>&1 &
echo "worker 6: $PQ20"
# Then, on the device time left after the 14 entries (RESULTS section 24), three more rows from the same
# shared PQ students, in the same cache:
#   python3 -m scripts.gpu_quant_table launch --workers 3 --cache "$CACHE" --rows \
#     fmnist:pqcad:8:8:steps=20:cad:ema=0.999:guard=fid,cifar10:pqcad:8:8:steps=20:cad:ema=0.999:guard=fid,fmnist:pqcad:8:8:steps=20:cad:lr=3e-5:guard=fid
