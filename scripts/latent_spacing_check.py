"""Does DDIM's timestep spacing set a latent model's few-step gap? FP FID at 10 and 20 steps, leading vs trailing.

Issue 17's round 1 model lost 23-24 % FID from 20 to 10 DDIM steps under Stable Diffusion's "leading" timesteps
(steps_offset 1: 901, 801, ..., 1 at 10 steps), and CAD did not win it back. This check samples the same model
with each spacing (the weights unchanged; only the scheduler config's ``timestep_spacing`` / ``steps_offset``)
and scores FID against the CIFAR-10 training statistics. It is what moved scripts/train_latent_reference.py to
"trailing" (RESULTS section 26). CPU, N images (FID is biased at small N: compare rows of one run only).

    python -m scripts.latent_spacing_check --model /tmp/r17/cifar10_latent --n 1000 --scale 3 \
        --out docs/measurements/issue17_latent_spacing_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SPACINGS = {"leading": 1, "trailing": 0}  # timestep_spacing -> steps_offset (SD's leading config; trailing's 0)
STATS = Path(__file__).resolve().parents[1] / "pqcad_deploy" / "eval" / "data" / "cifar10_train_fid_stats.npz"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a class-embedding latent pipeline folder")
    p.add_argument("--n", type=int, default=1000, help="images per row (image i: seed i, class i %% 10)")
    p.add_argument("--scale", type=float, default=3.0, help="guidance scale")
    p.add_argument("--out", default=None, help="JSON of the rows")
    args = p.parse_args(argv)

    from pqcad_deploy.conditioning import conditioning_for
    from pqcad_deploy.eval.fid import FidStatistics, fid_from_images
    from pqcad_deploy.eval.pipeline_sampling import generate_images
    from pqcad_deploy.models import load_model

    loaded = load_model(args.model)
    reference = FidStatistics.load(STATS)
    conditioning = conditioning_for(loaded, args.scale)
    rows = {}
    for spacing, offset in SPACINGS.items():
        config = dict(loaded.scheduler_config, timestep_spacing=spacing, steps_offset=offset)
        for steps in (10, 20):
            started = time.time()
            images = generate_images(loaded.unet, config, args.n, steps, seed=0, batch_size=100, progress=False,
                                     conditioning=conditioning, decode=loaded.decode).images
            rows[f"{spacing}_{steps}"] = {"fid": fid_from_images(images, reference, progress=False),
                                          "means": images.reshape(-1, 3).mean(0).tolist(), "s": time.time() - started}
            print(spacing, steps, rows[f"{spacing}_{steps}"], flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
