#!/usr/bin/env python3
"""Train pqcad-deploy's class-conditional LATENT reference model on CIFAR-10 (issue 17, item 6).

Why this model: the deployed diffusion models are latent and conditional (Stable Diffusion). This one
is small enough to train here in minutes yet runs the SD code path end to end: an ``AutoencoderKL``
(downsampling factor 2, latents 4 x 16 x 16) and a ``UNet2DConditionModel`` whose cross-attention
reads a LEARNED class-embedding table (``[11, T, D]``: rows 0..9 the classes, row 10 the null class
of classifier-free guidance) in place of CLIP text embeddings, under Stable Diffusion's noise schedule.

Two phases in one run, each with its own minute budget (``--vae-minutes`` / ``--unet-minutes``; a
phase's budget covers its throughput calibration and its training loop):
  1. VAE: L1 reconstruction in [-1, 1] + a tiny KL term (LDM's loss normalisation), random horizontal
     flips, trained on all images except 1,000 held back (every 50th image, 100 per class) on which
     reconstruction PSNR is reported. The weights are then rounded to float16 (what is shipped), and
     ``scaling_factor = 1 / std`` of ``latent_dist.sample()`` (as SD samples) over the training images
     is stored in the VAE config.
  2. UNet + class table, trained jointly, epsilon prediction, 10% label dropout to the null row, EMA
     (warmup as in scripts/train_reference.py). The 50,000 images (and their mirror images) are
     pre-encoded ONCE by the frozen VAE into the posterior mean and std; each step draws
     ``(mean + std * randn) * scaling_factor``, which is exactly ``vae.encode(x).latent_dist.sample()``
     of the flipped or unflipped image, at a fraction of the cost of encoding every batch (820 MB of
     GPU memory for 50k images).

Output (``--out``), diffusers' pipeline folder layout; UNet and VAE weights in float16 (the class table
in float32), so the whole folder is about 8 MB and travels through a device call and git:
    model_index.json, unet/, vae/, scheduler/ (DDIMScheduler, SD's config), class_embeddings/
    (config.json + embeddings.safetensors, key "embeddings"), train_log.json, sample_grid.png
    (10 rows = classes x 8, DDIM 50 steps, eta 0, guidance 3, made from the folder as saved).

GPU run (one device call must finish in 10 minutes: ~8 minutes of training, ~1 minute of overhead,
``--max-minutes`` as the guard; the data file as for scripts/train_reference.py):
    PYTHONUNBUFFERED=1 python3 -m scripts.train_latent_reference --data-dir .data/cifar10 \\
        --out $OUT/cifar10_latent --seed 0 --vae-steps auto --vae-minutes 2.5 \\
        --unet-steps auto --unet-minutes 5.5 --batch-size 256 --channels-last auto \\
        --max-minutes 9.5 --log-every 500

``--*-steps auto`` times a few steps of a throw-away model first and fixes the step count so that the
phase fits its budget; the chosen number is printed and stored in train_log.json, so passing it back
as ``--vae-steps N`` / ``--unet-steps N`` reproduces the run. CPU smoke test (a few minutes):
    OMP_NUM_THREADS=1 python -m scripts.train_latent_reference --out /tmp/latent_smoke \\
        --limit-train 512 --vae-steps 20 --unet-steps 20 --batch-size 32 --log-every 5
"""
from __future__ import annotations

import argparse
import io
import json
import lzma
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from scripts.train_reference import T0, log, lr_lambda_factory, read_cifar10_images, save_grid_rgb

NUM_CLASSES = 10
NULL_CLASS = 10  # row of the class table used for the unconditional half of guidance
CLASS_TOKENS = 4  # T: tokens per class (the "sequence length" the cross-attention sees)
CLASS_WIDTH = 128  # D: cross_attention_dim
LATENT_SHAPE = (4, 16, 16)
HELD_OUT = 1000  # images kept out of VAE training for its PSNR

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(64, 64),  # 0.86 M parameters; (64, 128) would be 2.6 M, over the size budget
    layers_per_block=1,
    latent_channels=4,
    sample_size=32,
)

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(64, 64, 96),  # 2.94 M parameters; (64, 128, 128) would be 5.9 M
    layers_per_block=1,
    cross_attention_dim=CLASS_WIDTH,
    attention_head_dim=8,  # diffusers reads this as the number of heads, as SD 1.5's config does
    norm_num_groups=32,
)

# Stable Diffusion 1.x's schedule (its scheduler_config.json: PNDM with these keys), as a DDIMScheduler, except the
# sampling timesteps: "trailing" (999, 899, ... at 10 steps) instead of SD's "leading" with steps_offset 1 (901, 801,
# ...). Sampling only; training is the same. On round 1's model (RESULTS section 25, CPU, 1,000 images, guidance 3)
# leading gave FID 101.6 at 10 steps and 87.9 at 20, trailing 76.7 at 10: leading starts a few-step sampler from
# pure noise at a timestep where the model expects signal (Lin et al. 2023, "Common Diffusion Noise Schedules and
# Sample Steps are Flawed", section 3.3).
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=0,
    prediction_type="epsilon",
    timestep_spacing="trailing",
)

AUTOCAST_CHOICES = ("auto", "bf16", "off")
MEMORY_FORMAT_CHOICES = ("off", "on", "auto")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=".data/cifar10", help="folder with train_jpg.npz or train_jpg.npz.xz")
    p.add_argument("--out", default="out/cifar10_latent", help="output folder (diffusers pipeline layout)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-minutes", type=float, default=0.0,
                   help="VAE phase budget (calibration + training); 0 = none; needed by --vae-steps auto")
    p.add_argument("--vae-steps", default="3000", help="VAE optimizer steps (int) or 'auto'")
    p.add_argument("--unet-minutes", type=float, default=0.0,
                   help="UNet phase budget (calibration + training); 0 = none; needed by --unet-steps auto")
    p.add_argument("--unet-steps", default="12000", help="UNet optimizer steps (int) or 'auto'")
    p.add_argument("--max-minutes", type=float, default=0.0,
                   help="wall-clock guard for the whole script (0 = none); training stops early, saving")
    p.add_argument("--reserve-seconds", type=float, default=30.0,
                   help="seconds kept free under --max-minutes for saving, checking and sampling")
    p.add_argument("--batch-size", type=int, default=256, help="batch size of both phases")
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--unet-lr", type=float, default=8e-4)
    p.add_argument("--vae-warmup", type=int, default=200, help="linear warmup steps, then cosine decay to 0")
    p.add_argument("--unet-warmup", type=int, default=500, help="linear warmup steps, then cosine decay to 0")
    p.add_argument("--kl-weight", type=float, default=1e-6,
                   help="KL weight relative to the per-image SUM of |x - x_rec| (LDM's convention)")
    p.add_argument("--normalize-latents", action=argparse.BooleanOptionalAction, default=True,
                   help="fold per-channel latent normalisation into the VAE's 1x1 convs (fold_latent_normalization_)")
    p.add_argument("--label-dropout", type=float, default=0.1, help="probability that a label becomes null")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decay (not on the class table)")
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--limit-train", type=int, default=0,
                   help="use only N images, spread evenly over the class-sorted file (smoke tests)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--autocast", choices=AUTOCAST_CHOICES, default="auto",
                   help="bf16 autocast for training; auto = bf16 on CUDA, off on CPU (weights stay fp32)")
    p.add_argument("--channels-last", choices=MEMORY_FORMAT_CHOICES, default="off",
                   help="train in channels_last; auto times both formats per phase on a throw-away model")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps for the grid (eta=0)")
    p.add_argument("--guidance-scale", type=float, default=3.0, help="guidance scale of the grid")
    args = p.parse_args(argv)
    for name in ("vae", "unet"):
        steps, minutes = getattr(args, f"{name}_steps"), getattr(args, f"{name}_minutes")
        if str(steps).lower() == "auto":
            if minutes <= 0:
                p.error(f"--{name}-steps auto needs --{name}-minutes > 0")
        elif not str(steps).isdigit() or int(steps) < 1:
            p.error(f"--{name}-steps must be a positive integer or 'auto', got {steps!r}")
    return args


# ---------------------------------------------------------------- data

def read_cifar10_labels(data_dir: Path) -> tuple[np.ndarray, list[str]]:
    """Labels (int64, file order) and class names of the same npz that read_cifar10_images decodes."""
    plain, packed = data_dir / "train_jpg.npz", data_dir / "train_jpg.npz.xz"
    raw = plain.read_bytes() if plain.is_file() else lzma.decompress(packed.read_bytes())
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
        return z["labels"].astype(np.int64), [c.decode() for c in z["classes"]]


def evenly_spread(n_total: int, limit: int) -> np.ndarray:
    """Indices of `limit` images spread over the file; the file is sorted by class, a prefix is one class."""
    if limit <= 0 or limit >= n_total:
        return np.arange(n_total)
    return np.linspace(0, n_total, limit, endpoint=False).astype(np.int64)


def held_out_indices(n: int) -> np.ndarray:
    """Every (n // k)-th image, k = min(1000, n // 10): for 50,000 class-sorted images, 100 per class."""
    k = min(HELD_OUT, max(1, n // 10))
    stride = n // k
    return np.arange(stride - 1, n, stride)[:k]


# ---------------------------------------------------------------- models

def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG)


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def new_class_table() -> torch.nn.Parameter:
    """[11, T, D], N(0, 1) like nn.Embedding (and CLIP's layer-normed outputs); row 10 is the null class."""
    return torch.nn.Parameter(torch.randn(NUM_CLASSES + 1, CLASS_TOKENS, CLASS_WIDTH))


def make_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG)


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def round_to_fp16_(module) -> None:
    """Round weights to float16 values in place (kept fp32): later steps then see the shipped VAE."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_floating_point():
                t.copy_(t.half().float())


# ---------------------------------------------------------------- trainers (one optimizer step each)

def adamw(groups, lr, device):
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), **({"fused": True} if device.type == "cuda" else {}))


class VaeTrainer:
    """L1 + kl_weight * KL (both summed per image, divided by the pixel count), random flips."""

    def __init__(self, vae, images, train_idx, args, device, seed, bf16, channels_last=False):
        self.vae, self.args, self.device, self.bf16, self.channels_last = vae, args, device, bf16, channels_last
        self.images = images  # N x 3 x 32 x 32 uint8 on device
        self.train_idx = train_idx  # long tensor on device
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.params = list(vae.parameters())
        self.opt = adamw([{"params": self.params, "weight_decay": args.weight_decay}], args.vae_lr, device)

    def batch(self, bs):
        pick = torch.randint(0, self.train_idx.numel(), (bs,), device=self.device, generator=self.gen)
        x = self.images[self.train_idx[pick]].float().div_(127.5).sub_(1.0)
        flip = torch.rand(bs, device=self.device, generator=self.gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def step(self, bs):
        x = self.batch(bs)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            posterior = self.vae.encode(x).latent_dist
            rec = self.vae.decode(posterior.sample(generator=self.gen)).sample
        per_pixel = x[0].numel()
        rec_l1 = (rec.float() - x).abs().mean()
        mean, logvar = posterior.mean.float(), posterior.logvar.float()  # KL(q || N(0, I)) in fp32, not bf16
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1).mean() / per_pixel
        loss = rec_l1 + self.args.kl_weight * kl
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.args.grad_clip)
        self.opt.step()
        return torch.stack([loss.detach(), rec_l1.detach(), kl.detach()])


class UnetTrainer:
    """Epsilon prediction on pre-encoded latents; labels dropped to the null row with p = label_dropout."""

    def __init__(self, unet, table, moments, labels, scaling_factor, alphas_cumprod, args, device, seed, bf16,
                 channels_last=False):
        self.unet, self.table, self.args, self.device, self.bf16 = unet, table, args, device, bf16
        self.channels_last = channels_last
        self.mean, self.std = moments  # each [2 (unflipped, flipped), N, 4, 16, 16] on device
        self.labels = labels  # long [N] on device
        self.sf = scaling_factor
        self.ac = alphas_cumprod.to(device=device, dtype=torch.float32)
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.params = list(unet.parameters()) + [table]
        self.opt = adamw([{"params": list(unet.parameters()), "weight_decay": args.weight_decay},
                          {"params": [table], "weight_decay": 0.0}], args.unet_lr, device)

    def batch(self, bs):
        g, dev = self.gen, self.device
        idx = torch.randint(0, self.labels.numel(), (bs,), device=dev, generator=g)
        flip = (torch.rand(bs, device=dev, generator=g) < 0.5).long()
        eps0 = torch.randn((bs, *LATENT_SHAPE), device=dev, generator=g)
        z0 = (self.mean[flip, idx] + self.std[flip, idx] * eps0) * self.sf  # latent_dist.sample() * sf
        drop = torch.rand(bs, device=dev, generator=g) < self.args.label_dropout
        labels = torch.where(drop, torch.full_like(idx, NULL_CLASS), self.labels[idx])
        t = torch.randint(0, len(self.ac), (bs,), device=dev, generator=g)
        noise = torch.randn(z0.shape, device=dev, generator=g)
        a = self.ac[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1.0 - a).sqrt() * noise
        if self.channels_last:
            zt = zt.contiguous(memory_format=torch.channels_last)
        return zt, t, labels, noise

    def step(self, bs):
        zt, t, labels, noise = self.batch(bs)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            pred = self.unet(zt, t, encoder_hidden_states=self.table[labels]).sample
        loss = F.mse_loss(pred.float(), noise)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.args.grad_clip)
        self.opt.step()
        return loss.detach()[None]


# ---------------------------------------------------------------- budgets and the shared training loop

def seconds_per_step(step: Callable[[], object], device) -> float:
    """Mean wall time of one step after a warm-up (the train_reference calibration, +4% for EMA/logging)."""
    n_warm, n_cal = (15, 60) if device.type == "cuda" else (2, 3)
    for _ in range(n_warm):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    tc = time.time()
    for _ in range(n_cal):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.time() - tc) / n_cal * 1.04


def calibrate(name: str, mode: str, timed: bool, make_step: Callable[[bool], Callable[[], object]], device):
    """Pick the memory format ('auto' times both) and, if `timed`, measure seconds per step.

    Returns (channels_last, sec_per_step or None, {format: sec_per_step}).
    """
    formats = {"off": [False], "on": [True], "auto": [False, True]}[mode]
    if not timed and len(formats) == 1:
        return formats[0], None, {}
    timings = {}
    for cl in formats:
        fmt = "channels_last" if cl else "contiguous"
        try:
            timings[fmt] = seconds_per_step(make_step(cl), device)
            log(f"{name} calibration {fmt}: {timings[fmt] * 1000:.2f} ms/step")
        except RuntimeError as exc:  # a layer that refuses the format: keep the other one
            if len(formats) == 1:
                raise
            log(f"{name} calibration {fmt} failed ({type(exc).__name__}: {str(exc).splitlines()[0]}); skipped")
    if not timings:
        raise SystemExit(f"{name}: no memory format could be timed")
    best = min(timings, key=timings.get)
    return best == "channels_last", timings[best], timings


@dataclass
class PhaseBudget:
    """When a phase must stop: its own budget (from its start) and the whole script's guard."""
    phase_start: float
    phase_s: float  # inf = none
    script_deadline: float  # absolute time.time(); inf = none

    def remaining(self) -> float:
        now = time.time()
        return min(self.phase_start + self.phase_s - now, self.script_deadline - now)

    def steps_that_fit(self, sec_per_step: float) -> int:
        return max(100, int(0.95 * self.remaining() / sec_per_step) // 100 * 100)


@dataclass
class PhaseResult:
    steps_requested: int
    steps_done: int = 0
    stopped_early: bool = False
    train_wall_s: float = 0.0
    loss_curve: list = field(default_factory=list)


def train_phase(name, step, total_steps, sched, ema_params, model_params, args, budget: PhaseBudget,
                loss_names=("loss",)) -> PhaseResult:
    """The loop of train_reference: step, LR schedule, EMA (warmup decay), mean losses every --log-every."""
    res = PhaseResult(steps_requested=total_steps)
    acc, acc_n = None, 0
    t_train = time.time()

    def flush(step_i):
        el = time.time() - t_train
        means = (acc / acc_n).tolist()
        row = {"step": step_i, **{k: v for k, v in zip(loss_names, means)}, "lr": sched.get_last_lr()[0],
               "elapsed_s": round(el, 2)}
        res.loss_curve.append(row)
        parts = " ".join(f"{k} {v:.5g}" for k, v in zip(loss_names, means))
        log(f"{name} step {step_i}/{total_steps} {parts} lr {row['lr']:.2e} {step_i / el:.1f} it/s "
            f"elapsed {el:.1f}s")

    for i in range(1, total_steps + 1):
        losses = step()
        sched.step()
        if ema_params:
            decay = min(args.ema_decay, (1.0 + i) / (10.0 + i))
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, model_params, 1.0 - decay)
        acc = losses.clone() if acc is None else acc + losses
        acc_n += 1
        res.steps_done = i
        guard = budget.remaining() <= 0
        if i % args.log_every == 0 or i == total_steps or guard:
            flush(i)
            acc, acc_n = None, 0
        if guard:
            res.stopped_early = i < total_steps
            log(f"{name}: time budget reached, stopping after {i} of {total_steps} steps")
            break
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    res.train_wall_s = round(time.time() - t_train, 2)
    return res


# ---------------------------------------------------------------- VAE measurements

@torch.no_grad()
def encode_moments(vae, images, batch=500):
    """Posterior mean and std of every image and of its mirror image: two [2, N, 4, 16, 16] fp32 tensors."""
    means, stds = [], []
    for flipped in (False, True):
        m_parts, s_parts = [], []
        for s in range(0, images.shape[0], batch):
            x = images[s:s + batch].float().div_(127.5).sub_(1.0)
            dist = vae.encode(x.flip(-1) if flipped else x).latent_dist
            m_parts.append(dist.mean.float())
            s_parts.append(dist.std.float())
        means.append(torch.cat(m_parts))
        stds.append(torch.cat(s_parts))
    return torch.stack(means), torch.stack(stds)


@torch.no_grad()
def latent_statistics(mean, std, seed) -> dict:
    """scaling_factor = 1 / std of latent_dist.sample() over the unflipped images (SD's recipe)."""
    g = torch.Generator(device=mean.device).manual_seed(seed)
    z = mean[0] + std[0] * torch.randn(mean[0].shape, device=mean.device, generator=g)
    zc = z.transpose(0, 1).reshape(z.shape[1], -1)
    return {"scaling_factor": 1.0 / z.std().item(), "measured_on": "latent_dist.sample()",
            "n_images": int(z.shape[0]), "latent_std": z.std().item(), "latent_mean": z.mean().item(),
            "channel_mean": zc.mean(1).tolist(), "channel_std": zc.std(1).tolist(),
            "posterior_std_mean": std[0].mean().item()}


@torch.no_grad()
def fold_latent_normalization_(vae, channel_mean: torch.Tensor, channel_std: torch.Tensor) -> None:
    """Make the VAE's latents zero-mean, unit-std per channel, exactly, inside its own 1x1 convs.

    Why: GPU round 1 of issue 17 (docs/RESULTS.md section 25) trained on SD-style latents scaled by one
    global factor; their channel means were -1.07 .. +1.01 against channel stds of 0.33 .. 0.78, and the UNet's
    samples pulled every channel mean towards 0 (0.88 -> 0.66, -1.07 -> -0.60, 1.01 -> 0.68 at 20 steps), which
    decodes to a cyan cast (mean red 88 against the data's 124). Normalising per channel is what SDXL-style
    ``latents_mean / latents_std`` do, but StableDiffusionPipeline (and our engines) apply only
    ``scaling_factor``; folding the affine map into ``quant_conv`` (the posterior's mean and log-variance) and
    ``post_quant_conv`` keeps the decode rule unchanged: z' = (z - m) / s, so mean' = (mean - m) / s,
    logvar' = logvar - 2 log s, and post_quant_conv(z) = post_quant_conv'(z') with W' = W diag(s),
    b' = b + W m.
    """
    c = channel_mean.numel()
    m, s = channel_mean.to(vae.quant_conv.weight), channel_std.to(vae.quant_conv.weight)
    qw, qb = vae.quant_conv.weight, vae.quant_conv.bias  # [2c, 2c', 1, 1]: mean rows first, then logvar rows
    qw[:c] /= s[:, None, None, None]
    qb[:c] = (qb[:c] - m) / s
    qb[c:] -= 2.0 * torch.log(s)
    pw, pb = vae.post_quant_conv.weight, vae.post_quant_conv.bias  # [c_out, c, 1, 1]
    pb += pw[:, :, 0, 0] @ m
    pw *= s[None, :, None, None]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 as train_reference's grids do (round, clamp)."""
    return ((x.clamp(-1, 1) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


@torch.no_grad()
def reconstruction_psnr(vae, images, seed, batch=500) -> dict:
    """PSNR (dB, uint8 scale) of decode(encode) on held-back images, through the posterior mode and a sample."""
    g = torch.Generator(device=images.device).manual_seed(seed)
    out = {}
    for how in ("mode", "sample"):
        se, per_image = 0.0, []
        for s in range(0, images.shape[0], batch):
            x8 = images[s:s + batch]
            dist = vae.encode(x8.float().div(127.5).sub(1.0)).latent_dist
            z = dist.mode() if how == "mode" else dist.sample(generator=g)
            err = (to_uint8(vae.decode(z).sample.float()).float() - x8.float()) ** 2
            se += err.sum().item()
            per_image.append(err.flatten(1).mean(1))
        mse = se / images.numel()
        per_image = torch.cat(per_image).clamp_min(1e-10)
        out[f"psnr_{how}_db"] = 10 * math.log10(255.0 ** 2 / mse)
        out[f"psnr_{how}_mean_per_image_db"] = (10 * torch.log10(255.0 ** 2 / per_image)).mean().item()
    out["n_images"] = int(images.shape[0])
    return out


# ---------------------------------------------------------------- sampling (reusable)

@torch.no_grad()
def sample_latent(unet, vae, table, labels, steps, guidance_scale, seed, device, *, batch_size=250,
                  autocast_bf16=False) -> np.ndarray:
    """Class-conditional DDIM (eta 0) samples decoded through the VAE: uint8 [n, 32, 32, 3].

    Guidance as diffusers' StableDiffusionPipeline does it: the UNet runs on the batch [uncond (null row),
    cond] and eps = eps_u + w * (eps_c - eps_u); w == 1 runs only the conditional half (diffusers also
    skips guidance for w < 1; here w < 1 is applied as written, so w = 0 is the unconditional model).
    The initial noise [n, 4, 16, 16] comes in one draw from torch.Generator(device).manual_seed(seed),
    as the pipeline draws it, so images do not depend on batch_size beyond the float rounding of batched
    kernels (1 uint8 level seen). Decoding: vae.decode(latents / vae.config.scaling_factor), clamped.

    Args:
        unet, vae: diffusers UNet2DConditionModel and AutoencoderKL, on `device`.
        table: class-embedding table [11, T, D] (row 10 = null class).
        labels: n class indices (0..9, or 10 for unconditional samples).
        autocast_bf16: run the UNet under bf16 autocast (CUDA speed; default fp32).
    """
    device = torch.device(device)
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).to(device)
    table = torch.as_tensor(table).detach().to(device=device, dtype=torch.float32)
    scheduler = make_scheduler()
    scheduler.set_timesteps(steps, device=device)
    gen = torch.Generator(device).manual_seed(seed)
    latents = torch.randn((labels.numel(), *LATENT_SHAPE), generator=gen, device=device)
    latents = latents * scheduler.init_noise_sigma
    guided = guidance_scale != 1.0
    sf = vae.config.scaling_factor
    out = []
    for s in range(0, labels.numel(), batch_size):
        z = latents[s:s + batch_size]
        cond = table[labels[s:s + batch_size]]
        ehs = torch.cat([table[NULL_CLASS].expand_as(cond), cond]) if guided else cond
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(torch.cat([z, z]) if guided else z, t)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
                eps = unet(inp, t, encoder_hidden_states=ehs).sample.float()
            if guided:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + guidance_scale * (eps_c - eps_u)
            z = scheduler.step(eps, t, z, eta=0.0).prev_sample
        x = vae.decode(z / sf).sample.float()
        out.append(to_uint8(x).permute(0, 2, 3, 1).cpu())
    return torch.cat(out).numpy()


# ---------------------------------------------------------------- saving

def save_pipeline(out: Path, unet_state, vae, table, class_names, diffusers_version) -> None:
    """Diffusers pipeline layout; UNet and VAE in float16, the class table in float32."""
    from safetensors.torch import save_file

    unet = build_unet()
    unet.load_state_dict({k: v.detach().float().cpu() for k, v in unet_state.items()})
    unet.half().save_pretrained(out / "unet", safe_serialization=True)
    vae_cpu = build_vae()
    vae_cpu.load_state_dict({k: v.detach().float().cpu() for k, v in vae.state_dict().items()})
    vae_cpu.register_to_config(scaling_factor=vae.config.scaling_factor)
    vae_cpu.half().save_pretrained(out / "vae", safe_serialization=True)
    make_scheduler().save_pretrained(out / "scheduler")
    emb = out / "class_embeddings"
    emb.mkdir(parents=True, exist_ok=True)
    save_file({"embeddings": table.detach().float().cpu().contiguous()}, str(emb / "embeddings.safetensors"))
    (emb / "config.json").write_text(json.dumps(
        {"_class_name": "ClassEmbeddingTable", "num_classes": NUM_CLASSES, "null_class": NULL_CLASS,
         "tokens": CLASS_TOKENS, "width": CLASS_WIDTH, "class_names": class_names}, indent=2) + "\n")
    (out / "model_index.json").write_text(json.dumps(
        {"_class_name": "ClassConditionalLatentPipeline", "_diffusers_version": diffusers_version,
         "class_embeddings": ["pqcad_deploy", "ClassEmbeddingTable"],
         "scheduler": ["diffusers", "DDIMScheduler"],
         "unet": ["diffusers", "UNet2DConditionModel"],
         "vae": ["diffusers", "AutoencoderKL"]}, indent=2) + "\n")


FLOAT32_LOAD = {"torch_dtype": torch.float32, "low_cpu_mem_usage": False}  # no `accelerate` needed, no warning


def load_pipeline(folder: Path, device):
    """(unet, vae, table) from a saved folder, as float32, eval mode."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file

    unet = UNet2DConditionModel.from_pretrained(folder / "unet", **FLOAT32_LOAD).to(device).eval()
    vae = AutoencoderKL.from_pretrained(folder / "vae", **FLOAT32_LOAD).to(device).eval()
    table = load_file(str(folder / "class_embeddings" / "embeddings.safetensors"))["embeddings"].to(device)
    return unet, vae, table


def check_reload(folder: Path, unet_state, vae_state, table, scaling_factor) -> dict:
    """The reloaded float32 weights must equal the fp16-rounded trained ones exactly."""
    unet, vae, table_back = load_pipeline(folder, "cpu")
    problems = []
    for name, model, ref in (("unet", unet, unet_state), ("vae", vae, vae_state)):
        got = model.state_dict()
        for k, v in ref.items():
            want = v.detach().cpu().half().float()
            if got[k].dtype != torch.float32 or not torch.equal(got[k], want):
                problems.append(f"{name}.{k}")
    if not torch.equal(table_back, table.detach().float().cpu()):
        problems.append("class_embeddings")
    if vae.config.scaling_factor != scaling_factor:
        problems.append(f"vae scaling_factor {vae.config.scaling_factor} != {scaling_factor}")
    if problems:
        raise SystemExit(f"saved pipeline does not reload to the trained weights: {problems[:5]}")
    return {"reloaded_float32_equals_fp16_rounded": True, "unet_tensors": len(unet_state),
            "vae_tensors": len(vae_state)}


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------- main

def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible; use --device cpu or auto")
    return torch.device(choice)


def ema_copy(model_builder, model, channels_last):
    ema = model_builder().to(next(model.parameters()).device)
    ema.load_state_dict(model.state_dict())
    if channels_last:
        ema = ema.to(memory_format=torch.channels_last)
    return ema.eval().requires_grad_(False)


def main(argv=None):
    args = parse_args(argv)
    import diffusers

    device = resolve_device(args.device)
    bf16 = args.autocast == "bf16" or (args.autocast == "auto" and device.type == "cuda")
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    log(f"torch {torch.__version__}, diffusers {diffusers.__version__}, device {device} ({dev_name}), "
        f"autocast {'bf16' if bf16 else 'off'}")
    log(f"args: {json.dumps(vars(args))}")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    script_deadline = T0 + args.max_minutes * 60.0 - args.reserve_seconds if args.max_minutes > 0 else math.inf
    seeds = {"vae_init": args.seed, "vae_data": args.seed + 1, "unet_init": args.seed + 2,
             "unet_data": args.seed + 3, "scaling_factor": args.seed + 4, "psnr": args.seed + 5,
             "grid": args.seed}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # ---- data ----
    data_dir = Path(args.data_dir)
    images_all, data_info = read_cifar10_images(data_dir)
    labels_all, class_names = read_cifar10_labels(data_dir)
    if len(labels_all) != len(images_all):
        raise SystemExit(f"{len(labels_all)} labels for {len(images_all)} images in {data_dir}")
    keep = evenly_spread(len(images_all), args.limit_train)
    images_np, labels_np = images_all[keep], labels_all[keep]
    hold = held_out_indices(len(keep))
    vae_train = np.setdiff1d(np.arange(len(keep)), hold)
    log(f"train images: {images_np.shape}, per class {np.bincount(labels_np, minlength=NUM_CLASSES).tolist()}; "
        f"VAE held-out {len(hold)} (per class {np.bincount(labels_np[hold], minlength=NUM_CLASSES).tolist()})")
    images = torch.from_numpy(np.ascontiguousarray(images_np.transpose(0, 3, 1, 2))).to(device)
    labels = torch.from_numpy(labels_np).to(device)
    vae_train_idx = torch.from_numpy(vae_train).to(device)

    # ---- phase 1: VAE ----
    budget = PhaseBudget(time.time(), args.vae_minutes * 60 if args.vae_minutes > 0 else math.inf, script_deadline)
    vae_auto = str(args.vae_steps).lower() == "auto"

    def vae_step_fn(cl):
        torch.manual_seed(12345)
        tmp = build_vae().to(device).train()
        tmp = tmp.to(memory_format=torch.channels_last) if cl else tmp
        tr = VaeTrainer(tmp, images, vae_train_idx, args, device, 12345, bf16, cl)
        return lambda: tr.step(args.batch_size)

    vae_cl, vae_sec, vae_timings = calibrate("vae", args.channels_last, vae_auto, vae_step_fn, device)
    vae_steps = budget.steps_that_fit(vae_sec) if vae_auto else int(args.vae_steps)
    if vae_auto:
        log(f"vae calibration: {vae_sec * 1000:.2f} ms/step -> --vae-steps {vae_steps}")
    torch.manual_seed(seeds["vae_init"])
    vae = build_vae()
    vae_params = n_params(vae)
    log(f"AutoencoderKL parameters: {vae_params:,} ({vae_params / 1e6:.3f} M)")
    vae = vae.to(device).train()
    if vae_cl:
        vae = vae.to(memory_format=torch.channels_last)
    vt = VaeTrainer(vae, images, vae_train_idx, args, device, seeds["vae_data"], bf16, vae_cl)
    vsched = torch.optim.lr_scheduler.LambdaLR(vt.opt, lr_lambda_factory(args.vae_warmup, vae_steps))
    vae_res = train_phase("vae", partial(vt.step, args.batch_size), vae_steps, vsched, [], [], args, budget,
                          loss_names=("loss", "rec_l1", "kl_per_pixel"))
    del vt, vsched

    # ---- shipped VAE: fp16-rounded weights, scaling factor, PSNR, latent moments ----
    ts = time.time()
    vae = vae.to(memory_format=torch.contiguous_format).eval().requires_grad_(False)
    normalization = None
    if args.normalize_latents:
        raw = latent_statistics(*encode_moments(vae, images), seeds["scaling_factor"])
        fold_latent_normalization_(vae, torch.tensor(raw["channel_mean"]), torch.tensor(raw["channel_std"]))
        normalization = {"folded_channel_mean": raw["channel_mean"], "folded_channel_std": raw["channel_std"]}
        log(f"latent normalisation folded into quant_conv / post_quant_conv: channel means "
            f"{[round(v, 3) for v in raw['channel_mean']]}, stds {[round(v, 3) for v in raw['channel_std']]}")
    round_to_fp16_(vae)
    moments = encode_moments(vae, images)
    lat = latent_statistics(*moments, seeds["scaling_factor"])  # over every image the UNet trains on
    if lat["n_images"] < 5000:
        log(f"warning: scaling factor measured on only {lat['n_images']} images (--limit-train)")
    vae.register_to_config(scaling_factor=lat["scaling_factor"])
    psnr = reconstruction_psnr(vae, images[torch.from_numpy(hold).to(device)], seeds["psnr"])
    vae_post_s = round(time.time() - ts, 2)
    log(f"VAE held-out PSNR {psnr['psnr_mode_db']:.2f} dB (mode), {psnr['psnr_sample_db']:.2f} dB (sample) on "
        f"{psnr['n_images']} images; scaling_factor {lat['scaling_factor']:.5f} (latent std {lat['latent_std']:.4f} "
        f"over {lat['n_images']} images); pre-encoded {images.shape[0]} x 2 images in {vae_post_s}s")

    # ---- phase 2: class-conditional UNet + class table ----
    budget = PhaseBudget(time.time(), args.unet_minutes * 60 if args.unet_minutes > 0 else math.inf,
                         script_deadline)
    unet_auto = str(args.unet_steps).lower() == "auto"
    alphas_cumprod = make_scheduler().alphas_cumprod.clone()
    sf = lat["scaling_factor"]

    def unet_step_fn(cl):
        torch.manual_seed(12345)
        tmp = build_unet().to(device).train()
        tmp = tmp.to(memory_format=torch.channels_last) if cl else tmp
        tmp_table = torch.nn.Parameter(new_class_table().to(device))
        tr = UnetTrainer(tmp, tmp_table, moments, labels, sf, alphas_cumprod, args, device, 12345, bf16, cl)
        return lambda: tr.step(args.batch_size)

    unet_cl, unet_sec, unet_timings = calibrate("unet", args.channels_last, unet_auto, unet_step_fn, device)
    unet_steps = budget.steps_that_fit(unet_sec) if unet_auto else int(args.unet_steps)
    if unet_auto:
        log(f"unet calibration: {unet_sec * 1000:.2f} ms/step -> --unet-steps {unet_steps}")
    torch.manual_seed(seeds["unet_init"])
    unet = build_unet()
    table = new_class_table()
    unet_params = n_params(unet)
    log(f"UNet2DConditionModel parameters: {unet_params:,} ({unet_params / 1e6:.3f} M) + class table "
        f"{table.numel():,} ({tuple(table.shape)})")
    unet = unet.to(device).train()
    table = torch.nn.Parameter(table.detach().to(device))
    if unet_cl:
        unet = unet.to(memory_format=torch.channels_last)
    ema_unet = ema_copy(build_unet, unet, unet_cl)
    ema_table = table.detach().clone()
    ut = UnetTrainer(unet, table, moments, labels, sf, alphas_cumprod, args, device, seeds["unet_data"], bf16,
                     unet_cl)
    usched = torch.optim.lr_scheduler.LambdaLR(ut.opt, lr_lambda_factory(args.unet_warmup, unet_steps))
    unet_res = train_phase("unet", partial(ut.step, args.batch_size), unet_steps, usched,
                           list(ema_unet.parameters()) + [ema_table], list(unet.parameters()) + [table], args,
                           budget)
    del ut, usched

    # ---- save, reload check, grid from the saved folder ----
    ts = time.time()
    ema_state = {k: v.detach().float().cpu() for k, v in ema_unet.state_dict().items()}
    vae_state = {k: v.detach().float().cpu() for k, v in vae.state_dict().items()}
    save_pipeline(out, ema_state, vae, ema_table, class_names, diffusers.__version__)
    reload = check_reload(out, ema_state, vae_state, ema_table, lat["scaling_factor"])
    log(f"saved and reloaded {out}: float32 weights equal the fp16-rounded EMA UNet / VAE exactly")
    s_unet, s_vae, s_table = load_pipeline(out, device)
    grid_labels = np.repeat(np.arange(NUM_CLASSES), 8)
    grid = sample_latent(s_unet, s_vae, s_table, grid_labels, args.sample_steps, args.guidance_scale, seeds["grid"],
                         device)
    save_grid_rgb(torch.from_numpy(grid).permute(0, 3, 1, 2).float() / 127.5 - 1.0, out / "sample_grid.png")
    save_wall = round(time.time() - ts, 2)
    log(f"sample grid (10 classes x 8, DDIM-{args.sample_steps}, guidance {args.guidance_scale}) and save in "
        f"{save_wall}s")

    def phase_log(res: PhaseResult, sec, timings, cl, cfg, params, lr, warmup):
        return {"steps_requested": res.steps_requested, "steps_done": res.steps_done,
                "stopped_early_by_time_budget": res.stopped_early,
                "steps_auto_calibration": {"sec_per_step": sec, "memory_format_sec_per_step": timings} if sec else None,
                "channels_last": cl, "train_wall_s": res.train_wall_s, "images_seen": res.steps_done * args.batch_size,
                "final_loss": res.loss_curve[-1]["loss"] if res.loss_curve else None, "loss_curve": res.loss_curve,
                "config": cfg, "parameters": params, "lr": lr, "warmup": warmup}

    train_log = {
        "script": "scripts/train_latent_reference.py",
        "argv": sys.argv[1:] if argv is None else list(argv),
        "args": vars(args),
        "seeds": seeds,
        "vae": {**phase_log(vae_res, vae_sec, vae_timings, vae_cl, VAE_CONFIG, vae_params, args.vae_lr,
                            args.vae_warmup),
                "loss": f"mean |x - x_rec| + kl_weight * KL / {3 * 32 * 32} (KL summed per image), x in [-1, 1]",
                "kl_weight": args.kl_weight, "held_out_psnr": psnr, "latents": lat, "normalization": normalization,
                "post_training_s": vae_post_s, "weights": "fp16-rounded before the scaling factor, PSNR and "
                                                          "the UNet's latents were computed (= the shipped VAE)"},
        "unet": {**phase_log(unet_res, unet_sec, unet_timings, unet_cl, UNET_CONFIG, unet_params, args.unet_lr,
                             args.unet_warmup),
                 "class_table": {"shape": list(ema_table.shape), "null_class": NULL_CLASS,
                                 "label_dropout": args.label_dropout, "init": "N(0, 1)", "weight_decay": 0.0},
                 "latents": "pre-encoded once (posterior mean, std of each image and its mirror image); "
                            "z = (mean + std * randn) * scaling_factor per step",
                 "ema_decay": args.ema_decay, "weights_saved": "EMA (UNet and class table)"},
        "scheduler": SCHEDULER_CONFIG,
        "grid": {"labels": "10 rows = classes 0..9, 8 each", "steps": args.sample_steps, "eta": 0.0,
                 "guidance_scale": args.guidance_scale, "seed": seeds["grid"], "from": "the saved folder, fp32"},
        "saved": {"unet_vae_dtype": "float16", "class_table_dtype": "float32", **reload},
        "precision": "bf16 autocast" if bf16 else "fp32",
        "device": str(device), "device_name": dev_name,
        "torch_version": torch.__version__, "cuda_version": torch.version.cuda,
        "diffusers_version": diffusers.__version__, "python_version": platform.python_version(),
        "data": {"dataset": "CIFAR-10 train (train_jpg.npz: JPEG bytes, Pillow-decoded) with its labels",
                 "n_images": int(images_np.shape[0]), "vae_held_out": int(len(hold)),
                 "preprocess": "uint8/127.5-1, 32x32 RGB, random horizontal flip", **data_info},
        "save_and_grid_s": save_wall,
    }
    (out / "train_log.json").write_text(json.dumps(train_log, indent=1))
    train_log["total_wall_s"] = round(time.time() - T0, 2)
    train_log["folder_bytes"] = folder_size(out)
    (out / "train_log.json").write_text(json.dumps(train_log, indent=1))
    log(f"done: vae {vae_res.steps_done} steps, unet {unet_res.steps_done} steps (final loss "
        f"{train_log['unet']['final_loss']}), folder {train_log['folder_bytes'] / 1e6:.2f} MB "
        f"({train_log['folder_bytes']:,} bytes), total {train_log['total_wall_s']}s")


if __name__ == "__main__":
    main()
