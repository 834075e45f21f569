"""`compress`: FP diffusers UNet -> compressed artifact.

Steps: load the model, draw the data-free calibration set from its own DDIM trajectories, quantize
with the chosen method, measure the damage, write the artifact atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from pqcad_deploy.artifact import ArtifactManifest, LayerRecord, save_artifact, student_state_from_model
from pqcad_deploy.calibration.qc import collect_qc_calibration
from pqcad_deploy.calibration.trajectories import CalibrationSet
from pqcad_deploy.checkpoint import Checkpoint, check_checkpoint_dir, checkpoint_dir, run_fingerprint
from pqcad_deploy.config import CompressConfig, config_to_dict
from pqcad_deploy.conditioning import Conditioning, conditioning_for, conditions_on, read_prompt_file
from pqcad_deploy.eval.pipeline_sampling import Decode
from pqcad_deploy.distill.guard import resolve_guard_metric
from pqcad_deploy.distill.rounds import distill_rounds
from pqcad_deploy.errors import ConfigError
from pqcad_deploy.eval.sqnr import sqnr_db_from_powers
from pqcad_deploy.fsutil import check_output_dir, output_lock
from pqcad_deploy.layer_precision import apply_first_last
from pqcad_deploy.methods.registry import MethodJob, method_spec
from pqcad_deploy.models import load_model
from pqcad_deploy.presets import PresetSettings, preset_to_dict
from pqcad_deploy.precision_policy import apply_precision_policy, precision_policy_report
from pqcad_deploy.provenance import provenance
from pqcad_deploy.quant.layers import QuantConv2d
from pqcad_deploy.quant.replace import LayerBits, quant_layers, quantizable_layers
from pqcad_deploy.schedule import ddim_timesteps, make_ddim_scheduler

__all__ = ["CompressResult", "compress", "uniform_plan", "layer_plan", "quantization_report"]


@dataclass(frozen=True)
class CompressResult:
    """What compress produced and how long it took."""

    artifact: Path
    seconds: float
    noise_pred_sqnr_db: float
    num_quantized_layers: int
    student_steps: int
    distilled: bool
    distill_guard: dict | None = None  # distill.guard's report entry (both PSNRs, which student was kept)


def uniform_plan(unet: torch.nn.Module, weight_bits: int, act_bits: int) -> dict[str, LayerBits]:
    """Every Conv2d and Linear at the same bits (the fixed-bit baselines)."""
    return {name: LayerBits(weight_bits, act_bits) for name in quantizable_layers(unet)}


def layer_plan(unet: torch.nn.Module, config: CompressConfig) -> tuple[dict[str, LayerBits], dict]:
    """The per-layer bits and their report section: uniform, or mixed within `config.avg_weight_bits`."""
    plan = apply_first_last(uniform_plan(unet, config.weight_bits, config.act_bits), config.first_last_policy)
    plan = apply_precision_policy(plan, config.precision_policy, config.keep_float)
    if config.avg_weight_bits is None:
        return plan, {}
    from pqcad_deploy.quant.mixed_precision import mixed_precision_plan

    mixed = mixed_precision_plan(unet, plan, config.avg_weight_bits)
    return mixed.plan, {"mixed_precision": mixed.report()}


def _resolve_device(device: str) -> str:
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was given but no CUDA GPU is visible to PyTorch; use --device cpu.")
    return device


@torch.no_grad()
def quantization_report(fp_unet: torch.nn.Module, student: torch.nn.Module,
                        calibration: CalibrationSet, batch_size: int, device: str) -> dict:
    """Per-layer weight error and the student's noise-prediction error against the FP model."""
    layers = {}
    for name, layer in quant_layers(student).items():
        w = layer.weight.detach()
        err = (layer.quantized_weight().detach() - w).pow(2).sum() / w.pow(2).sum().clamp_min(1e-30)
        layers[name] = {
            "kind": "conv2d" if isinstance(layer, QuantConv2d) else "linear",
            "weight_bits": layer.weight_bits, "act_bits": layer.act_bits,
            "weight_rel_mse": float(err),
            "act_scale": float(layer.input_quantizer.scale),
            "act_amax": float(layer.input_quantizer.observed_amax),
        }
    signal = noise = 0.0
    count = 0
    for x, t, cond in calibration.batches(batch_size):
        x, t, cond = x.to(device), t.to(device), conditions_on(cond, device)
        ref = fp_unet(x, t, **cond).sample
        out = student(x, t, **cond).sample
        signal += float(ref.double().pow(2).sum())
        noise += float((out - ref).double().pow(2).sum())
        count += ref.numel()
    return {"layers": layers, "noise_pred_sqnr_db": sqnr_db_from_powers(signal, noise),
            "noise_pred_mse": noise / max(count, 1)}


def _run_method(config: CompressConfig, settings: PresetSettings, fp_unet, plan, calibration, batch_size: int,
                device: str, progress: bool, checkpoint: Checkpoint | None = None) -> tuple[torch.nn.Module, dict]:
    """Quantize with the configured method (methods.registry); the student and the method's own report."""
    return method_spec(config.method).quantize(MethodJob(config, settings, fp_unet, plan, calibration, batch_size,
                                                         device, progress, checkpoint))


def _open_checkpoint(config: CompressConfig, settings: PresetSettings, fp_unet: torch.nn.Module, out: Path,
                     resume: bool, log: Callable[[str], None]) -> Checkpoint:
    """The run's checkpoint: loaded when resuming (refused if another run made it), else discarded.

    check_checkpoint_dir has already refused to discard one without --overwrite.
    """
    checkpoint = Checkpoint(checkpoint_dir(out), run_fingerprint(config, fp_unet, settings))
    if resume:
        point = checkpoint.load()
        if point is not None:
            log(f"resuming from {checkpoint.path}: {point.describe()}")
        elif not method_spec(config.method).resumable:
            log(f"--resume: {config.method} has no blocks to resume; running it from the start")
        else:
            log(f"--resume: no checkpoint at {checkpoint.path}; starting from scratch")
    elif checkpoint.path.exists():
        if checkpoint.exists():
            log(f"--overwrite: discarding the checkpoint at {checkpoint.path}")
        checkpoint.remove()
    return checkpoint


@contextlib.contextmanager
def _saying_what_is_kept(checkpoint: Checkpoint, distillation: bool = False) -> Iterator[None]:
    """Re-raise Ctrl-C inside the block as the note naming what the checkpoint holds, when it holds
    something (of the distillation, with `distillation`); a plain interrupt otherwise."""
    try:
        yield
    except KeyboardInterrupt as exc:
        saved = checkpoint.last_distill_iteration is not None if distillation else True
        note = _interrupted(checkpoint) if saved else None
        if note is None:
            raise
        raise note from exc


def _interrupted(checkpoint: Checkpoint) -> KeyboardInterrupt | None:
    """The Ctrl-C note naming what the checkpoint holds (None when nothing was saved yet)."""
    if checkpoint.last_distill_iteration is not None:
        saved = f"distillation saved at iteration {checkpoint.last_distill_iteration} in {checkpoint.path}"
    elif (point := checkpoint.last_saved or checkpoint.resume) is not None:
        saved = f"{point.describe()}, saved in {checkpoint.path}"
    else:
        return None
    return KeyboardInterrupt(f"interrupted; {saved}: rerun the same command with --resume to continue.")


def compress(config: CompressConfig, out: Path, overwrite: bool = False, progress: bool = True,
             resume: bool = False, log: Callable[[str], None] = print) -> CompressResult:
    """Compress `config.model` into an artifact at `out`.

    brecq and pqcad save a checkpoint after every finished block in ``<out>.checkpoint/``
    (:mod:`pqcad_deploy.checkpoint`), removed once the artifact is written. `resume` continues from
    it and gives the same artifact as an uninterrupted run; without `resume` an existing checkpoint
    is refused unless `overwrite` (which discards it). `log` receives the one-line notes about it.
    """
    check_output_dir(out, overwrite)  # before the lock: a refused output must not get a lock file beside it
    if config.distill:  # before any work: an hour of compressing must not end on missing FID weights
        metric, note = resolve_guard_metric(config.guard, config.device)
        config = dataclasses.replace(config, guard=metric)  # the artifact records the check that ran
        if note:
            log(note)
    with output_lock(out), _exact_cuda_numerics(config.device):
        return _compress(config, out, overwrite, progress, resume, log)


@contextlib.contextmanager
def _exact_cuda_numerics(device: str):
    """cuDNN in deterministic mode and no TF32 while compressing on a GPU.

    Block reconstruction is chaotic (AdaRound's rounding decisions flip on tiny differences), so
    nondeterministic kernels made two GPU runs with the same seed end at very different students
    (docs/RESULTS.md section 5); TF32 convolutions would also round every reconstruction step to
    10 mantissa bits. The previous settings come back afterwards.
    """
    if device != "cuda":
        yield
        return
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32)
    cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = True, False, False, False
    try:
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark, cudnn.allow_tf32, matmul.allow_tf32 = saved


def _compress(config: CompressConfig, out: Path, overwrite: bool, progress: bool, resume: bool,
              log: Callable[[str], None]) -> CompressResult:
    out = Path(out)  # compress() has checked it, before taking its lock
    check_checkpoint_dir(checkpoint_dir(out), resume, overwrite)
    device = _resolve_device(config.device)
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    settings = config.settings  # resolved once: every stage below reads these, the report records them
    prompts = read_prompt_file(config.prompt_file) if config.prompt_file is not None else None
    loaded = load_model(config.model).to(device)
    fp_unet = loaded.unet.eval()
    ucfg = dict(fp_unet.config)
    # before the checkpoint and any slow step: the guidance options may be refused
    conditioning = conditioning_for(loaded, config.guidance_scale, config.null_class, prompts)
    checkpoint = _open_checkpoint(config, settings, fp_unet, out, resume, log)
    sample_size = ucfg["sample_size"]
    h, w = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
    image_shape = (int(ucfg["in_channels"]), int(h), int(w))
    plan, plan_report = layer_plan(fp_unet, config)  # before the slow part: the budget may be refused
    plan_report["precision_policy"] = precision_policy_report(
        fp_unet, image_shape, uniform_plan(fp_unet, config.weight_bits, config.act_bits), config.precision_policy,
        config.keep_float)
    cal_cfg = config.calibration_config  # pqcad: normally distributed timesteps (C_QC, docs/ARCHITECTURE.md, The method)
    if checkpoint.resume is not None:  # the interrupted run's own set, bit for bit
        calibration = checkpoint.calibration()
    else:
        calibration = collect_qc_calibration(
            fp_unet, loaded.scheduler_config, image_shape, config.teacher_steps, cal_cfg,
            seed=config.seed, device=device, progress=progress, conditioning=conditioning)
    checkpoint.use_calibration(calibration)
    teacher_state = fp_unet.state_dict()  # before any rewrite: the rewrites replace modules, never edit these
    plan, plan_report["rewrites"] = _apply_rewrites(config, fp_unet, plan, calibration, cal_cfg.batch_size, device)
    with _saying_what_is_kept(checkpoint):
        student, method_report = _run_method(config, settings, fp_unet, plan, calibration, cal_cfg.batch_size,
                                             device, progress, checkpoint)
    if method_spec(config.method).learns_activation_scales and config.act_scale_check:
        method_report["act_scale_check"] = _check_act_scales(config, settings, fp_unet, student, calibration,
                                                             loaded.scheduler_config, cal_cfg.batch_size, device,
                                                             conditioning, loaded.decode)
    if config.bias_correction:
        method_report["bias_correction"] = _correct_biases(config, fp_unet, student, calibration,
                                                           loaded.scheduler_config, image_shape, device, progress,
                                                           conditioning)
    report = quantization_report(fp_unet, student, calibration, cal_cfg.batch_size, device)
    report.update(method_report)
    report.update(plan_report)
    report["method"] = config.method
    report["conditioning"] = conditioning.to_dict()
    report["preset_settings"] = preset_to_dict(settings)
    timesteps = ddim_timesteps(loaded.scheduler_config, config.teacher_steps)
    if config.distill:
        with _saying_what_is_kept(checkpoint, distillation=True):
            student, report["distillation"], timesteps = distill_rounds(
                config, student, fp_unet, loaded.scheduler_config, image_shape, device, progress, checkpoint,
                resume, log, settings=settings, conditioning=conditioning, decode=loaded.decode)
    layers = {name: LayerRecord(kind=r["kind"], weight_bits=r["weight_bits"], act_bits=r["act_bits"],
                                weight_shape=list(quant_layers(student)[name].weight.shape))
              for name, r in report["layers"].items()}
    unet_config = {k: v for k, v in ucfg.items() if not k.startswith("_")}
    manifest = ArtifactManifest(
        options=config_to_dict(config),  # method, teacher_steps and distill among them
        unet_class=type(fp_unet).__name__,
        unet_config=_jsonable(unet_config),
        scheduler_config=loaded.scheduler_config,  # its prediction_type is the artifact's
        image_shape=list(image_shape),
        student_timesteps=timesteps,
        layers=layers,
        calibration=calibration.description,
        provenance=provenance(config.seed, loaded.source, loaded.unet_dir, loaded.root),
    )
    save_artifact(out, manifest, student_state_from_model(student), teacher_state, report, overwrite=overwrite)
    checkpoint.remove()
    return CompressResult(artifact=out, seconds=time.perf_counter() - started,
                          noise_pred_sqnr_db=report["noise_pred_sqnr_db"], num_quantized_layers=len(layers),
                          student_steps=len(timesteps), distilled=config.distill,
                          distill_guard=report["distillation"]["guard"] if config.distill else None)


def _apply_rewrites(config: CompressConfig, fp_unet: torch.nn.Module, plan: dict[str, LayerBits],
                    calibration: CalibrationSet, batch_size: int, device: str) -> tuple[dict[str, LayerBits], dict]:
    """The float-equivalent rewrites of `fp_unet` in place (quant.rewrites); (plan under the new names, report).

    Only layers whose input the plan quantizes are rewritten: the rewrites exist for the input scale.
    The FP model used as the reference from here on has the same structure as the student, so the
    layer-wise reconstruction and analysis pair the layers by name.
    """
    from pqcad_deploy.quant import rewrites as R

    quantized_input = {n for n, bits in plan.items() if bits.act_bits is not None}
    split = R.split_concat_inputs(fp_unet, config.split_concat, only=quantized_input)
    plan = split.translate_plan(plan)
    report: dict = {"split_concat": config.split_concat, "split_layers": sorted(split.renamed)}
    if config.smoothquant_alpha is not None:
        linears = [n for n in sorted(quantized_input & plan.keys())
                   if isinstance(fp_unet.get_submodule(n), torch.nn.Linear)]
        smooth = R.smooth_linears(fp_unet, linears)
        plan = smooth.translate_plan(plan)
        report["smoothquant"] = {"alpha": config.smoothquant_alpha,
                                 "layers": R.fit_smoothing(fp_unet, calibration, config.smoothquant_alpha,
                                                           batch_size, device)}
    return plan, report


def _bias_correction_data(config: CompressConfig, fp_unet: torch.nn.Module, student: torch.nn.Module,
                          calibration: CalibrationSet, scheduler_config: dict, image_shape: tuple[int, int, int],
                          device: str, progress: bool, conditioning: Conditioning) -> CalibrationSet:
    """The (x_t, t) pairs the bias correction estimates on (``config.bias_correction_data``).

    The trajectory variants keep the calibration set's counts (trajectories, kept timesteps) and seed,
    with the kept timesteps evenly spread: the sampler visits every step once.
    """
    if config.bias_correction_data == "calibration":
        return calibration
    from pqcad_deploy.calibration.trajectories import collect_trajectory_calibration

    spread = dataclasses.replace(config.calibration_config, timestep_sampling="uniform", selection="none")
    unet = fp_unet if config.bias_correction_data == "fp-uniform" else student
    return collect_trajectory_calibration(unet, make_ddim_scheduler(scheduler_config, config.teacher_steps), image_shape,
                                          spread, seed=config.seed, device=device, progress=progress,
                                          conditioning=conditioning)


def _correct_biases(config: CompressConfig, fp_unet: torch.nn.Module, student: torch.nn.Module, calibration,
                    scheduler_config: dict, image_shape: tuple[int, int, int], device: str, progress: bool,
                    conditioning: Conditioning) -> dict:
    """Bias correction of every quantized layer and of the last conv (quant.bias_correction), before CAD.

    conv_out is corrected even when it stays float: its output is the noise prediction, where any
    remaining mean shift of the network shows up as a colour cast.
    """
    from pqcad_deploy.layer_precision import LAST_LAYER
    from pqcad_deploy.quant.bias_correction import correct_biases

    data = _bias_correction_data(config, fp_unet, student, calibration, scheduler_config, image_shape, device,
                                 progress, conditioning)
    names = list(quant_layers(student))
    if LAST_LAYER not in names and LAST_LAYER in dict(student.named_modules()):
        names.append(LAST_LAYER)
    report = correct_biases(fp_unet, student, names, data, device=device, progress=progress)
    return {"data": config.bias_correction_data, **report}


def _check_act_scales(config: CompressConfig, settings: PresetSettings, fp_unet: torch.nn.Module,
                      student: torch.nn.Module, calibration, scheduler_config: dict, batch_size: int,
                      device: str, conditioning: Conditioning, decode: Decode | None) -> dict:
    """Stage 2's learned activation scales against its starting ones on sampled images (act_scale_check)."""
    from pqcad_deploy.act_scale_check import keep_better_activation_scales

    return keep_better_activation_scales(fp_unet, student, calibration, scheduler_config, config.teacher_steps,
                                         config.activation_scale_init, batch_size, settings.scale_check,
                                         seed=config.seed, device=device, conditioning=conditioning, decode=decode)


def _jsonable(value):
    import json

    return json.loads(json.dumps(value, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))
