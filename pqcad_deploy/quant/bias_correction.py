"""Bias correction: fold each quantized layer's mean output error into its bias.

Quantizing a layer's weights and input changes its output by an error whose mean over the data is
not zero (rounding and clipping are biased for the skewed distributions of post-SiLU activations,
and upstream errors arrive already shifted). A diffusion sampler integrates the noise prediction
over every step, so a per-channel shift that is small at one step becomes a colour cast in the image
(PTQD, TAC-Diffusion). For an output channel c of a layer, with y the FP model's output and y_q the
student's on the same model input (x_t, t),

    bias_c <- bias_c - E[y_q,c - y_c],

the expectation over the calibration set (the FP model's own DDIM trajectories) and over every
position of the channel (batch, pixels, tokens). The correction is a constant per channel, so it
stays a plain bias: exported, deployed and run by TensorRT exactly like any bias.

Layers are corrected one at a time in the order the forward pass runs them, and each one's error is
measured with every earlier layer already corrected: a downstream layer's error includes what
arrives from upstream, and correcting both from one measurement would remove that part twice.
Each measurement stops the forward pass right after the layer (``_StopForward``), so the whole
correction costs about half a forward pass per layer over the estimation samples.

Measured (docs/RESULTS.md section 15, PQ W8A8, 10,000-sample FID): on the CIFAR-10 model it takes
FID from 24.00 to 22.99 (FP 22.68) and the per-channel image means to within 0.72 of FP's (from
-1.2 / -1.8 / -2.0); on the Fashion-MNIST model it takes FID from 17.44 to 24.28 and the mean from
60.94 to 70.22 (FP 61.06), although the corrections are 1-2 % of the channel means and the
corrected student's mean noise prediction matches FP's on the calibration set. A constant per
channel cannot follow an error whose mean changes sign over the timesteps; it is therefore off by
default (``--bias-correction``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from pqcad_deploy.calibration.trajectories import CalibrationSet
from pqcad_deploy.conditioning import conditions_on

__all__ = ["BiasCorrectionConfig", "channel_means", "execution_order", "mean_output_error", "correct_biases"]


@dataclass(frozen=True)
class BiasCorrectionConfig:
    """How many calibration samples estimate the means (`max_samples`, spread over the whole set)."""

    max_samples: int = 256
    batch_size: int = 32


class _StopForward(Exception):
    """Raised by a hook once the layer of interest has run: the rest of the pass is not needed."""


def _channel_sum(output: torch.Tensor, module: nn.Module) -> tuple[torch.Tensor, int]:
    """Per-output-channel sum (float64) and the count of values per channel.

    Conv2d outputs are [N, C, H, W] (channel dim 1); Linear outputs [..., C] (channel last).
    """
    out = output.detach().double()
    if isinstance(module, nn.Conv2d):
        flat = out.transpose(0, 1).reshape(out.shape[1], -1)
    else:
        flat = out.reshape(-1, out.shape[-1]).t()
    return flat.sum(dim=1), int(flat.shape[1])


def _subset(calibration: CalibrationSet, max_samples: int) -> CalibrationSet:
    """`max_samples` pairs spread evenly over the set (so over its trajectories and timesteps)."""
    if len(calibration) <= max_samples:
        return calibration
    index = torch.linspace(0, len(calibration) - 1, max_samples).round().long()
    x, t, cond = calibration.rows(index)
    return CalibrationSet(x=x, t=t, description=calibration.description, cond=cond)


@torch.no_grad()
def channel_means(model: nn.Module, names: Iterable[str], calibration: CalibrationSet, batch_size: int,
                  device: str, stop_after: str | None = None) -> dict[str, torch.Tensor]:
    """Per-output-channel mean (float64, CPU) of each named layer's output over `calibration`.

    With `stop_after`, each batch's forward pass stops once that layer has run (its mean and those
    of layers that ran before it are complete; later ones are not measured).
    """
    wanted = list(names)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name: str, module: nn.Module, _inputs, output) -> None:
        s, n = _channel_sum(output, module)
        sums[name] = sums.get(name, 0) + s
        counts[name] = counts.get(name, 0) + n
        if name == stop_after:
            raise _StopForward

    for name in wanted:
        module = model.get_submodule(name)
        hooks.append(module.register_forward_hook(lambda m, i, o, name=name: hook(name, m, i, o)))
    try:
        for x, t, cond in calibration.batches(batch_size):
            try:
                model(x.to(device), t.to(device), **conditions_on(cond, device))
            except _StopForward:
                pass
    finally:
        for h in hooks:
            h.remove()
    return {name: (sums[name] / counts[name]).cpu() for name in wanted if name in sums}


def execution_order(model: nn.Module, names: Iterable[str], example: tuple[torch.Tensor, torch.Tensor],
                    cond: dict[str, torch.Tensor] | None = None) -> list[str]:
    """`names` sorted by when the forward pass first runs them (module order can differ)."""
    wanted = list(names)
    order: list[str] = []
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, i, o, name=n: order.append(name) if name not in order else None) for n in wanted]
    try:
        with torch.no_grad():
            model(*example, **(cond or {}))
    finally:
        for h in hooks:
            h.remove()
    return order + [n for n in wanted if n not in order]


def mean_output_error(student: nn.Module, name: str, fp_mean: torch.Tensor, calibration: CalibrationSet,
                      batch_size: int, device: str) -> torch.Tensor:
    """E[y_q - y] per output channel of layer `name` (float64, CPU), the student run up to that layer."""
    student_mean = channel_means(student, [name], calibration, batch_size, device, stop_after=name)[name]
    return student_mean - fp_mean


@torch.no_grad()
def correct_biases(fp_unet: nn.Module, student: nn.Module, layer_names: Iterable[str], calibration: CalibrationSet,
                   config: BiasCorrectionConfig = BiasCorrectionConfig(), device: str = "cpu",
                   progress: bool = True) -> dict:
    """Fold the mean output error of each named student layer into its bias, in execution order.

    Layers without a bias are skipped (adding one would change the graph). Returns the report
    section: per layer, the largest absolute per-channel correction and the RMS of the correction
    relative to the RMS of the FP layer's channel means (how large the shift was).
    """
    data = _subset(calibration, config.max_samples)
    requested = list(layer_names)  # iterated twice below
    names = [n for n in requested if getattr(student.get_submodule(n), "bias", None) is not None]
    skipped = [n for n in requested if n not in names]
    x0, t0, cond0 = next(iter(data.batches(1)))
    names = execution_order(student, names, (x0.to(device), t0.to(device)), conditions_on(cond0, device))
    fp_means = channel_means(fp_unet, names, data, config.batch_size, device)
    layers = {}
    for name in tqdm(names, desc="bias correction", unit="layer", disable=not progress):
        error = mean_output_error(student, name, fp_means[name], data, config.batch_size, device)
        bias = student.get_submodule(name).bias
        bias.sub_(error.to(bias.dtype).to(bias.device))
        ref = float(fp_means[name].pow(2).mean().sqrt())
        layers[name] = {"max_abs_correction": float(error.abs().max()),
                        "rms_correction": float(error.pow(2).mean().sqrt()),
                        "rms_fp_channel_mean": ref}
    return {"samples": len(data), "layers": layers, "skipped_no_bias": skipped}
