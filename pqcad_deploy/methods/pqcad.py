"""PQ, the quantization half of PQCAD-DM: progressive bit lowering with momentum-based transitions.

Weights first: block by block in execution order, each block is reconstructed (AdaRound rounding,
LSQ scales; pqcad_deploy.reconstruct) at 8 bits, then 6, then its target, each level starting from
the previous level's result. A level ends when the momentum of its loss improvement falls below a
threshold relative to the loss (pqcad_deploy.progressive); every transition is recorded. The plan
comes from compress (first and last convolution: pqcad_deploy.layer_precision; 8-bit weights with
float inputs by default). Then activations: per-tensor scales initialised on
C_QC and learned by block reconstruction with the weights frozen (as in the brecq baseline).

Differences from brecq (the ablation): the bit ladder and the momentum rule; C_QC drawn with
normally distributed timesteps (compress sets that for this method).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from pqcad_deploy.calibration.trajectories import CalibrationSet
from pqcad_deploy.methods.brecq import activation_stage, weights_first_student
from pqcad_deploy.methods.registry import MethodJob
from pqcad_deploy.progressive import Transition, TransitionRule, TransitionTracker, bit_ladder
from pqcad_deploy.quant.replace import LayerBits, quant_layers
from pqcad_deploy.reconstruct import (
    ReconstructionConfig, capture_for_reconstruction, first_pair_blocks, reconstruct_block,
)

if TYPE_CHECKING:
    from pqcad_deploy.checkpoint import Checkpoint

__all__ = ["PQConfig", "pq_quantize"]

@dataclass(frozen=True)
class PQConfig:
    """PQ settings: the reconstruction, the transition rule and the ladder (None: 8 -> 6 -> target)."""

    reconstruction: ReconstructionConfig
    rule: TransitionRule
    ladder: tuple[int, ...] | None = None
    act_scale_init: str = "minmax"  # "minmax" | "percentile" | "mse" (choices.ACT_SCALE_INITS)


def run(job: MethodJob) -> tuple[torch.nn.Module, dict]:
    """The registry's entry point (methods.registry)."""
    config = PQConfig(reconstruction=job.reconstruction_config(), rule=job.settings.pq_rule,
                      act_scale_init=job.config.activation_scale_init)
    return pq_quantize(job.fp_unet, job.plan, job.calibration, config, job.device, job.progress,
                       capture_batch_size=job.batch_size, checkpoint=job.checkpoint)


def pq_quantize(
    fp_unet: torch.nn.Module,
    plan: dict[str, LayerBits],
    calibration: CalibrationSet,
    config: PQConfig,
    device: str = "cpu",
    progress: bool = True,
    capture_batch_size: int = 32,
    checkpoint: Checkpoint | None = None,
) -> tuple[torch.nn.Module, dict]:
    """Return the PQ student (every latent weight = codes * scale) and its report.

    The report holds, per block, one result per ladder level (loss curve, iterations, why it ended)
    and the list of bit transitions (block, from, to, iteration, loss). `checkpoint` is saved after
    every finished block (all its ladder levels); when it holds a loaded resume point, the run
    continues from there (:mod:`pqcad_deploy.checkpoint`).
    """
    started = time.perf_counter()
    rcfg = config.reconstruction
    # start every layer at the top of its ladder; each block steps down to its own target
    targets = dict(plan)
    ladders = {name: bit_ladder(bits.weight_bits, ladder=config.ladder if bits.weight_bits != 8 else None)
               for name, bits in targets.items()}
    student = weights_first_student(fp_unet, {n: LayerBits(ladders[n][0], b.act_bits) for n, b in targets.items()},
                                    rcfg.weight_scale_init, device)
    layers = quant_layers(student)

    resume = checkpoint.restore(student) if checkpoint is not None else None
    entries = resume.entries if resume is not None else {}
    started -= resume.seconds if resume is not None else 0.0
    blocks = first_pair_blocks(student, calibration, device)
    transitions = [Transition(**t) for t in entries.get("transitions", [])]
    weight_results: list[dict] = list(entries.get("weights", []))
    act_results: list[dict] = list(entries.get("activations", []))
    t_weights = entries.get("seconds_weights")

    def save(stage: str, blocks_done: int) -> None:
        if checkpoint is not None:
            checkpoint.save(student, stage, blocks_done, len(blocks),
                            {"transitions": [dataclasses.asdict(t) for t in transitions], "weights": weight_results,
                             "activations": act_results, "seconds_weights": t_weights},
                            seconds=time.perf_counter() - started)

    done = resume.blocks_done_in("weights") if resume is not None else 0
    outer = tqdm(blocks[done:], desc="PQ weights", unit="block", initial=done, total=len(blocks),
                 disable=not progress)
    for index, block in enumerate(outer, start=done):
        block_layers = [n for n in layers if n == block.name or n.startswith(block.name + ".")]
        ladder = max((ladders[n] for n in block_layers), key=len)
        data = capture_for_reconstruction(fp_unet, student, block.name, calibration, rcfg, capture_batch_size,
                                          device)
        for level, bits in enumerate(ladder):
            tracker = TransitionTracker(config.rule)
            last = level == len(ladder) - 1
            # The momentum rule decides when to step DOWN; the target level has nowhere to step, so it
            # runs the full reconstruction schedule: AdaRound's regulariser anneals over `iters` and
            # only pushes the rounding to 0/1 late, so stopping it on a loss plateau and hardening
            # there hardened half-soft rounding (measured: W4A8 FID 58.9 vs brecq's 18.2, RESULTS s5).
            result = reconstruct_block(
                student.get_submodule(block.name), fp_unet.get_submodule(block.name), data, rcfg,
                name=block.name, stage="weights", bits={n: max(bits, targets[n].weight_bits) for n in block_layers},
                iters=rcfg.iters if last else config.rule.max_iters, harden=last,
                on_iteration=None if last else (lambda _name, _it, loss, tracker=tracker: tracker.update(loss)),
                device=device, progress=progress, seed=rcfg.seed + index)
            end = "target level: full schedule" if last else tracker.reason
            weight_results.append({**result.to_dict(), "level": level, "end": end})
            loss = result.losses[-1] if result.losses else result.loss_after
            transitions.append(Transition(block=block.name, from_bits=bits,
                                          to_bits=None if last else ladder[level + 1],
                                          iteration=result.iterations, loss=float(loss),
                                          reason=end or "max_iters"))
            outer.set_postfix(block=block.name, bits=bits, loss=f"{loss:.3g}")
        del data
        save("weights", index + 1)
    if t_weights is None:
        t_weights = time.perf_counter() - started

    def on_block(result) -> None:
        act_results.append(result.to_dict())
        save("activations", len(act_results))  # one entry per finished block

    activation_stage(fp_unet, student, calibration, rcfg, config.act_scale_init, capture_batch_size, device,
                     progress, resume, on_block)
    for name, layer in quant_layers(student).items():
        if layer.weight_bits != targets[name].weight_bits:
            raise RuntimeError(f"PQ left {name} at {layer.weight_bits} bits instead of {targets[name].weight_bits}")
    report = {"pq": {
        "config": {"reconstruction": dataclasses.asdict(rcfg), "rule": dataclasses.asdict(config.rule),
                   "ladder": list(config.ladder) if config.ladder else None,
                   "act_scale_init": config.act_scale_init},
        "transitions": [dataclasses.asdict(t) for t in transitions],
        "weights": weight_results,
        "activations": act_results,
        "seconds": {"weights": t_weights, "total": time.perf_counter() - started},
    }}
    return student, report
