#!/usr/bin/env bash
# Issue 14's third GPU round : what the second (RESULTS section 20) left.
# The two-round rows 20 -> 10 -> 5 of both models at W8A8 and W4A8 with the default CAD (constant lr)
# under the changed guard (every round judged against FP-20; the distilled student kept only when its
# per-image PSNR gain clears two standard errors): their 10-step entries check that min_z keeps the
# students that lower FID, their 5-step entries whether round 2 now beats FP-10. Then twice the
# iterations (it=2000) at 20 -> 10 on both models, for Fashion-MNIST's 17 % gap to FP-20. Run from the
# repository root, detached:
#
#   setsid nohup bash scripts/gpu_issue14_round3.sh /tmp/q14c > /tmp/q14c.log 2>&1 &
#
# then score: python3 -m scripts.gpu_quant_table score --weights /tmp/default_1.pt \
#   --cache /tmp/q14c --out /tmp/q14c/out --expect 8 --follow-s 1500
set -u
CACHE=${1:-/tmp/q14c}
mkdir -p "$CACHE"
ROWS=(
  fmnist:pqcad:8:8:steps=20:cad:r=2 cifar10:pqcad:8:8:steps=20:cad:r=2
  fmnist:pqcad:4:8:steps=20:cad:r=2 cifar10:pqcad:4:8:steps=20:cad:r=2
)
# The it=2000 rows (fmnist/cifar10:pqcad:8:8:steps=20:cad:it=2000) were dropped from the run: a first
# attempt lost the machine mid-round (idle release), and what device time was left covers these four.
python3 -m scripts.gpu_quant_table launch --workers 4 --cache "$CACHE" --rows "$(IFS=,; echo "${ROWS[*]}")"
