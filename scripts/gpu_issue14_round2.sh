#!/usr/bin/env bash
# Issue 14's second GPU round (run 2026-11-29: RESULTS section 20): what the first round (section 18) left.
# The 100 -> 50 rows of both models at W8A8 and W4A8 (PQ at 50 steps and CAD-fresh, the default
# preset's CAD), then two rounds 20 -> 10 -> 5 with a cosine decay at W8A8 and W4A8 (round 2's held-out loss rose at a
# constant rate), and warm-up + cosine at 20 -> 10. Every CAD row's guard now also records the PSNR
# against FP at the original teacher steps (also_against). Run from the repository root, detached:
#
#   setsid nohup bash scripts/gpu_issue14_round2.sh /tmp/q14b > /tmp/q14b.log 2>&1 &
#
# then score as in round 1: python3 -m scripts.gpu_quant_table score --weights /tmp/default_1.pt \
#   --cache /tmp/q14b --out /tmp/q14b/out --expect 18 --follow-s 1500
set -u
CACHE=${1:-/tmp/q14b}
mkdir -p "$CACHE"
ROWS=(
  fmnist:pqcad:8:8:sample=50 cifar10:pqcad:8:8:sample=50 fmnist:pqcad:4:8:sample=50 cifar10:pqcad:4:8:sample=50
  fmnist:pqcad:8:8:cad cifar10:pqcad:8:8:cad fmnist:pqcad:4:8:cad cifar10:pqcad:4:8:cad
  fmnist:pqcad:8:8:steps=20:cad:r=2:cos cifar10:pqcad:8:8:steps=20:cad:r=2:cos
  fmnist:pqcad:4:8:steps=20:cad:r=2:cos cifar10:pqcad:4:8:steps=20:cad:r=2:cos
  fmnist:pqcad:8:8:steps=20:cad:wu=100:cos cifar10:pqcad:8:8:steps=20:cad:wu=100:cos
)
python3 -m scripts.gpu_quant_table launch --workers 10 --cache "$CACHE" --rows "$(IFS=,; echo "${ROWS[*]}")"
