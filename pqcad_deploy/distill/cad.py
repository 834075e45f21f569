"""CAD: quantization-aware distillation of the PQ student to half the DDIM steps (docs/ARCHITECTURE.md, The method).

Each iteration draws a batch of (x_t, t) from C_DC; the FP teacher's two DDIM steps t -> t' -> t''
give x0_target (for a fixed set computed once up front: the teacher is frozen and the set is fixed,
so this is identical to computing it per batch and costs 2 teacher passes per pair instead of per
draw; with a fresh C_DC (``DCConfig.fresh``) every batch is new and its targets are computed as it
is drawn); the student's eps at (x_t, t) gives x0_pred; the loss is mean_b w(t_b) * mean((x0_pred -
x0_target)^2) with the truncated-SNR weight max(SNR, 1), plus optionally ``rdd_weight`` times the
relational term (RDD): the mean squared difference of the batch's pairwise cosine-similarity matrices
of the flattened student x0_pred and teacher x0_target.

What is trained (quantization-aware training): the latent weights of every QuantConv2d / QuantLinear
(the straight-through estimator of ``primitives.round_ste`` passes gradients through the rounding,
and clamping zeroes them for saturated codes), their per-channel weight scales and the per-tensor
scales of every quantizing input quantizer (LSQ gradients; clamped positive after each step), and, by
default, every other float parameter of the student (biases, norms, time embedding, unquantized
layers): they ship in float in the artifact anyway, so there is no reason to hold them back, and the
student must learn a new function (two steps in one), not only undo quantization error.
Float inputs (``bits=None``) have no scale and are left alone.

Codes after training: round to nearest is deterministic, so ``weight_quantizer.codes(weight)`` of the
trained latent weight is exactly what the student computed with; nothing has to be hardened (no
AdaRound logits are used here; a student that still has them is refused).

Training schedule (DistillConfig): optional linear warm-up and cosine decay of every learning rate,
an EMA of the trained parameters that the student ends with, and the loss on held-out pairs every
``heldout_every`` iterations (the report's ``heldout`` curve). Which settings to use is for measurement
(issue 14); the defaults keep the earlier behaviour (constant rates, no EMA).

Resume: ``on_checkpoint(state)`` is called every ``checkpoint_every`` iterations with a self-contained
state (student state dict, optimizer state, the batch generator's state, the losses so far, the EMA
and the held-out curve);
``distill(..., resume=state)`` continues from it and gives the same result as an uninterrupted run
(bitwise on the same machine: the only randomness is the generator that draws the batches).
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from pqcad_deploy.conditioning import conditions_on, select_rows
from pqcad_deploy.distill.dc import DCSet
from pqcad_deploy.distill.grid import DistillGrid, distill_grid
from pqcad_deploy.distill.target import (DDIMCoefficients, predict_x0, teacher_target,
                                         truncated_snr_weight)
from pqcad_deploy.errors import ConfigError
from pqcad_deploy.presets import LR_DECAYS, DistillConfig
from pqcad_deploy.quant.replace import quant_layers

__all__ = ["DistillConfig", "LR_DECAYS", "DistillReport", "TrainableGroups", "trainable_groups",
           "compute_targets", "rdd_loss", "distill_loss", "distill"]

_MIN_SCALE = 1e-8


@dataclass
class DistillReport:
    """What CAD did: per-iteration losses, wall time, the config and the grids.

    `heldout` lists [iteration, loss] on the held-out pairs (empty without a held-out set).
    """

    losses: list[float]
    seconds: float
    config: dict
    grid: dict
    resumed_from: int | None = None
    extra: dict = field(default_factory=dict)
    heldout: list[list[float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainableGroups:
    """The student's trainable tensors, named so optimizer groups are built in a fixed order."""

    weights: list[nn.Parameter]
    weight_scales: list[nn.Parameter]
    act_scales: list[nn.Parameter]
    other: list[nn.Parameter]

    def scales(self) -> list[nn.Parameter]:
        return self.weight_scales + self.act_scales


def trainable_groups(student: nn.Module, train_other: bool) -> TrainableGroups:
    """Collect (and mark requires_grad) what CAD trains; freeze the rest.

    Raises:
        ConfigError: if a quantizer still has AdaRound logits (harden them first).
    """
    layers = quant_layers(student)
    weights, w_scales, a_scales = [], [], []
    for name, layer in layers.items():
        if layer.weight_quantizer.adaround_enabled:
            raise ConfigError(f"layer {name!r} still has AdaRound logits; harden them before distillation.")
        weights.append(layer.weight)
        w_scales.append(layer.weight_quantizer.scale)
        if layer.input_quantizer.quantizes and layer.input_quantizer.enabled:
            a_scales.append(layer.input_quantizer.scale)
    chosen = {id(p) for p in weights + w_scales + a_scales}
    other = [p for p in student.parameters() if id(p) not in chosen] if train_other else []
    trained = chosen | {id(p) for p in other}
    for p in student.parameters():
        p.requires_grad_(id(p) in trained)
    return TrainableGroups(weights, w_scales, a_scales, other)


def _optimizer(groups: TrainableGroups, config: DistillConfig) -> torch.optim.Adam:
    param_groups = [{"params": groups.weights + groups.other, "lr": config.lr}]
    param_groups += [{"params": [s], "lr": config.scale_lr * float(s.detach().mean())} for s in groups.weight_scales]
    param_groups += [{"params": [s], "lr": config.act_scale_lr * float(s.detach())} for s in groups.act_scales]
    return torch.optim.Adam(param_groups)


@torch.no_grad()
def compute_targets(teacher: nn.Module, dc_set: DCSet, grid: DistillGrid, coeffs: DDIMCoefficients,
                    batch_size: int, device: str = "cpu", progress: bool = False) -> torch.Tensor:
    """x0_target (float32, on the CPU) of every C_DC pair, from the FP teacher's DDIM steps."""
    out = []
    starts = range(0, len(dc_set), batch_size)
    for start in tqdm(starts, desc="teacher targets", unit="batch", disable=not progress):
        x = dc_set.x[start:start + batch_size].to(device)
        t = dc_set.t[start:start + batch_size].to(device)
        cond = conditions_on(select_rows(dc_set.cond, slice(start, start + batch_size)), device)
        out.append(teacher_target(teacher, x, t, grid, coeffs, cond)[0].to(torch.float32).cpu())
    return torch.cat(out)


def rdd_loss(student_out: torch.Tensor, teacher_out: torch.Tensor) -> torch.Tensor:
    """Relational distillation: MSE between the batch's pairwise cosine-similarity matrices.

    It asks the student to keep how the samples of a batch relate to each other (seed 002's RDD),
    which the per-sample MSE does not see; 0 for a batch of one.
    """
    s = nn.functional.normalize(student_out.flatten(1), dim=1)
    t = nn.functional.normalize(teacher_out.flatten(1), dim=1)
    return (s @ s.T - t @ t.T).pow(2).mean()


def _x0_loss(student: nn.Module, x_t: torch.Tensor, t: torch.Tensor, target: torch.Tensor,
             coeffs: DDIMCoefficients, cond: dict[str, torch.Tensor] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean_b max(SNR_t, 1) * mean((x0_pred - x0_target)^2), x0_pred), float32."""
    alpha, sigma = (v.to(x_t.dtype) for v in coeffs.alpha_sigma(t))
    eps = student(x_t, t.to(x_t.dtype), **(cond or {})).sample
    x0_pred = predict_x0(x_t, eps, alpha, sigma)
    weight = truncated_snr_weight(alpha, sigma)
    return (weight * (x0_pred - target).pow(2).flatten(1).mean(dim=1)).mean(), x0_pred


def distill_loss(student: nn.Module, x_t: torch.Tensor, t: torch.Tensor, target: torch.Tensor,
                 coeffs: DDIMCoefficients, rdd_weight: float = 0.0,
                 cond: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """mean_b max(SNR_t, 1) * mean((x0_pred - x0_target)^2) (+ rdd_weight * RDD), float32."""
    loss, x0_pred = _x0_loss(student, x_t, t, target, coeffs, cond)
    if rdd_weight > 0:
        loss = loss + rdd_weight * rdd_loss(x0_pred, target)
    return loss


OnCheckpoint = Callable[[dict], None]


def _state(iteration: int, student: nn.Module, optimizer: torch.optim.Optimizer,
           generator: torch.Generator, losses: list[float], ema: list[torch.Tensor] | None,
           heldout: list[list[float]]) -> dict:
    return {"iteration": iteration, "student": copy.deepcopy(student.state_dict()),
            "optimizer": copy.deepcopy(optimizer.state_dict()), "generator": generator.get_state().clone(),
            "losses": list(losses), "ema": None if ema is None else [e.detach().clone() for e in ema],
            "heldout": [list(h) for h in heldout]}


@contextlib.contextmanager
def _parameters_swapped(params: list[nn.Parameter], values: list[torch.Tensor] | None):
    """Run with `values` (the EMA) in `params`, then put the live values back (no-op for None)."""
    if values is None:
        yield
        return
    live = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(params, live):
                p.copy_(v)


@torch.no_grad()
def _heldout_loss(student: nn.Module, heldout: DCSet, targets: torch.Tensor, coeffs: DDIMCoefficients,
                  batch_size: int, device: str) -> float:
    """The distillation loss (without RDD) over the whole held-out set, weighted by batch size."""
    total = 0.0
    for start in range(0, len(heldout), batch_size):
        x = heldout.x[start:start + batch_size].to(device)
        t = heldout.t[start:start + batch_size].to(device)
        cond = conditions_on(select_rows(heldout.cond, slice(start, start + batch_size)), device)
        loss, _ = _x0_loss(student, x, t, targets[start:start + batch_size].to(device), coeffs, cond)
        total += float(loss) * x.shape[0]
    return total / max(len(heldout), 1)


def distill(student: nn.Module, teacher: nn.Module, scheduler_config: dict, teacher_steps: int,
            dc_set: DCSet, config: DistillConfig, device: str = "cpu", progress: bool = True,
            on_checkpoint: OnCheckpoint | None = None, resume: dict | None = None,
            heldout: DCSet | None = None) -> tuple[nn.Module, DistillReport]:
    """Train the fake-quant `student` in place to take one DDIM step where the FP teacher takes two.

    Args:
        student: the PQ (or min-max) fake-quant UNet; modified in place and returned.
        teacher: the FP UNet (frozen; never modified).
        scheduler_config: the model's DDIM config.
        teacher_steps: N, the teacher's DDIM steps; the student samples on N/2 (``distill_grid``).
        dc_set: C_DC, drawn on the same grid; with pools (``fresh``) every batch is drawn new and its
            targets are computed by the teacher as it goes.
        config: see :class:`DistillConfig`.
        heldout: fixed pairs never trained on, whose loss is measured every ``config.heldout_every``
            iterations (the report's ``heldout`` curve).
        on_checkpoint: called with a resumable state every ``config.checkpoint_every`` iterations.
        resume: such a state; training continues from its iteration.

    Returns:
        (student, report); the student is in eval mode with every parameter's requires_grad off.
    """
    started = time.perf_counter()
    grid = distill_grid(scheduler_config, teacher_steps)
    unknown = set(dc_set.t.unique().tolist()) - set(grid.student)
    if unknown:
        raise ConfigError(f"C_DC has timesteps {sorted(unknown)} that are not on the student grid.")
    coeffs = DDIMCoefficients.from_config(scheduler_config)
    teacher.eval()
    targets = None if dc_set.fresh else compute_targets(teacher, dc_set, grid, coeffs, config.batch_size, device,
                                                        progress)
    heldout_targets = (None if heldout is None
                       else compute_targets(teacher, heldout, grid, coeffs, config.batch_size, device, progress))
    student.eval()  # no dropout: the only randomness is the batch generator (bitwise resume)
    groups = trainable_groups(student, config.train_other)
    optimizer = _optimizer(groups, config)
    base_lrs = [group["lr"] for group in optimizer.param_groups]  # before a resumed state overwrites them
    generator = torch.Generator().manual_seed(config.seed)
    trainable = [p for p in student.parameters() if p.requires_grad]
    ema = None if config.ema_decay is None else [p.detach().clone() for p in trainable]
    losses: list[float] = []
    heldout_curve: list[list[float]] = []
    start = 0
    if resume is not None:
        student.load_state_dict(resume["student"])
        optimizer.load_state_dict(resume["optimizer"])
        generator.set_state(resume["generator"])
        losses, start = list(resume["losses"]), int(resume["iteration"])
        if ema is not None:
            ema = [e.to(p.device) for e, p in zip(resume["ema"], trainable)]
        heldout_curve = [list(h) for h in resume.get("heldout", [])]

    def measure_heldout(iteration: int) -> None:
        if heldout is None:
            return
        with _parameters_swapped(trainable, ema):
            heldout_curve.append([iteration, _heldout_loss(student, heldout, heldout_targets, coeffs,
                                                           config.batch_size, device)])

    if start == 0:
        measure_heldout(0)
    bar = tqdm(range(start, config.iters), desc="CAD distillation", unit="it", disable=not progress,
               initial=start, total=config.iters)
    for it in bar:
        factor = config.lr_factor(it)
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * factor
        if dc_set.fresh:
            batch = dc_set.draw(config.batch_size, generator, coeffs)
            x, t, cond = batch.x.to(device), batch.t.to(device), conditions_on(batch.cond, device)
            with torch.no_grad():
                target = teacher_target(teacher, x, t, grid, coeffs, cond)[0].to(torch.float32)
        else:
            index = torch.randint(0, len(dc_set), (config.batch_size,), generator=generator)
            x, t, target = dc_set.x[index].to(device), dc_set.t[index].to(device), targets[index].to(device)
            cond = conditions_on(select_rows(dc_set.cond, index), device)
        loss = distill_loss(student, x, t, target, coeffs, config.rdd_weight, cond)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
        optimizer.step()
        with torch.no_grad():  # keep scales positive
            for s in groups.scales():
                s.clamp_(min=_MIN_SCALE)
            if ema is not None:
                for e, p in zip(ema, trainable):
                    e.mul_(config.ema_decay).add_(p.detach(), alpha=1.0 - config.ema_decay)
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4g}")
        if (it + 1) % config.heldout_every == 0 and it + 1 < config.iters:
            measure_heldout(it + 1)
        if on_checkpoint is not None and config.checkpoint_every and (it + 1) % config.checkpoint_every == 0:
            on_checkpoint(_state(it + 1, student, optimizer, generator, losses, ema, heldout_curve))
    bar.close()
    measure_heldout(config.iters)
    if ema is not None:  # the student ends with the average
        with torch.no_grad():
            for p, e in zip(trainable, ema):
                p.copy_(e)
    for p in student.parameters():
        p.requires_grad_(False)
    student.eval()
    report = DistillReport(losses=losses, seconds=time.perf_counter() - started, config=asdict(config),
                           grid=grid.to_dict(), resumed_from=start if resume is not None else None,
                           extra={"dc": dc_set.description}, heldout=heldout_curve)
    return student, report
