"""CAD's rounds: N -> N/2 -> ... -> N/2^R steps, each round's student the next round's teacher.

One round (:func:`distill_round`) draws C_DC from the FP model on the round's grid, trains the student
(distill.cad), then lets the guard (distill.guard) keep it or its starting point. :func:`distill_rounds`
chains them, checkpoints between rounds and resumes inside or between them. compress calls it on the
PQ student it has just made; the GPU table calls it on a PQ artifact's student, once per variant.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from pqcad_deploy.checkpoint import Checkpoint
from pqcad_deploy.conditioning import Conditioning
from pqcad_deploy.eval.pipeline_sampling import Decode
from pqcad_deploy.config import CompressConfig
from pqcad_deploy.presets import PresetSettings

__all__ = ["RoundHook", "distill_rounds", "distill_round"]

RoundHook = Callable[[int, torch.nn.Module, dict, list[int]], None]
"""on_round(round index, the kept student, the round's report, its timesteps)."""


def distill_rounds(config: CompressConfig, student: torch.nn.Module, fp_unet: torch.nn.Module, scheduler_config: dict,
                   image_shape: tuple[int, int, int], device: str, progress: bool, checkpoint: Checkpoint,
                   resume: bool = False, log: Callable[[str], None] = print,
                   on_round: RoundHook | None = None,
                   settings: PresetSettings | None = None, conditioning: Conditioning | None = None,
                   decode: Decode | None = None) -> tuple[torch.nn.Module, dict, list[int]]:
    """CAD: distil the quantized student to N/2 steps (N/2^rounds with ``rounds``); (student, report, timesteps).

    Round r trains on C_DC drawn from the FP model on the N/2^r grid, with the FP model as the teacher
    in round 0 and the previous round's student after that (progressive distillation). After each
    round the guard (distill.guard) keeps the new student only if it samples clearly closer (beyond the
    check's noise) to FP at the original teacher steps than its starting point does on the same halved
    grid (``report["guard"]``). Checkpointed every ``settings.distill_checkpoint_every`` iterations and at
    the end of every round but the last; `resume` continues from the last one (C_DC is redrawn: it is
    seeded). With one round the report is that round's; with more it is the last round's plus
    ``rounds`` (every round's). `on_round(r, student, report, timesteps)` sees each round's kept
    student (after its guard) before the next round starts, e.g. to sample it: the GPU table
    (scripts/gpu_quant_table.py) scores every round of one run instead of one run per round count.
    """
    import copy

    settings = settings if settings is not None else config.settings
    state = checkpoint.load_distill() if resume else None
    first, teacher, reports = 0, fp_unet, []
    if state is not None:
        first, reports = int(state.get("round", 0)), list(state.get("round_reports", []))
        if state.get("teacher") is not None or state.get("round_done"):
            teacher = copy.deepcopy(student)
            teacher.load_state_dict(state["student"] if state.get("round_done") else state["teacher"])
            student = copy.deepcopy(teacher)
        if state.get("round_done"):
            first, state = first + 1, None
            log(f"resuming the distillation at round {first + 1} of {config.rounds}")
        else:
            where = f" in round {first + 1} of {config.rounds}" if config.rounds > 1 else ""
            log(f"resuming the distillation from iteration {state['iteration']} of "
                f"{settings.distill.iters}{where}")
    steps = config.teacher_steps // 2 ** first
    for r in range(first, config.rounds):
        student, report, timesteps = distill_round(config, student, teacher, fp_unet, scheduler_config, steps,
                                                    image_shape, device, progress, checkpoint, state, r, reports,
                                                    settings, conditioning, decode)
        state = None
        reports.append(report)
        if on_round is not None:
            on_round(r, student, report, timesteps)
        if r + 1 < config.rounds:  # save_distill serialises at once: no copy of the state needed
            checkpoint.save_distill({"iteration": len(report["losses"]), "round": r, "round_done": True,
                                     "student": student.state_dict(), "round_reports": reports})
            teacher = copy.deepcopy(student).eval()
        steps //= 2
    report = reports[-1] if config.rounds == 1 else {**reports[-1], "rounds": reports}
    return student, report, timesteps


def distill_round(config: CompressConfig, student: torch.nn.Module, teacher: torch.nn.Module,
                   fp_unet: torch.nn.Module, scheduler_config: dict, steps: int, image_shape: tuple[int, int, int],
                   device: str, progress: bool, checkpoint: Checkpoint, state: dict | None, round_index: int,
                   reports: list[dict], settings: PresetSettings, conditioning: Conditioning | None = None,
                   decode: Decode | None = None) -> tuple[torch.nn.Module, dict, list[int]]:
    """One CAD round at `steps` teacher steps, then its guard; (student, report, the student's timesteps)."""
    import copy

    from pqcad_deploy.conditioning import conditioning_of
    from pqcad_deploy.distill.cad import distill
    from pqcad_deploy.distill.dc import HELDOUT_SEED_OFFSET, collect_dc
    from pqcad_deploy.distill.grid import distill_grid
    from pqcad_deploy.distill.guard import guard_distillation, resolve_guard_metric

    grid = distill_grid(scheduler_config, steps)
    if conditioning is None:  # a pixel-space model's, from its config (compress passes every model's)
        conditioning = conditioning_of(dict(fp_unet.config), config.guidance_scale, config.null_class)
    seed = config.seed + round_index
    guard = dataclasses.replace(settings.guard, metric=resolve_guard_metric(config.guard, device)[0])
    dcfg = dataclasses.replace(settings.distill, seed=seed,
                               checkpoint_every=settings.distill_checkpoint_every)
    dc_set = collect_dc(fp_unet, scheduler_config, grid, image_shape,
                        dataclasses.replace(settings.dc, seed=seed), device=device, progress=progress,
                        conditioning=conditioning)
    heldout = collect_dc(fp_unet, scheduler_config, grid, image_shape,
                         dataclasses.replace(settings.heldout, seed=seed + HELDOUT_SEED_OFFSET),
                         device=device, progress=False, conditioning=conditioning)
    teacher_state = None if teacher is fp_unet else teacher.state_dict()  # frozen: it never changes

    def save(distill_state: dict) -> None:
        checkpoint.save_distill({**distill_state, "round": round_index, "teacher": teacher_state,
                                 "round_reports": reports})

    undistilled = copy.deepcopy(student)
    student, report = distill(student, teacher, scheduler_config, steps, dc_set, dcfg, device=device,
                              progress=progress, on_checkpoint=save, resume=state, heldout=heldout)
    report = report.to_dict()
    # Every round is judged against FP at the original teacher steps, the quality the rounds aim at;
    # the round's own teacher steps are recorded beside it (guard_distillation's docstring says why).
    student, report["guard"] = guard_distillation(fp_unet, student, undistilled, scheduler_config,
                                                  config.teacher_steps, len(grid.student), guard,
                                                  seed=seed, device=device, also_against=steps,
                                                  conditioning=conditioning, decode=decode)
    report["round"] = round_index
    return student, report, [int(t) for t in grid.student]
