"""The BRECQ baseline: block reconstruction at fixed bits (no bit ladder), weights first.

1. Weights: per-channel scales from an MSE search (or min-max), then block-wise reconstruction in
   execution order with AdaRound rounding and LSQ-learned scales, activations off; hardened.
2. Activations: per-tensor min-max scales observed on the calibration set with the quantized weights,
   then (``act_iters > 0``) learned by the same block reconstruction with the weights frozen.

The ablation against PQ: same quantizers and reconstruction, but the target bits from the start.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import TYPE_CHECKING, Callable

import torch

from pqcad_deploy.calibration.trajectories import CalibrationSet
from pqcad_deploy.choices import ACT_SCALE_INITS
from pqcad_deploy.methods.minmax import calibrate_activations_minmax
from pqcad_deploy.methods.registry import MethodJob
from pqcad_deploy.quant import primitives as P
from pqcad_deploy.quant.replace import LayerBits, quant_layers, swap_in_quant_layers
from pqcad_deploy.reconstruct import (
    OnIteration, ReconstructionConfig, first_pair_blocks, init_weight_scales, reconstruct_model,
)

if TYPE_CHECKING:
    from pqcad_deploy.checkpoint import Checkpoint, ResumePoint

__all__ = ["brecq_quantize", "calibrate_activations", "weights_first_student", "activation_stage",
           "ACT_SCALE_INITS"]

_SAMPLES_PER_BATCH = 4096


@torch.no_grad()
def calibrate_activations(student: torch.nn.Module, calibration: CalibrationSet, batch_size: int,
                          init: str = "minmax", device: str = "cpu", progress: bool = True,
                          seed: int = 0) -> None:
    """Per-tensor activation scales of every input quantizer, with the current (quantized) weights.

    minmax: max|x| / qmax. percentile: the 99.99th percentile of |x|. mse: the clipping of max|x|
    that minimises the quantization MSE. The last two work on a fixed random subsample of each
    layer's inputs (4,096 values per batch) plus the exact max; every quantizer is left enabled.
    """
    if init not in ACT_SCALE_INITS:
        from pqcad_deploy.errors import ConfigError

        raise ConfigError(f"activation scale init must be one of {', '.join(ACT_SCALE_INITS)}; got {init!r}.")
    if init == "minmax":
        calibrate_activations_minmax(student, calibration, batch_size, device, progress)
        return
    layers = {n: layer for n, layer in quant_layers(student).items() if layer.input_quantizer.quantizes}
    generator = torch.Generator().manual_seed(seed)
    samples: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    hooks = []
    for name, layer in layers.items():
        def hook(module, inputs, name=name):
            flat = inputs[0].detach().flatten().cpu()
            index = torch.randint(0, flat.numel(), (min(_SAMPLES_PER_BATCH, flat.numel()),), generator=generator)
            samples[name].append(flat[index])
        hooks.append(layer.register_forward_pre_hook(hook))
    try:  # one pass: the min-max observation (exact max, scales as a start) plus the subsamples
        calibrate_activations_minmax(student, calibration, batch_size, device, progress)
    finally:
        for h in hooks:
            h.remove()
    for name, layer in layers.items():
        quantizer = layer.input_quantizer
        amax = float(quantizer.observed_amax) or 1.0
        values = torch.cat(samples[name])
        if init == "percentile":
            scale = P.percentile_activation_scale(values, quantizer.bits)
        else:
            scale = P.mse_activation_scale(values, amax, quantizer.bits)
        quantizer.set_scale(scale.to(quantizer.scale.device))


def weights_first_student(fp_unet: torch.nn.Module, plan: dict[str, LayerBits], weight_scale_init: str,
                          device: str) -> torch.nn.Module:
    """A fake-quant copy of `fp_unet` with `plan`'s layers, weight scales initialised and every input
    quantizer off: the start of the weights-first flow shared by brecq and PQ."""
    fp_unet.eval()
    student = copy.deepcopy(fp_unet).to(device).eval()
    swap_in_quant_layers(student, plan)
    layers = quant_layers(student)
    for layer in layers.values():
        layer.input_quantizer.enabled = False
    init_weight_scales(layers, weight_scale_init)
    return student


def activation_stage(fp_unet: torch.nn.Module, student: torch.nn.Module, calibration: CalibrationSet,
                     config: ReconstructionConfig, act_scale_init: str, capture_batch_size: int, device: str,
                     progress: bool, resume: ResumePoint | None, on_block: Callable,
                     on_iteration: OnIteration | None = None) -> None:
    """Stage 2 of brecq and PQ: initialise the activation scales, then learn them block by block.

    When resuming inside this stage the scales come from the checkpoint and are not re-initialised.
    """
    if resume is None or resume.stage == "weights":
        calibrate_activations(student, calibration, capture_batch_size, init=act_scale_init, device=device,
                              progress=progress, seed=config.seed)
    if config.act_iters > 0:
        reconstruct_model(
            fp_unet, student, calibration, config, stage="activations",
            capture_batch_size=capture_batch_size, device=device, progress=progress,
            on_iteration=on_iteration, on_block=on_block,
            start=resume.blocks_done_in("activations") if resume is not None else 0)


def run(job: MethodJob) -> tuple[torch.nn.Module, dict]:
    """The registry's entry point (methods.registry)."""
    return brecq_quantize(job.fp_unet, job.plan, job.calibration, job.reconstruction_config(), job.device,
                          job.progress, capture_batch_size=job.batch_size, checkpoint=job.checkpoint,
                          act_scale_init=job.config.activation_scale_init)


def brecq_quantize(
    fp_unet: torch.nn.Module,
    plan: dict[str, LayerBits],
    calibration: CalibrationSet,
    config: ReconstructionConfig,
    device: str = "cpu",
    progress: bool = True,
    capture_batch_size: int = 32,
    on_iteration: OnIteration | None = None,
    checkpoint: Checkpoint | None = None,
    act_scale_init: str = "minmax",
) -> tuple[torch.nn.Module, dict]:
    """Return a fake-quant copy of `fp_unet` reconstructed block by block, and its report.

    Args:
        fp_unet: the FP UNet (eval mode; not modified).
        plan: per-layer bits (fixed for the whole run).
        calibration: the C_QC inputs.
        config: reconstruction settings (``act_iters=0``: min-max activation scales only).
        capture_batch_size: batch of the forward passes that capture block inputs and outputs.
        on_iteration: see :func:`pqcad_deploy.reconstruct.reconstruct_block`.
        checkpoint: saved after every finished block; when it holds a loaded resume point, the run
            continues from there (:mod:`pqcad_deploy.checkpoint`).

    Returns:
        (student, report) with report = {"reconstruction": {"config", "weights": [per block],
        "activations": [per block], "seconds": {...}}}; every latent weight equals codes * scale.
    """
    started = time.perf_counter()
    student = weights_first_student(fp_unet, plan, config.weight_scale_init, device)

    resume = checkpoint.restore(student) if checkpoint is not None else None
    entries = resume.entries if resume is not None else {}
    started -= resume.seconds if resume is not None else 0.0
    weight_results: list[dict] = list(entries.get("weights", []))  # one entry per finished block
    act_results: list[dict] = list(entries.get("activations", []))
    t_weights = entries.get("seconds_weights")
    n_blocks = len(first_pair_blocks(student, calibration, device))

    def finished(results: list[dict], stage: str):
        def on_block(result) -> None:
            results.append(result.to_dict())
            if checkpoint is not None:
                checkpoint.save(student, stage, len(results), n_blocks,
                                {"weights": weight_results, "activations": act_results, "seconds_weights": t_weights},
                                seconds=time.perf_counter() - started)
        return on_block

    reconstruct_model(
        fp_unet, student, calibration, config, stage="weights", capture_batch_size=capture_batch_size,
        device=device, progress=progress, on_iteration=on_iteration, on_block=finished(weight_results, "weights"),
        start=resume.blocks_done_in("weights") if resume is not None else 0)
    if t_weights is None:
        t_weights = time.perf_counter() - started

    activation_stage(fp_unet, student, calibration, config, act_scale_init, capture_batch_size, device, progress,
                     resume, finished(act_results, "activations"), on_iteration)
    report = {"reconstruction": {
        "config": dataclasses.asdict(config),
        "weights": weight_results,
        "activations": act_results,
        "seconds": {"weights": t_weights, "total": time.perf_counter() - started},
    }}
    return student, report
