"""Issue 13's FP measurements on the GPU machine: the CIFAR-10 reference statistics and the FID curve.

1. FID reference statistics of the 50,000 CIFAR-10 training images (``train_jpg.npz``, decoded with
   Pillow exactly as scripts/train_reference.py decodes them for training, 32x32 RGB, no padding),
   through the project's own FID code (pqcad_deploy.eval.inception / fid, standard FID Inception
   weights in full fp32), written compact (float32 upper triangle) as ``cifar10_train_fid_stats.npz``
   so it fits the machine's 16 MiB return limit and can ship in pqcad_deploy/eval/data/.
2. FP FID at 10,000 samples for DDIM 100, 50, 20, 10 and 5 steps for both builtin models, with the
   protocol of docs/RESULTS.md section 1: pqcad_deploy.eval.pipeline_sampling.generate_images (diffusers
   ``DDIMPipeline``, eta 0, image i seeded with seed + i, batch 1000, fp32 UNet), Fashion-MNIST against
   the shipped ``fashion_mnist_train_fid_stats.npz``, CIFAR-10 against the statistics of step 1.
   Also recorded: images/s, the per-channel pixel means of each 10k set (0-255; issue 13 tracks a
   colour shift), and, as a floor, the FID of 10,000 random CIFAR-10 training images against the 50k.

Generated images are cached as .npy in ``--cache`` (``/tmp/fidcurve``), so the work can be split over
back-to-back device calls: ``--generate-only`` fills the cache (no Inception weights needed), a later
call computes the statistics and FIDs from it (and generates any row still missing).

The models are loaded directly with diffusers (the same calls as pqcad_deploy.models at the time of
writing: ``UNet2DModel.from_pretrained`` + the scheduler config converted to a DDIMScheduler config).

    python -m scripts.gpu_fid_curve --generate-only --cifar-model /tmp/cifar10_ddpm --out $OUT
    python -m scripts.gpu_fid_curve --weights /tmp/default_1.pt --cifar-data /tmp/cifar10 \
        --cifar-model /tmp/cifar10_ddpm --out $OUT
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FMNIST_DIR = ROOT / "pqcad_deploy" / "builtin" / "fashion_mnist_ddpm"
FMNIST_STATS = ROOT / "pqcad_deploy" / "eval" / "data" / "fashion_mnist_train_fid_stats.npz"
CIFAR_STATS_NAME = "cifar10_train_fid_stats.npz"


def load_model_dir(path: Path):
    """(UNet2DModel in eval mode, DDIMScheduler config dict) from a diffusers model folder."""
    from diffusers import DDIMScheduler, UNet2DModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    unet = UNet2DModel.from_pretrained(str(path), local_files_only=True).eval()
    raw = json.loads((path / "scheduler_config.json").read_text())
    scheduler = DDIMScheduler.from_config(raw)
    config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    config["_class_name"] = "DDIMScheduler"
    return unet, json.loads(json.dumps(config))


def save_grid(images, path: Path, ncols: int = 8, scale: int = 2) -> None:
    """uint8 N x H x W x C images as one PNG grid (grey 128 borders of 2 px, nearest-upscaled)."""
    import numpy as np
    from PIL import Image

    n, h, w, c = images.shape
    rows = (n + ncols - 1) // ncols
    pad = 2
    grid = np.full((rows * (h + pad) + pad, ncols * (w + pad) + pad, c), 128, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, ncols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = images[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid, mode="L" if c == 1 else "RGB")
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None, help="FID Inception weights (default_1.pt); not needed with --generate-only")
    ap.add_argument("--cifar-data", default="/tmp/cifar10", help="folder with train_jpg.npz or train_jpg.npz.xz")
    ap.add_argument("--cifar-model", required=True, help="the CIFAR-10 model folder (diffusers layout)")
    ap.add_argument("--fmnist-model", default=str(FMNIST_DIR))
    ap.add_argument("--fmnist-stats", default=str(FMNIST_STATS))
    ap.add_argument("--out", required=True)
    ap.add_argument("--cache", default="/tmp/fidcurve")
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--steps", default="100,50,20,10,5")
    ap.add_argument("--models", default="cifar10,fashion-mnist")
    ap.add_argument("--generate-only", action="store_true")
    ap.add_argument("--budget-s", type=float, default=480.0,
                    help="start no new generation after this many seconds (rows left are generated later)")
    ap.add_argument("--ref-limit", type=int, default=0, help="smoke tests only: first N CIFAR-10 images")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()

    import numpy as np
    import torch

    from pqcad_deploy.eval.pipeline_sampling import generate_images

    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    steps_list = [int(s) for s in args.steps.split(",")]
    models = args.models.split(",")
    model_dirs = {"cifar10": Path(args.cifar_model), "fashion-mnist": Path(args.fmnist_model)}
    # new rows first (CIFAR-10, then Fashion-MNIST's 20/10/5), the re-measured section-1 rows last
    order = [(m, s) for m in models for s in steps_list]
    order.sort(key=lambda ms: (ms[0] == "fashion-mnist" and ms[1] in (100, 50)))

    import diffusers

    results: dict = {
        "issue": 13, "n": args.n, "seed": args.seed, "batch_size": args.batch_size, "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "torch": torch.__version__, "diffusers": diffusers.__version__,
        "protocol": "pqcad_deploy.eval.pipeline_sampling.generate_images: diffusers DDIMPipeline, eta 0, image i "
                    "seeded with torch.Generator('cpu').manual_seed(seed + i), fp32 UNet, output rounded "
                    "to uint8; FID with pqcad_deploy.eval (standard FID Inception weights, full fp32)",
        "models": {m: str(model_dirs[m]) for m in models},
        "rows": {},
    }
    res_path = out / "issue13_fp_fid_curve.json"

    def save_results() -> None:
        results["elapsed_s"] = round(time.perf_counter() - t0, 2)
        res_path.write_text(json.dumps(results, indent=1, sort_keys=True))

    loaded: dict = {}

    def images_for(model: str, steps: int, allow_generate: bool):
        f = cache / f"{model}_ddim{steps}_n{args.n}_s{args.seed}.npy"
        meta_f = f.with_suffix(".json")
        if f.is_file() and meta_f.is_file():
            return np.load(f), json.loads(meta_f.read_text())
        if not allow_generate:
            return None, None
        if model not in loaded:
            loaded[model] = load_model_dir(model_dirs[model])
        unet, sched = loaded[model]
        gen = generate_images(unet, sched, args.n, steps, seed=args.seed, batch_size=args.batch_size,
                              device=args.device, progress=False)
        meta = {"generate_seconds": round(gen.seconds, 3), "images_per_second": round(gen.images_per_second, 2)}
        np.save(f, gen.images)
        meta_f.write_text(json.dumps(meta))
        print(f"generated {model} DDIM-{steps}: {gen.images.shape} in {gen.seconds:.1f}s "
              f"({gen.images_per_second:.0f} img/s)", flush=True)
        return gen.images, meta

    if args.generate_only:
        for model, steps in order:
            if time.perf_counter() - t0 > args.budget_s:
                print(f"budget: leaving {model} DDIM-{steps} for the next call", flush=True)
                continue
            images, meta = images_for(model, steps, True)
            results["rows"][f"{model}_fp_ddim{steps}"] = {"steps": steps, **meta}
        save_results()
        print("generate-only done", f"{time.perf_counter() - t0:.1f}s", flush=True)
        return 0

    from pqcad_deploy.eval.fid import FidStatistics, compute_statistics
    from pqcad_deploy.eval.inception import InceptionFeatures
    from scripts.train_reference import read_cifar10_images

    if args.weights is None:
        raise SystemExit("--weights is needed to compute FIDs")
    extractor = InceptionFeatures(args.device, weights=args.weights, batch_size=500)
    refs: dict = {}
    if "fashion-mnist" in models:
        refs["fashion-mnist"] = FidStatistics.load(args.fmnist_stats)
        refs["fashion-mnist"].check_compatible(FidStatistics(
            mu=refs["fashion-mnist"].mu, sigma=refs["fashion-mnist"].sigma, count=2,
            description=extractor.description()))
        results["reference_fashion_mnist"] = {"file": str(args.fmnist_stats), "count": refs["fashion-mnist"].count}
    if "cifar10" in models:
        t = time.perf_counter()
        train, info = read_cifar10_images(Path(args.cifar_data), args.ref_limit)
        decode_s = time.perf_counter() - t
        count = "all 50,000" if args.ref_limit <= 0 else f"first {args.ref_limit}"
        desc = {
            "dataset": "cifar10", "split": "train", "data_sha256": info["npz_sha256"],
            "padding": "none (32x32 RGB)", "limit": args.ref_limit or None,
            "source": f"cifar10 train ({count} images of train_jpg.npz, JPEG-decoded with Pillow, 32x32 RGB)",
            "decoder": info["decoder"], "decoded_uint8_sha256": info["decoded_uint8_sha256"],
            "pillow": info["pillow"], "libjpeg_turbo": info["libjpeg_turbo"],
        }
        t = time.perf_counter()
        feats = extractor(train)
        from pqcad_deploy.eval.fid import feature_statistics

        mu, sigma = feature_statistics(feats)
        ref = FidStatistics(mu=mu, sigma=sigma, count=feats.shape[0], description={**desc, **extractor.description()})
        stats_s = time.perf_counter() - t
        ref.save(out / CIFAR_STATS_NAME, compact=True)
        ref_compact = FidStatistics.load(out / CIFAR_STATS_NAME)
        refs["cifar10"] = ref_compact
        # floor: 10,000 random training images (fixed seed) against all of them
        pick = np.sort(np.random.default_rng(0).choice(train.shape[0], size=min(10000, train.shape[0] - 1),
                                                       replace=False))
        sub_mu, sub_sigma = feature_statistics(feats[pick])
        floor = float(FidStatistics(mu=sub_mu, sigma=sub_sigma, count=len(pick)).frechet_distance(ref))
        results["reference_cifar10"] = {
            "count": ref.count, "decode_seconds": round(decode_s, 2), "features_seconds": round(stats_s, 2),
            "images_per_second": round(ref.count / stats_s, 1), "description": desc,
            "channel_means_0_255": [round(float(v), 3) for v in train.reshape(-1, 3).mean(0)],
            "fid_compact_vs_full_stats_of_floor_set": abs(
                floor - float(FidStatistics(mu=sub_mu, sigma=sub_sigma, count=len(pick)).frechet_distance(ref_compact))),
            "fid_random10k_train_vs_50k_train": floor,
        }
        print("cifar10 reference", json.dumps(results["reference_cifar10"]), flush=True)
        del train, feats
        save_results()

    for model, steps in order:
        allow = time.perf_counter() - t0 < args.budget_s
        images, meta = images_for(model, steps, allow)
        name = f"{model}_fp_ddim{steps}"
        if images is None:
            results.setdefault("skipped", []).append(name)
            print("skipped (time)", name, flush=True)
            continue
        t = time.perf_counter()
        stats = compute_statistics(images, device=args.device, batch_size=500, progress=False,
                                   source=name, extractor=extractor)
        stats.check_compatible(refs[model])
        fid = stats.frechet_distance(refs[model])
        results["rows"][name] = {
            "model": model, "steps": steps, "fid": fid, "fid_seconds": round(time.perf_counter() - t, 2),
            "channel_means_0_255": [round(float(v), 3) for v in images.reshape(-1, images.shape[-1]).mean(0)],
            **meta,
        }
        print(name, json.dumps(results["rows"][name]), flush=True)
        if model == "cifar10" and steps in (100, 5):
            save_grid(images[:64], out / f"issue13_grid_cifar10_fp_ddim{steps}.png")
        save_results()
    save_results()
    print("total", f"{time.perf_counter() - t0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
