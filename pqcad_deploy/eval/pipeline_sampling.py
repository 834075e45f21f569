"""Generate evaluation samples through diffusers' DDIMPipeline (eta 0), with per-image seeds.

Image i always starts from the noise of `torch.Generator("cpu").manual_seed(seed + i)`, whatever the
batch size or device, so every method compared (FP, fake-quant students) sees the same initial noise
for the same image index. The UNet may be the FP model or a fake-quant student: both are
UNet2DModels to the pipeline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = ["GeneratedImages", "generate_images"]


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
                    batch_size: int = 500, device: str = "cpu", progress: bool = True) -> GeneratedImages:
    """`n` uint8 images from DDIM with `steps` steps; image i is seeded with `seed + i`."""
    from diffusers import DDIMPipeline, DDIMScheduler

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
