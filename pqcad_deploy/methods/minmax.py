"""The min-max baseline: fixed-bit symmetric post-training quantization.

Weights: one scale per output channel, max|w| / qmax. Activations: one scale per tensor, the largest
|input| seen over the calibration set / qmax. No learning; it stays available as the comparison
baseline for every later method.
"""

from __future__ import annotations

import copy

import torch
from tqdm.auto import tqdm

from pqcad_deploy.calibration.trajectories import CalibrationSet
from pqcad_deploy.conditioning import conditions_on
from pqcad_deploy.methods.registry import MethodJob
from pqcad_deploy.quant import primitives as P
from pqcad_deploy.quant.replace import LayerBits, quant_layers, swap_in_quant_layers

__all__ = ["minmax_quantize", "calibrate_activations_minmax"]


@torch.no_grad()
def calibrate_activations_minmax(student: torch.nn.Module, calibration: CalibrationSet, batch_size: int,
                                 device: str = "cpu", progress: bool = True) -> None:
    """Per-tensor scale max|input| / qmax of every input quantizer, observed with the current weights.

    Leaves every input quantizer enabled.
    """
    layers = {n: layer for n, layer in quant_layers(student).items() if layer.input_quantizer.quantizes}
    for layer in layers.values():
        layer.input_quantizer.observed_amax.zero_()
        layer.input_quantizer.observing = True
    n_batches = (len(calibration) + batch_size - 1) // batch_size
    for x, t, cond in tqdm(calibration.batches(batch_size), total=n_batches, desc="activation ranges",
                           unit="batch", disable=not progress):
        student(x.to(device), t.to(device), **conditions_on(cond, device))
    for layer in layers.values():
        quantizer = layer.input_quantizer
        quantizer.observing = False
        quantizer.enabled = True
        amax = float(quantizer.observed_amax)
        quantizer.set_scale(P.minmax_activation_scale(amax if amax > 0 else 1.0, quantizer.bits))


def run(job: MethodJob) -> tuple[torch.nn.Module, dict]:
    """The registry's entry point (methods.registry): min-max has no report of its own."""
    return minmax_quantize(job.fp_unet, job.plan, job.calibration, job.batch_size, job.device, job.progress), {}


@torch.no_grad()
def minmax_quantize(
    fp_unet: torch.nn.Module,
    plan: dict[str, LayerBits],
    calibration: CalibrationSet,
    batch_size: int,
    device: str = "cpu",
    progress: bool = True,
) -> torch.nn.Module:
    """Return a fake-quant copy of `fp_unet` with min-max scales on every layer of `plan`."""
    student = copy.deepcopy(fp_unet).to(device).eval()
    swap_in_quant_layers(student, plan)
    layers = quant_layers(student)
    for layer in layers.values():
        layer.weight_quantizer.set_scale(P.minmax_weight_scale(layer.weight, layer.weight_bits))
    calibrate_activations_minmax(student, calibration, batch_size, device, progress)
    return student
