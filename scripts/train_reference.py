#!/usr/bin/env python3
"""Train the reference DDPMs of pqcad-deploy: Fashion-MNIST (default) or CIFAR-10 (``--dataset cifar10``).

A small diffusers ``UNet2DModel`` (epsilon prediction, 1000-step linear-beta DDPM schedule) is
trained on the 60k Fashion-MNIST training images, padded from 28x28 to 32x32 with the background
value (-1 after scaling to [-1, 1]).  The EMA weights are saved in diffusers layout:

    OUT/config.json                          (UNet2DModel config)
    OUT/diffusion_pytorch_model.safetensors  (EMA weights, fp32)
    OUT/scheduler_config.json                (DDIMScheduler config)
    OUT/train_log.json                       (args, seed, steps done, loss curve, wall time, device)
    OUT/sample_grid.png                      (8x8 grid of DDIM-100, eta=0 samples of the EMA model)

Data: the original idx files (``train-images-idx3-ubyte.gz``), e.g. from the Debian package
``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist/), read with gzip + numpy.

Retrain the shipped pqcad_deploy/builtin/fashion_mnist_ddpm (GPU; see its MODEL_CARD.md):
    mkdir -p .data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz .data/fashion-mnist/
    PYTHONUNBUFFERED=1 python3 -m scripts.train_reference --data-dir .data/fashion-mnist \
        --out out/fashion_mnist_ddpm --seed 0 --steps 9500 --stop-at 9330 --batch-size 256 \
        --max-minutes 7 --log-every 500

``--steps auto`` times a few steps of a throw-away model first and fixes the step count so that
training fits into ``--max-minutes``; the chosen number is printed and stored in train_log.json
(``steps_requested``), so passing it back as ``--steps N`` reproduces the run.

``--dataset cifar10`` trains the colour reference model (pqcad_deploy/builtin/cifar10_ddpm) on the
50,000 CIFAR-10 training images, 32x32 RGB, no padding, the same schedule and random horizontal
flips, with the larger ``CIFAR10_MODEL_CONFIG``. Data: ``train_jpg.npz`` of ../shared/data/cifar10
(JPEG bytes + offsets, decoded with Pillow), or the same file xz-compressed as ``train_jpg.npz.xz``
(lossless, 15 MB instead of 47 MB, so it travels to a GPU machine with room to spare):
    mkdir -p .data/cifar10 && xz -9 -k -c ../shared/data/cifar10/train_jpg.npz > .data/cifar10/train_jpg.npz.xz
    PYTHONUNBUFFERED=1 python3 -m scripts.train_reference --dataset cifar10 --data-dir .data/cifar10 \
        --out out/cifar10_ddpm --seed 0 --steps auto --batch-size 256 --lr 8e-4 --max-minutes 9 \
        --channels-last auto --log-every 500
(see pqcad_deploy/builtin/cifar10_ddpm/MODEL_CARD.md for the shipped run's exact command).
Without ``--dataset`` everything (model, data, random streams, outputs) is as it was for Fashion-MNIST.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

T0 = time.time()

NUM_TRAIN_TIMESTEPS = 1000
BETA_START = 1e-4
BETA_END = 0.02

MODEL_CONFIG = dict(
    sample_size=32,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64, 128),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    attention_head_dim=32,
)

CIFAR10_MODEL_CONFIG = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(64, 96, 128),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=16,
    attention_head_dim=32,
)

DATASET_DEFAULTS = {
    "fashion-mnist": {"data_dir": ".data/fashion-mnist", "out": "out/fashion_mnist_ddpm",
                      "model_config": MODEL_CONFIG},
    "cifar10": {"data_dir": ".data/cifar10", "out": "out/cifar10_ddpm", "model_config": CIFAR10_MODEL_CONFIG},
}
# options added with --dataset; left out of a Fashion-MNIST run's train_log.json, which stays as before
_CIFAR_ERA_ARGS = ("dataset", "channels_last")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=tuple(DATASET_DEFAULTS), default="fashion-mnist",
                   help="fashion-mnist (the embedded default model) or cifar10 (the colour reference model)")
    p.add_argument("--data-dir", default=None,
                   help="folder with train-images-idx3-ubyte.gz (fashion-mnist; default .data/fashion-mnist) "
                        "or train_jpg.npz / train_jpg.npz.xz (cifar10; default .data/cifar10)")
    p.add_argument("--out", default=None,
                   help="output folder (diffusers layout; default out/fashion_mnist_ddpm or out/cifar10_ddpm)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", default="12000", help="optimizer steps (int) or 'auto' (fit into --max-minutes)")
    p.add_argument("--stop-at", type=int, default=0,
                   help="stop after N steps while the LR schedule still spans --steps (0 = run all steps); "
                        "reproduces a run that the wall-clock guard cut short")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=500, help="linear warmup steps, then cosine decay to 0")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--max-minutes", type=float, default=0.0,
                   help="wall-clock guard for the whole script (0 = none); training stops early, saving")
    p.add_argument("--reserve-seconds", type=float, default=45.0,
                   help="seconds kept free under --max-minutes for sampling and saving")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--num-samples", type=int, default=64, help="samples in the grid (8 per row)")
    p.add_argument("--sample-steps", type=int, default=100, help="DDIM steps for the grid (eta=0)")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--limit-train", type=int, default=0, help="use only the first N images (smoke tests)")
    p.add_argument("--channels-last", choices=("off", "on", "auto"), default="off",
                   help="train in channels_last memory format; auto times both formats on a throw-away "
                        "model (CUDA) and keeps the faster; the saved weights are the same either way")
    args = p.parse_args(argv)
    defaults = DATASET_DEFAULTS[args.dataset]
    if args.data_dir is None:
        args.data_dir = defaults["data_dir"]
    if args.out is None:
        args.out = defaults["out"]
    return args


def logged_args(args) -> dict:
    """vars(args) as train_log.json stores it (a Fashion-MNIST run logs the options it always had)."""
    d = dict(vars(args))
    if args.dataset == "fashion-mnist" and args.channels_last == "off":
        for k in _CIFAR_ERA_ARGS:
            d.pop(k, None)
    return d


def log(msg: str):
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def read_idx_images(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic != 2051:
        raise ValueError(f"{path}: not an idx3 image file (magic {magic})")
    n, rows, cols = (int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(3))
    arr = np.frombuffer(data, dtype=np.uint8, offset=16)
    return arr.reshape(n, rows, cols)


def read_cifar10_images(data_dir: Path, limit: int = 0):
    """CIFAR-10 training images as uint8 N x 32 x 32 x 3 (RGB), from train_jpg.npz or train_jpg.npz.xz.

    Returns (images, info) where info holds the npz file's sha256 (of the uncompressed .npz, the
    checksum the shared README gives) and the decoder used.
    """
    import lzma
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image, features

    plain, packed = data_dir / "train_jpg.npz", data_dir / "train_jpg.npz.xz"
    if plain.is_file():
        raw = plain.read_bytes()
        src = plain
    elif packed.is_file():
        raw = lzma.decompress(packed.read_bytes())
        src = packed
    else:
        raise SystemExit(f"no train_jpg.npz or train_jpg.npz.xz in {data_dir}")
    sha = hashlib.sha256(raw).hexdigest()
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
        data, offsets = z["data"], z["offsets"]
    n = len(offsets) - 1 if limit <= 0 else min(limit, len(offsets) - 1)

    def dec(i):
        a, b = int(offsets[i]), int(offsets[i + 1])
        return np.asarray(Image.open(io.BytesIO(data[a:b].tobytes())).convert("RGB"))

    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as ex:
        images = np.stack(list(ex.map(dec, range(n), chunksize=512)))
    if images.shape[1:] != (32, 32, 3):
        raise SystemExit(f"unexpected CIFAR-10 image shape {images.shape}")
    info = {"file": str(src), "npz_sha256": sha, "decoder": "PIL Image.open(JPEG).convert('RGB')",
            "pillow": __import__("PIL").__version__, "libjpeg_turbo": features.version("libjpeg_turbo"),
            "decoded_uint8_sha256": hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()}
    return images, info


def make_scheduler_config():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        beta_start=BETA_START,
        beta_end=BETA_END,
        beta_schedule="linear",
        clip_sample=True,
        clip_sample_range=1.0,
        prediction_type="epsilon",
        set_alpha_to_one=True,
        steps_offset=0,
        timestep_spacing="leading",
    )


def build_model(config=None):
    from diffusers import UNet2DModel

    return UNet2DModel(**(MODEL_CONFIG if config is None else config))


def lr_lambda_factory(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        prog = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * prog))

    return f


class Trainer:
    def __init__(self, model, images_u8, args, device, alphas_cumprod, seed, rgb=False, channels_last=False):
        self.model = model
        self.args = args
        self.device = device
        self.images = images_u8  # N x 28 x 28 uint8 (Fashion-MNIST) or N x 3 x 32 x 32 (rgb), on device
        self.rgb = rgb
        self.channels_last = channels_last
        self.ac = alphas_cumprod.to(device=device, dtype=torch.float32)
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(seed + 1)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=args.lr, weight_decay=args.weight_decay,
                                     betas=(0.9, 0.999), **({"fused": True} if device.type == "cuda" else {}))
        self.use_bf16 = device.type == "cuda"

    def batch(self, bs):
        n = self.images.shape[0]
        idx = torch.randint(0, n, (bs,), device=self.device, generator=self.gen)
        if self.rgb:
            x = self.images[idx].float().div_(127.5).sub_(1.0)  # [-1, 1], N x 3 x 32 x 32, no padding
        else:
            x = self.images[idx].unsqueeze(1).float().div_(127.5).sub_(1.0)  # [-1, 1]
            x = F.pad(x, (2, 2, 2, 2), value=-1.0)  # background value
        flip = torch.rand(bs, device=self.device, generator=self.gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (bs,), device=self.device, generator=self.gen)
        noise = torch.randn(x.shape, device=self.device, generator=self.gen)
        a = self.ac[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x + (1.0 - a).sqrt() * noise
        if self.channels_last:
            xt = xt.contiguous(memory_format=torch.channels_last)
        return xt, t, noise

    def step(self, bs):
        xt, t, noise = self.batch(bs)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16):
            pred = self.model(xt, t).sample
        loss = F.mse_loss(pred.float(), noise)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.args.grad_clip)
        self.opt.step()
        return loss.detach()


@torch.no_grad()
def ddim_sample(model, scheduler, n, steps, device, seed, batch=64, channels=1):
    """DDIM eta=0 sampling with diffusers' DDIMScheduler; returns N x C x 32 x 32 in [-1, 1]."""
    model.eval()
    scheduler.set_timesteps(steps)
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for s in range(0, n, batch):
        m = min(batch, n - s)
        x = torch.randn((m, channels, 32, 32), generator=g).to(device)
        for t in scheduler.timesteps:
            tt = torch.full((m,), int(t), device=device, dtype=torch.long)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                eps = model(x, tt).sample
            x = scheduler.step(eps.float(), t, x, eta=0.0).prev_sample
        out.append(x.clamp(-1, 1).cpu())
    return torch.cat(out)


def save_grid(x, path, nrow=8):
    from PIL import Image

    x = ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()[:, 0]  # N x H x W
    n, h, w = x.shape
    rows = math.ceil(n / nrow)
    pad = 2
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad), 128, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = x[i]
    img = Image.fromarray(grid, mode="L")
    img = img.resize((img.width * 2, img.height * 2), Image.NEAREST)
    img.save(path)


def save_grid_rgb(x, path, nrow=8):
    """Like save_grid, for N x 3 x H x W samples in [-1, 1] (grey 128 borders, shown at 2x)."""
    from PIL import Image

    x = ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()  # NHWC
    n, h, w, _ = x.shape
    rows = math.ceil(n / nrow)
    pad = 2
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 128, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = x[i]
    img = Image.fromarray(grid, mode="RGB")
    img = img.resize((img.width * 2, img.height * 2), Image.NEAREST)
    img.save(path)


def main(argv=None):
    args = parse_args(argv)
    import diffusers

    budget_s = args.max_minutes * 60.0 if args.max_minutes > 0 else float("inf")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    log(f"torch {torch.__version__}, diffusers {diffusers.__version__}, device {device} ({dev_name})")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rgb = args.dataset == "cifar10"
    model_config = DATASET_DEFAULTS[args.dataset]["model_config"]
    data_info = None
    if rgb:
        images, data_info = read_cifar10_images(Path(args.data_dir), args.limit_train)
        log(f"train images: {images.shape} (npz sha256 {data_info['npz_sha256'][:16]}..., "
            f"decoded sha256 {data_info['decoded_uint8_sha256'][:16]}...)")
        images_t = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)
    else:
        images = read_idx_images(Path(args.data_dir) / "train-images-idx3-ubyte.gz")
        if args.limit_train > 0:
            images = images[: args.limit_train]
        log(f"train images: {images.shape}")
        images_t = torch.from_numpy(images.copy()).to(device)

    scheduler = make_scheduler_config()
    alphas_cumprod = scheduler.alphas_cumprod.clone()

    # ---- optional throughput calibration on a throw-away model ----
    steps_auto = str(args.steps).lower() == "auto"
    calib = None
    formats = {"off": [False], "on": [True], "auto": [False, True]}[args.channels_last]
    format_timings = {}

    def time_format(cl):
        torch.manual_seed(12345)
        tmp = build_model(model_config).to(device).train()
        if cl:
            tmp = tmp.to(memory_format=torch.channels_last)
        tr = Trainer(tmp, images_t, args, device, alphas_cumprod, 12345, rgb=rgb, channels_last=cl)
        for _ in range(15):
            tr.step(args.batch_size)
        if device.type == "cuda":
            torch.cuda.synchronize()
        n_cal = 60 if device.type == "cuda" else 5
        tc = time.time()
        for _ in range(n_cal):
            tr.step(args.batch_size)
        if device.type == "cuda":
            torch.cuda.synchronize()
        sec = (time.time() - tc) / n_cal * 1.04  # + EMA update and logging
        del tr, tmp
        return sec

    channels_last = formats[0]
    if steps_auto or len(formats) > 1:
        if steps_auto and not math.isfinite(budget_s):
            raise SystemExit("--steps auto needs --max-minutes")
        for cl in formats:
            name = "channels_last" if cl else "contiguous"
            if len(formats) == 1:
                format_timings[name] = time_format(cl)
                continue
            try:
                format_timings[name] = time_format(cl)
                log(f"calibration {name}: {format_timings[name] * 1000:.2f} ms/step")
            except RuntimeError as exc:  # a layer that refuses the format: keep the other one
                log(f"calibration {name} failed ({type(exc).__name__}: {str(exc).splitlines()[0]}); skipped")
        if not format_timings:
            raise SystemExit("no memory format could be timed")
        best = min(format_timings, key=format_timings.get)
        channels_last = best == "channels_last"
        sec_per_step = format_timings[best]
    if steps_auto:
        avail = budget_s - (time.time() - T0) - args.reserve_seconds
        total_steps = max(100, int(0.95 * avail / sec_per_step) // 100 * 100)
        calib = {"sec_per_step": sec_per_step, "available_s": avail}
        if args.channels_last != "off":
            calib["memory_format_sec_per_step"] = format_timings
        log(f"calibration: {sec_per_step * 1000:.2f} ms/step -> --steps {total_steps}")
    else:
        total_steps = int(args.steps)

    # ---- model, EMA, optimizer ----
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    model = build_model(model_config)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"UNet2DModel parameters: {n_params:,} ({n_params / 1e6:.3f} M)")
    model = model.to(device).train()
    ema = build_model(model_config).to(device)
    ema.load_state_dict(model.state_dict())
    if channels_last:
        log("training in channels_last memory format")
        model = model.to(memory_format=torch.channels_last)
        ema = ema.to(memory_format=torch.channels_last)
    ema.eval().requires_grad_(False)
    ema_params = list(ema.parameters())
    trainer = Trainer(model, images_t, args, device, alphas_cumprod, args.seed, rgb=rgb, channels_last=channels_last)
    model_params = list(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(trainer.opt, lr_lambda_factory(args.warmup, total_steps))

    loss_curve = []
    acc = torch.zeros((), device=device)
    acc_n = 0
    t_train = time.time()
    stopped_early = False
    step = 0
    last_step = min(total_steps, args.stop_at) if args.stop_at > 0 else total_steps
    for step in range(1, last_step + 1):
        loss = trainer.step(args.batch_size)
        sched.step()
        decay = min(args.ema_decay, (1.0 + step) / (10.0 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)
        acc += loss
        acc_n += 1
        if step % args.log_every == 0 or step == last_step:
            mean_loss = (acc / acc_n).item()
            el = time.time() - t_train
            loss_curve.append({"step": step, "loss": mean_loss, "lr": sched.get_last_lr()[0],
                               "elapsed_s": round(el, 2)})
            log(f"step {step}/{total_steps} loss {mean_loss:.5f} lr {sched.get_last_lr()[0]:.2e} "
                f"{step / el:.1f} it/s")
            acc.zero_()
            acc_n = 0
        if time.time() - T0 > budget_s - args.reserve_seconds:
            stopped_early = step < total_steps
            if acc_n:
                mean_loss = (acc / acc_n).item()
                loss_curve.append({"step": step, "loss": mean_loss, "lr": sched.get_last_lr()[0],
                                   "elapsed_s": round(time.time() - t_train, 2)})
            log(f"wall-clock guard: stopping after {step} of {total_steps} steps")
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_wall = time.time() - t_train
    steps_done = step
    # buffers (none in this UNet, but keep EMA model complete)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)

    # ---- save (EMA weights, fp32) ----
    ema_cpu = build_model(model_config)
    ema_cpu.load_state_dict({k: v.detach().float().cpu() for k, v in ema.state_dict().items()})
    ema_cpu.save_pretrained(out, safe_serialization=True)
    scheduler.save_pretrained(out)
    log(f"saved EMA model + scheduler to {out}")

    # ---- samples ----
    ts = time.time()
    samples = ddim_sample(ema, make_scheduler_config(), args.num_samples, args.sample_steps, device, args.seed,
                          channels=model_config["in_channels"])
    if rgb:
        save_grid_rgb(samples, out / "sample_grid.png")
    else:
        save_grid(samples, out / "sample_grid.png")
    sample_wall = time.time() - ts
    log(f"sample grid ({args.num_samples} x DDIM-{args.sample_steps}) in {sample_wall:.1f}s")

    train_log = {
        "script": "scripts/train_reference.py",
        "argv": sys.argv[1:] if argv is None else list(argv),
        "args": logged_args(args),
        "seed": args.seed,
        "steps_requested": total_steps,
        "steps_auto_calibration": calib,
        "steps_done": steps_done,
        "stopped_early_by_wall_clock_guard": stopped_early,
        "batch_size": args.batch_size,
        "images_seen": steps_done * args.batch_size,
        "epochs": steps_done * args.batch_size / images.shape[0],
        "final_loss": loss_curve[-1]["loss"] if loss_curve else None,
        "loss_curve": loss_curve,
        "train_wall_s": round(train_wall, 2),
        "sample_wall_s": round(sample_wall, 2),
        "total_wall_s": round(time.time() - T0, 2),
        "parameters": n_params,
        "model_config": model_config,
        "ema_decay": args.ema_decay,
        "weights_saved": "EMA",
        "precision": "bf16 autocast (CUDA)" if device.type == "cuda" else "fp32 (CPU)",
        "device": str(device),
        "device_name": dev_name,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "diffusers_version": diffusers.__version__,
        "python_version": platform.python_version(),
        "data": ({"dataset": "CIFAR-10 train (train_jpg.npz: JPEG bytes, Pillow-decoded)",
                  "n_images": int(images.shape[0]),
                  "preprocess": "uint8/127.5-1, 32x32 RGB (no padding), random horizontal flip", **data_info}
                 if rgb else
                 {"dataset": "Fashion-MNIST train (idx, gzip)", "n_images": int(images.shape[0]),
                  "preprocess": "uint8/127.5-1, pad 28->32 with -1, random horizontal flip"}),
        "noise_schedule": {"num_train_timesteps": NUM_TRAIN_TIMESTEPS, "beta_schedule": "linear",
                           "beta_start": BETA_START, "beta_end": BETA_END, "prediction_type": "epsilon"},
    }
    with open(out / "train_log.json", "w") as f:
        json.dump(train_log, f, indent=1)
    log(f"done: {steps_done} steps, final loss {train_log['final_loss']}, total {train_log['total_wall_s']}s")


if __name__ == "__main__":
    main()
