"""Generate evaluation samples through diffusers' DDIMPipeline (eta 0), with per-image seeds.

Image i always starts from the noise of `torch.Generator("cpu").manual_seed(seed + i)`, whatever the
batch size or device, so every method compared (FP, fake-quant students) sees the same initial noise
for the same image index. The UNet may be the FP model or a fake-quant student: both are
UNet2DModels to the pipeline.

A conditional or latent model (pqcad_deploy.conditioning) is sampled by the same DDIM loop written out,
since DDIMPipeline passes no class labels and decodes no latents: the same per-image noise (diffusers' ``randn_tensor`` draws
image i from its own generator), DDIMScheduler.step with eta 0, the same output conversion, with image
i conditioned on class ``i % classes`` and guided as diffusers' pipelines guide.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from pqcad_deploy.conditioning import UNCONDITIONAL, Conditioning, guided_eps

__all__ = ["Decode", "GeneratedImages", "generate_images"]

Decode = Callable[[torch.Tensor], torch.Tensor]
"""A latent model's final latents -> images in [-1, 1] (pqcad_deploy.models.LoadedModel.decode)."""


@dataclass(frozen=True)
class GeneratedImages:
    images: np.ndarray  # uint8 [N, H, W, C]
    seconds: float
    steps: int

    @property
    def images_per_second(self) -> float:
        return len(self.images) / max(self.seconds, 1e-9)


@torch.no_grad()
def generate_images(unet: torch.nn.Module, scheduler_config: dict, n: int, steps: int, seed: int = 0,
                    batch_size: int = 500, device: str = "cpu", progress: bool = True,
                    conditioning: Conditioning = UNCONDITIONAL,
                    decode: Decode | None = None) -> GeneratedImages:
    """`n` uint8 images from DDIM with `steps` steps; image i is seeded with `seed + i` (and, for a
    conditional model, conditioned on its class ``i % classes``). `decode` maps a latent model's final
    latents to images in [-1, 1] (LoadedModel.decode: the VAE), as StableDiffusionPipeline does."""
    from diffusers import DDIMPipeline, DDIMScheduler

    if conditioning is not UNCONDITIONAL or decode is not None:
        return _generate_conditional(unet, scheduler_config, n, steps, seed, batch_size, device, progress,
                                     conditioning, decode)
    scheduler = DDIMScheduler.from_config(scheduler_config)
    pipe = DDIMPipeline(unet=unet.to(device).eval(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    out = []
    started = time.perf_counter()
    for start in tqdm(range(0, n, batch_size), desc=f"DDIM-{steps}", unit="batch", disable=not progress):
        count = min(batch_size, n - start)
        generators = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(count)]
        images = pipe(batch_size=count, generator=generators, num_inference_steps=steps, eta=0.0,
                      output_type="np").images  # float [0, 1], NHWC
        out.append(np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8))
    if device == "cuda":
        torch.cuda.synchronize()
    return GeneratedImages(images=np.concatenate(out), seconds=time.perf_counter() - started, steps=steps)


@torch.no_grad()
def _generate_conditional(unet: torch.nn.Module, scheduler_config: dict, n: int, steps: int, seed: int,
                          batch_size: int, device: str, progress: bool, conditioning: Conditioning,
                          decode: Decode | None) -> GeneratedImages:
    """DDIMPipeline's loop with the conditioning passed and guided (module docstring)."""
    from diffusers import DDIMScheduler

    unet = unet.to(device).eval()
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    size = unet.config.sample_size
    shape = (int(unet.config.in_channels), *((size, size) if isinstance(size, int) else size))
    out = []
    started = time.perf_counter()
    for start in tqdm(range(0, n, batch_size), desc=f"DDIM-{steps}", unit="batch", disable=not progress):
        count = min(batch_size, n - start)
        x = torch.cat([torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(seed + start + i))
                       for i in range(count)]).to(device)
        cond = conditioning.draw(torch.arange(start, start + count))
        for t in scheduler.timesteps:
            t_batch = torch.full((count,), int(t), device=device, dtype=torch.long)
            x = scheduler.step(guided_eps(unet, x, t_batch, cond, conditioning), t, x, eta=0.0).prev_sample
        if decode is not None:
            x = decode(x)
        images = (x / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
        out.append(np.round(images * 255.0).astype(np.uint8))
    if device == "cuda":
        torch.cuda.synchronize()
    return GeneratedImages(images=np.concatenate(out), seconds=time.perf_counter() - started, steps=steps)
