"""One latent engine's images against PyTorch's on the same noise, at a guidance scale (issue 17's headline check).

The engine side is what `sample` runs (its UNet, its text encoder or class table, its VAE decoder; no torch); the
PyTorch side is pqcad_deploy.eval.pipeline_sampling.generate_images with the artifact's conditioning at that scale
and the pipeline's VAE. Image i's noise is generate_images': torch.Generator().manual_seed(seed + i).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch


class EngineAgainstTorch:
    """A built ONNX Runtime engine (opened once) and the PyTorch model it was exported from."""

    def __init__(self, engine_dir: Path, unet, scheduler_config: dict, steps: int, conditioning, decode) -> None:
        from pqcad_deploy.engines.generate import open_runner
        from pqcad_deploy.engines.latent_parts import EngineParts

        self.runner, self.engine = open_runner(engine_dir, threads=1)
        self.parts = EngineParts(engine_dir, self.engine, threads=1)
        self.unet, self.scheduler_config, self.steps = unet, scheduler_config, steps
        self.conditioning, self.decode = conditioning, decode

    def images(self, n: int, seed: int, latent_shape: tuple[int, ...], scale: float, batch_size: int,
               **prompts) -> tuple[np.ndarray, np.ndarray]:
        """(engine's, PyTorch's) uint8 NHWC images of noise seeds seed .. seed + n - 1, guided at `scale`."""
        from pqcad_deploy.engines.conditioning import sample_conditions
        from pqcad_deploy.engines.images import nchw_to_nhwc, to_uint8
        from pqcad_deploy.engines.sampler import decode_latents, denoise, sampling_timesteps
        from pqcad_deploy.eval.pipeline_sampling import generate_images

        noise = torch.cat([torch.randn((1, *latent_shape), generator=torch.Generator("cpu").manual_seed(seed + i))
                           for i in range(n)]).numpy()
        guided = dataclasses.replace(self.conditioning, guidance_scale=scale)
        theirs = generate_images(self.unet, self.scheduler_config, n, self.steps, seed=seed, batch_size=n,
                                 progress=False, conditioning=guided, decode=self.decode).images
        conditions = sample_conditions(self.engine.onnx.conditioning, parts=self.parts, guidance_scale=scale,
                                       **prompts)
        x, _ = denoise(self.runner, self.engine.onnx, noise, sampling_timesteps(self.engine.onnx),
                       batch_size=batch_size, progress=False, conditions=conditions)
        return nchw_to_nhwc(to_uint8(decode_latents(self.parts.decoder(), x))), theirs
