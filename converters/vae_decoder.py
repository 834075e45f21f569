"""A latent pipeline's VAE decoder as ONNX: the sampler's final latents -> images in [-1, 1].

A latent sampler ends with latents in the UNet's space; StableDiffusionPipeline turns them into pixels
with ``vae.decode(latents / vae.config.scaling_factor).sample`` and then clamps ``image / 2 + 0.5`` to
[0, 1]. The graph written here does the division and the decode and clamps to [-1, 1], so the engine
feeds it the sampler's latents unchanged and only maps [-1, 1] to bytes (engines.images).

Two precisions. fp32 is the reference. fp16 (issue 17 asks for an FP16 VAE decoder: it is the largest
graph of an SD-1.5 sampler after the UNet, and at 512 px the slowest step on a Jetson after the UNet's)
is the fp32 trace rewritten by converters.tensorrt.to_float16, the same rewrite the tensorrt target
uses: every weight and intermediate in FP16, the `latents` input and `images` output still float32
with Casts at the boundary, so the engines feed it exactly as they feed the fp32 one. Some VAEs
overflow FP16 (SDXL's, which diffusers upcasts through `force_upcast`; SD 1.5's is known to run in
FP16); vae_decoder_parity reports nan/inf outputs as a failure, so such a VAE is caught there.

Parity (vae_decoder_parity): ONNX Runtime on the CPU against diffusers in float32 on the same seeded
latents, as the relative L2 error of the images, within VAE_PARITY_TOLERANCES.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch
from torch import nn

from pqcad_deploy.engines.parts import VAE_DECODER_IO
from pqcad_deploy.converters.pipeline_parts import (PART_OPSET, PartParity, export_part, part_parity,
                                                    read_part_metadata, rename_tensor)
from pqcad_deploy.errors import ExportError
from pqcad_deploy.latent_parts import load_vae  # re-exported: compress decodes with the same loader

__all__ = ["LATENTS_INPUT", "IMAGES_OUTPUT", "VAE_DECODER_KIND", "VAE_DECODER_PRECISIONS", "VAE_PARITY_TOLERANCES",
           "VaeDecoderExport", "VaeDecoderPrecision", "export_vae_decoder", "load_vae", "vae_decoder_parity"]

VAE_DECODER_KIND = "vae_decoder"
"""The part's `kind` in the ONNX metadata (converters.pipeline_parts.PART_METADATA_KEY)."""
LATENTS_INPUT, IMAGES_OUTPUT = VAE_DECODER_IO  # the names the engines feed and read
VaeDecoderPrecision = Literal["fp32", "fp16"]
VAE_DECODER_PRECISIONS: tuple[str, ...] = get_args(VaeDecoderPrecision)
VAE_PARITY_TOLERANCES: dict[str, float] = {"fp32": 1e-5, "fp16": 1e-2}
"""Relative L2 of the ONNX images against diffusers' on the same latents. Measured on the SD-1.5-shaped
test pipeline (tests/_pipelines.py, seeds 0-9, batch 3): fp32 at most 2.1e-6 (float reassociation in
ONNX Runtime's kernels), fp16 at most 1.3e-3 (FP16's 2^-11 rounding through 35 convolutions); each
tolerance leaves a margin of 5x to 8x, while an export bug (a wrong scaling factor, a dropped layer)
moves the images by tens of percent."""
_TRACE_INPUT = "sample"  # the input name converters.tensorrt.to_float16 expects; renamed to LATENTS_INPUT


@dataclass(frozen=True)
class VaeDecoderExport:
    """What export_vae_decoder wrote."""

    path: Path
    precision: str
    opset: int
    scaling_factor: float
    latent_channels: int
    downsampling: int  # image side / latent side (8 for SD)
    latent_size: int  # the latents' side the graph takes (its spatial axes are fixed; the batch axis is not)
    size_bytes: int


class _VaeDecoderForExport(nn.Module):
    """latents -> vae.decode(latents / scaling_factor).sample, clamped to [-1, 1]."""

    def __init__(self, vae: nn.Module, scaling_factor: float) -> None:
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(scaling_factor)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scaling_factor).sample.clamp(-1.0, 1.0)


def _precision_check(precision: str) -> None:
    if precision not in VAE_DECODER_PRECISIONS:
        raise ExportError(f"the VAE decoder precision must be one of {', '.join(VAE_DECODER_PRECISIONS)}; "
                          f"got {precision!r}.")


def _fp16_then_rename(model) -> None:
    from pqcad_deploy.converters.tensorrt import to_float16

    to_float16(model)
    rename_tensor(model, _TRACE_INPUT, LATENTS_INPUT)


def _rename_only(model) -> None:
    rename_tensor(model, _TRACE_INPUT, LATENTS_INPUT)


def _default_latent_size(vae) -> int:
    """The VAE's image side (its config's sample_size, an int or [h, w]) over its downsampling."""
    size = vae.config.sample_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    return max(int(size) // 2 ** (len(vae.config.block_out_channels) - 1), 1)


def export_vae_decoder(pipeline_dir: Path | str, out_path: Path | str, *, precision: str = "fp32",
                       latent_size: int | None = None, overwrite: bool = False) -> VaeDecoderExport:
    """Write the decoder of `pipeline_dir`/vae as ONNX: `latents` [batch, C, h, w] -> `images` [batch, 3, H, W].

    Args:
        precision: "fp32", or "fp16" (FP16 weights and compute, float32 input and output; module doc).
        latent_size: h = w of the latents, fixed in the graph like the UNet's image shape; default the
            VAE's sample_size / downsampling (64 for SD 1.5: 512 px). Pass the UNet's sample_size where
            the two configs disagree: the latents are the UNet's.
        overwrite: replace an existing VAE decoder ONNX written by pqcad-deploy (nothing else).

    Raises:
        ModelLoadError: see load_vae. ExportError: an unknown precision, or a graph onnx.checker rejects.
        OutputPathError: `out_path` cannot be written (converters.pipeline_parts.export_part).
    """
    _precision_check(precision)
    if latent_size is not None and (not isinstance(latent_size, int) or isinstance(latent_size, bool)
                                    or latent_size < 1):
        raise ExportError(f"latent_size must be a positive integer; got {latent_size!r}.")
    vae, config = load_vae(pipeline_dir)
    scaling_factor = float(config["scaling_factor"])
    channels = int(vae.config.latent_channels)
    downsampling = 2 ** (len(vae.config.block_out_channels) - 1)
    side = _default_latent_size(vae) if latent_size is None else latent_size
    example = (torch.zeros(2, channels, side, side),)  # batch 2: nothing batch-1-specific is traced
    metadata = {"kind": VAE_DECODER_KIND, "precision": precision, "scaling_factor": scaling_factor,
                "latent_channels": channels, "downsampling": downsampling}
    path = export_part(_VaeDecoderForExport(vae, scaling_factor), example, out_path,
                       input_names=[_TRACE_INPUT], output_names=[IMAGES_OUTPUT], metadata=metadata,
                       overwrite=overwrite, rewrite=_fp16_then_rename if precision == "fp16" else _rename_only)
    return VaeDecoderExport(path=path, precision=precision, opset=PART_OPSET, scaling_factor=scaling_factor,
                            latent_channels=channels, downsampling=downsampling, latent_size=side,
                            size_bytes=path.stat().st_size)


def _graph_latent_size(onnx_path: Path | str) -> int:
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    latents = next(v for v in graph.input if v.name == LATENTS_INPUT)
    return int(latents.type.tensor_type.shape.dim[-1].dim_value)


def vae_decoder_parity(pipeline_dir: Path | str, onnx_path: Path | str, *, batch: int = 2, seed: int = 0,
                       tolerance: float | None = None) -> PartParity:
    """ONNX Runtime (CPU) against ``vae.decode(latents / scaling_factor).sample.clamp(-1, 1)`` in float32.

    Args:
        batch, seed: the latents are `batch` standard-normal draws of numpy's default_rng(seed), the
            scale a DDIM sampler's final latents have, at the side the graph takes.
        tolerance: default VAE_PARITY_TOLERANCES of the precision the file records.

    Returns:
        The PartParity (its `passed` says whether the relative L2 is within the tolerance).
    """
    from pqcad_deploy.engines.ort_session import ort_session

    meta = read_part_metadata(onnx_path)
    if meta.get("kind") != VAE_DECODER_KIND:
        raise ExportError(f"{onnx_path} is not a VAE decoder ONNX written by pqcad-deploy (its metadata: {meta}).")
    precision = meta["precision"]
    vae, config = load_vae(pipeline_dir)
    scaling_factor = float(config["scaling_factor"])
    side = _graph_latent_size(onnx_path)
    latents = np.random.default_rng(seed).standard_normal(
        (batch, int(vae.config.latent_channels), side, side)).astype(np.float32)
    with torch.no_grad():
        reference = vae.decode(torch.from_numpy(latents) / scaling_factor).sample.clamp(-1.0, 1.0).numpy()
    images = ort_session(onnx_path).run([IMAGES_OUTPUT], {LATENTS_INPUT: latents})[0]
    return part_parity(VAE_DECODER_KIND, precision, images, reference,
                       VAE_PARITY_TOLERANCES[precision] if tolerance is None else tolerance)
