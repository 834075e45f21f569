"""pqcad-deploy: compress a diffusers UNet, export QDQ ONNX, build an engine, sample images.

A thin click group: each command parses and checks its flags, calls one library function, and
prints a short summary. Heavy imports stay inside the commands, so `sample` and `build-engine`
never load torch (a Jetson install has no torch). Every error a user can cause ends as one line
`error: ...` on stderr and a non-zero exit: 2 for bad usage, 1 for everything else.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

__all__ = ["main", "cli"]

_EPILOG = "Docs: README.md and docs/CONTRACTS.md in the pqcad-deploy repository."


def _quiet_option(f):
    return click.option("--quiet", is_flag=True, help="No progress bars (summaries are still printed).")(f)


def _overwrite_option(f):
    return click.option("--overwrite", is_flag=True,
                        help="Replace an existing output that pqcad-deploy wrote (recognised by its marker file); "
                             "anything else is refused.")(f)


SEED_MAX = 2**32 - 1
SEED = click.IntRange(0, SEED_MAX)
"""Every verb's --seed: numpy's and torch's generators both take this range, and one range means one
seed works the same in every command."""
POSITIVE = click.IntRange(min=1)
"""Counts, steps, batch sizes, thread counts."""


class _StageChoice(click.Choice):
    """A click.Choice over one tuple of :mod:`pqcad_deploy.choices`, read when first needed.

    Validation, ``--help`` and the message all use that tuple (no second list to keep in step), and
    defining compress's options imports nothing: ``sample`` and ``build-engine`` stay free of
    pqcad_deploy. A bad value is a usage error (exit 2) worded like the library's own check:
    ``--method must be one of minmax, brecq, pqcad; got 'x'.``
    """

    def __init__(self, name: str) -> None:  # click.Choice.__init__ would read the tuple now
        self._name = name
        self.case_sensitive = True

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        try:
            from pqcad_deploy import choices  # torch-free: present in every install, runtime-only too
        except ImportError:  # only where the package itself is missing: --help still works
            return ()
        return tuple(getattr(choices, self._name))

    def convert(self, value, param, ctx):
        if value in self.choices:
            return value
        flag = param.opts[0] if param is not None and param.opts else self._name.lower()
        raise click.UsageError(f"{flag} must be one of {', '.join(self.choices)}; got {value!r}.", ctx)


@click.group(epilog=_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pqcad-deploy")
def cli() -> None:
    """Compress diffusion UNets with PQCAD-DM and deploy them with ONNX Runtime or TensorRT.

    \b
    The whole path:
      pqcad-deploy compress --out art            # FP UNet -> compressed artifact
      pqcad-deploy export art --onnx model.onnx  # artifact -> QDQ ONNX
      pqcad-deploy build-engine model.onnx -o engine
      pqcad-deploy sample engine -n 64 -o images
      pqcad-deploy eval fid images               # FID of those 64 images (seconds; 10,000 for a real score)
    """


def _guard_scores(guard: dict) -> str:
    """The guard's two scores as compress's summary shows them, in its metric's terms."""
    versus = f"vs FP-{guard['reference_steps']}"
    if guard.get("metric") == "fid":
        return f"FID {versus} {guard['fid_distilled']:.2f} distilled, {guard['fid_undistilled']:.2f} undistilled"
    return (f"PSNR {versus} {guard['psnr_distilled_db']:.2f} dB distilled, "
            f"{guard['psnr_undistilled_db']:.2f} dB undistilled")


@cli.command(epilog=_EPILOG)
@click.option("--model", default="builtin", show_default=True,
              help="A local diffusers UNet2DModel directory (config.json + weights + scheduler_config.json, "
                   "or a pipeline folder with unet/ and scheduler/), a hub id where a hub is reachable, "
                   "'builtin' for the embedded Fashion-MNIST model, 'builtin:cifar10' for the embedded "
                   "colour CIFAR-10 model, or 'builtin:cifar10-latent' for the embedded class-conditional latent "
                   "pipeline (CIFAR-10's classes: --guidance-scale 3).")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Artifact directory to write (created atomically).")
@click.option("--method", default="pqcad", show_default=True, type=_StageChoice("METHODS"),
              help="Compression method. pqcad: PQ, block reconstruction down a bit ladder (8 -> 6 -> 4) with "
                   "momentum-based transitions, first/last conv at 8-bit weights, then CAD (see --distill). "
                   "Baselines: minmax, fixed-bit symmetric PTQ (per-channel weights, per-tensor activations); "
                   "brecq, block reconstruction at fixed bits (AdaRound rounding, learned scales).")
@click.option("--weight-bits", default=8, show_default=True, type=int, help="Weight bits of every quantized layer: 8 or 4.")
@click.option("--act-bits", default=8, show_default=True, type=int, help="Activation bits of every quantized layer: 8 or 4.")
@click.option("--teacher-steps", default=100, show_default=True, type=POSITIVE,
              help="DDIM steps of the FP teacher, 2-1000; the calibration trajectories use this grid.")
@click.option("--preset", default="default", show_default=True, type=_StageChoice("PRESETS"),
              help="fast: a tiny calibration set (tests, demos; under a minute on a CPU). default: the full one.")
@click.option("--device", default="cpu", show_default=True, type=_StageChoice("DEVICES"),
              help="Where the PyTorch work runs: cpu or cuda.")
@click.option("--seed", default=0, show_default=True, type=SEED,
              help=f"Seed of the calibration noise, 0 to {SEED_MAX}; same seed, same artifact (byte for byte).")
@click.option("--distill/--no-distill", default=True, show_default=True,
              help="CAD: after quantization, distil the student against the FP teacher to sample in half "
                   "the teacher's steps (needs an even --teacher-steps); the artifact records the student's "
                   "timesteps and sample uses them with no flag. --no-distill: quantization alone, sampled "
                   "with the teacher's steps.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted brecq / pqcad run from its per-block checkpoint OUT.checkpoint/ "
                   "(same options needed; the artifact equals an uninterrupted run's). Without a checkpoint, "
                   "or for minmax: start from scratch.")
@click.option("--avg-weight-bits", default=None, type=float,
              help="Mixed precision (needs --weight-bits 4): the first and last conv stay at 8 bits and the "
                   "layers with the most outlier-heavy weight channels (kurtosis, MPQ-DM) are raised to 8 "
                   "bits while the parameter-weighted average weight bits stay <= this budget (a number in "
                   "(4, 8], e.g. 4.5). Same plan for every method. Default: off (uniform bits).")
@click.option("--first-last", default=None, type=_StageChoice("FIRST_LAST_POLICIES"),
              help="Precision of the first and last conv (conv_in, conv_out). w8-fp-input: 8-bit weights, "
                   "input left in float (no Q/DQ; costs no speed, these layers have 1 input or 1 output "
                   "channel). w8a8: 8-bit weights and inputs. target: the same bits as every other layer. "
                   "Default: target for minmax (the plain baseline), w8-fp-input for brecq and pqcad.")
@click.option("--precision-policy", default="all", show_default=True,
              type=_StageChoice("PRECISION_POLICY_NAMES"),
              help="Which layers stay float altogether (no Q/DQ, float weights). all: every Conv2d and Linear "
                   "quantizes. tensorrt-safe: NVIDIA ModelOpt's diffusers exclusions, the time-embedding path "
                   "and the shortcut convs (about 4% of the MACs on the builtin models; report.json, "
                   "precision_policy, lists each layer's share).")
@click.option("--keep-float", "keep_float", multiple=True, metavar="PATTERN",
              help="Also keep these layers float: a shell pattern over the layer name, e.g. "
                   "'mid_block.*' or '*attentions*' (repeatable; a pattern matching no layer is an error).")
@click.option("--bias-correction/--no-bias-correction", default=False, show_default=True,
              help="Fold each quantized layer's mean output error per channel, measured on the FP "
                   "trajectories, into its bias. Measured: removes the CIFAR-10 model's colour drift at W8A8 "
                   "but brightens the Fashion-MNIST model's images, hence off by default (RESULTS section 15).")
@click.option("--bias-correction-data", default="calibration", show_default=True,
              type=_StageChoice("BIAS_CORRECTION_DATA"),
              help="With --bias-correction: estimate the mean errors on the calibration set, on the FP model's "
                   "trajectories with evenly spread timesteps (fp-uniform), or on the student's own (student).")
@click.option("--rounds", default=1, show_default=True, type=int,
              help="CAD rounds: each halves the sampling steps again (--teacher-steps 20 --rounds 2: 20 -> 10 -> 5), "
                   "the next round's teacher being the previous round's student; each round is checked "
                   "against plain step halving and checkpointed.")
@click.option("--guard", default="auto", show_default=True, type=_StageChoice("GUARD_METRICS"),
              help="How each CAD round's student is judged against plain step halving, both against FP at the "
                   "teacher's steps: psnr (mean per-image PSNR of 32 images; any device), fid (FID of 2,000 "
                   "images per student, with the FID weights; meant for a GPU) or auto (fid with --device cuda "
                   "where the FID weights are installed, else psnr). Measured: the FID guard's choices scored "
                   "better in 3 of 8 round decisions, worse in 1 (docs/RESULTS.md section 24).")
@click.option("--guidance-scale", default=1.0, show_default=True, type=float,
              help="Class-conditional models: classifier-free guidance scale of the FP trajectories the student is "
                   "calibrated on (eps_u + w (eps_c - eps_u)); 1 turns guidance off. Recorded in the artifact.")
@click.option("--null-class", default=None, type=int, metavar="LABEL",
              help="Class-conditional models: the label the model was trained with for 'no class' (the "
                   "unconditional half of guidance; pqcad-deploy takes it to be the last label). Needed for "
                   "--guidance-scale above 1.")
@click.option("--prompt-file", default=None, type=click.Path(path_type=Path, dir_okay=False), metavar="FILE",
              help="Text-conditional pipelines (Stable Diffusion): prompts, one per line, that the calibration and "
                   "distillation trajectories are drawn with (sample i uses prompt i mod count); use the kind of "
                   "prompts the model will be sampled with.")
@click.option("--split-concat", default="none", show_default=True, type=_StageChoice("SPLIT_CONCAT"),
              help="Up-block resnets read cat([h, skip]), two halves with very different ranges: compute the "
                   "convs that read it as two convs and an Add, each half with its own INT8 scale "
                   "(Q-Diffusion's split shortcut; runs in TensorRT). shortcut: the 1x1 conv_shortcut; "
                   "shortcut+conv1: and conv1.")
@click.option("--smoothquant-alpha", default=None, type=float, metavar="ALPHA",
              help="SmoothQuant for every Linear with a quantized input: move ALPHA in (0, 1) of the "
                   "activation's per-channel range into the weight (a Mul before the Q/DQ in the ONNX).")
@click.option("--act-scale-init", default=None, type=_StageChoice("ACT_SCALE_INITS"),
              help="brecq / pqcad stage 2: how activation scales start before they are learned: minmax "
                   "(largest |x| seen), percentile (99.99th of |x|) or mse (the clipping with the least "
                   "quantization error over the calibration set's timesteps). Default: mse (measured: better "
                   "FID on both builtin models, RESULTS section 15).")
@click.option("--act-scale-check/--no-act-scale-check", default=True, show_default=True,
              help="brecq / pqcad: after learning the activation scales, sample a few images with them and "
                   "with their starting scales and keep whichever is closer to the FP model's images (the "
                   "block losses cannot see the sampler drifting off the calibration data).")
@click.option("--layer-loss", is_flag=True,
              help="brecq / pqcad: add the per-layer output errors inside each block to the block "
                   "reconstruction loss (EDA-DM).")
@click.option("--timestep-sampling", default=None, type=_StageChoice("TIMESTEP_SAMPLINGS"),
              help="Calibration timesteps: uniform (evenly spread steps of every trajectory) or normal "
                   "(drawn from Normal(mean*T, std*T), snapped to the grid; PTQ4DM). Default: normal for "
                   "pqcad (its C_QC), uniform otherwise.")
@click.option("--timestep-mean", default=None, type=float,
              help="With normal timestep sampling: the mean as a fraction of T, in [0, 1] (default 0.4).")
@click.option("--timestep-std", default=None, type=float,
              help="With normal timestep sampling: the spread as a fraction of T, > 0 (default 0.3).")
@click.option("--calibration-selection", default="none", show_default=True,
              type=_StageChoice("CALIBRATION_SELECTIONS"),
              help="none: keep every drawn calibration pair. density_diversity: draw "
                   "--calibration-oversample times as many FP trajectories and keep as many pairs as "
                   "without it, picked by density and diversity of their mid-block features (EDA-DM).")
@click.option("--calibration-oversample", default=None, type=POSITIVE,
              help="With --calibration-selection density_diversity: candidates per kept pair, an integer "
                   ">= 2 (default 4; costs that many times the FP trajectories).")
@_overwrite_option
@_quiet_option
def compress(model, out, method, weight_bits, act_bits, teacher_steps, preset, device, seed, distill,
             resume, avg_weight_bits, first_last, precision_policy, keep_float, bias_correction, bias_correction_data,
             rounds, guard, guidance_scale, null_class, prompt_file, split_concat, smoothquant_alpha, act_scale_init,
             act_scale_check, layer_loss, timestep_sampling, timestep_mean,
             timestep_std, calibration_selection, calibration_oversample, overwrite, quiet) -> None:
    """Compress a diffusers UNet (pixel-space, or a latent pipeline's) into an artifact (codes, scales, configs, report)."""
    from pqcad_deploy.compress import compress as run_compress
    from pqcad_deploy.config import CompressConfig

    if calibration_oversample is not None and calibration_selection == "none":
        raise click.BadParameter("only applies with --calibration-selection density_diversity.",
                                 param_hint="--calibration-oversample")
    from pqcad_deploy.errors import ConfigError

    try:  # an option value or combination the config refuses is a usage error (exit 2), before any work
        config = CompressConfig(model=model, method=method, weight_bits=weight_bits, act_bits=act_bits,
                                teacher_steps=teacher_steps, preset=preset, device=device, seed=seed,
                                distill=distill, avg_weight_bits=avg_weight_bits, first_last=first_last,
                                act_scale_init=act_scale_init, layer_loss=layer_loss, act_scale_check=act_scale_check,
                                precision_policy=precision_policy, keep_float=tuple(keep_float),
                                bias_correction=bias_correction, bias_correction_data=bias_correction_data,
                                split_concat=split_concat, smoothquant_alpha=smoothquant_alpha, rounds=rounds,
                                guard=guard, guidance_scale=guidance_scale, null_class=null_class,
                                prompt_file=None if prompt_file is None else str(prompt_file))
        overrides: dict = {}
        if calibration_selection != "none":
            overrides["selection"] = calibration_selection
            if calibration_oversample is not None:
                overrides["selection_oversample"] = calibration_oversample
        if timestep_sampling is not None:
            overrides["timestep_sampling"] = timestep_sampling
        sampling = timestep_sampling or config.calibration_config.timestep_sampling
        for flag, name, value in (("--timestep-mean", "timestep_mean", timestep_mean),
                                  ("--timestep-std", "timestep_std", timestep_std)):
            if value is not None:
                if sampling != "normal":
                    raise click.BadParameter("only applies with normal timestep sampling (pqcad's default, or "
                                             "--timestep-sampling normal).", param_hint=flag)
                overrides[name] = value
        if overrides:
            import dataclasses

            config = dataclasses.replace(config, calibration=dataclasses.replace(config.calibration_config,
                                                                                 **overrides))
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    result = run_compress(config, out, overwrite=overwrite, progress=not quiet, resume=resume, log=click.echo)
    mixed = "" if avg_weight_bits is None else f" mixed to <= {avg_weight_bits:g} average weight bits"
    steps = (f"distilled to {result.student_steps} steps" if result.distilled
             else f"{result.student_steps} steps, not distilled")
    judged = result.distill_guard
    if judged is not None:
        steps += f" (guard kept the {judged['kept']} student: {_guard_scores(judged)})"
    click.echo(f"wrote {result.artifact} ({method} W{weight_bits}A{act_bits}{mixed}, {result.num_quantized_layers} "
               f"quantized layers, {steps}, noise-prediction SQNR {result.noise_pred_sqnr_db:.1f} dB"
               f"{' before distillation' if result.distilled else ''}, {result.seconds:.1f} s)")


# export / build-engine choices. The export tuples are converters.export_onnx's TARGETS and
# WEIGHT_STORAGES, written out because converters imports torch and build-engine / sample must not
# (tests/test_cli.py checks that they stay equal); the others come from torch-free engines modules.
_EXPORT_TARGETS: tuple[str, ...] = ("onnxruntime", "qdq", "ort-x86", "ort-qlinear", "tensorrt")
_WEIGHT_STORAGES: tuple[str, ...] = ("auto", "int4", "int8")
_VAE_PRECISIONS: tuple[str, ...] = ("auto", "fp32", "fp16")
"""converters.export_parts.VAE_PRECISION_CHOICES, written out for the same reason."""
from pqcad_deploy.engines.manifest import BACKENDS as _BACKENDS  # noqa: E402  (torch-free, a few ms)
from pqcad_deploy.engines.manifest import ORT_PROVIDERS as _ORT_PROVIDERS  # noqa: E402

_PORTABLE_LEVELS: tuple[str, ...] = ("basic", "extended")
"""build-engine's levels: engines.build's OPTIMIZATION_LEVELS less 'disabled' (nothing saved worth an engine)
and 'all' (layouts specific to the building CPU)."""


@cli.command(epilog=_EPILOG)
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--onnx", "onnx_path", required=True, type=click.Path(path_type=Path), help="ONNX file to write.")
@click.option("--fp", is_flag=True, help="Export the artifact's full-precision teacher instead of the quantized student.")
@click.option("--opset", default=None, type=click.IntRange(13, 21),
              help="ONNX opset, 13-21. Default: 19 for --target tensorrt (its lowest: FP16 Q/DQ scales), else 17. "
                   "4-bit activations need 21, and so do --target tensorrt's blocked INT4 MatMul weights.")
@click.option("--target", default="onnxruntime", show_default=True, type=click.Choice(_EXPORT_TARGETS),
              help="onnxruntime: the fastest form for build-engine's default backend, chosen per artifact and "
                   "printed: ort-qlinear when every quantized layer has 8-bit activations, else qdq (ONNX "
                   "Runtime has no 4-bit kernels). qdq: int8 symmetric Q/DQ on every quantized layer, float32, "
                   "the student exactly (ONNX Runtime runs its Conv layers in float). tensorrt: for build-engine "
                   "--backend tensorrt: an FP16 graph (FP32 inputs/outputs) with one int8 Q/DQ per tensor, Q/DQ "
                   "on the residual Adds' second input (scales calibrated at export) and the upsamplers' "
                   "Resize, float-input layers as FP16 weights, 4-bit conv weights in INT8 containers and, at "
                   "--opset 21, 4-bit MatMul weights as blocked INT4; 8-bit activations only; parity: output "
                   "within 5e-2 relative L2 of the student (FP16). ort-x86: the same values for ONNX Runtime's x86 CPU integer kernels: "
                   "each quantized Conv as ConvInteger (int8 activations, uint8 weights + 128) and MatMul inputs "
                   "as uint8 with zero-point 128 (fused to MatMulIntegerToFloat); 8-bit activations only. Exact "
                   "on CPUs with VNNI; parity is then checked on the optimized graph. ort-qlinear: faster on "
                   "ONNX Runtime's CPU, one extra rounding: each quantized Conv's output is rounded to int8 "
                   "(scale calibrated at export on the student's own DDIM trajectories) and its bias to int32, "
                   "so ONNX Runtime fuses QLinearConv; 8-bit activations only; parity is checked against the "
                   "PyTorch model with the same roundings, on the optimized graph.")
@click.option("--weight-storage", default="auto", show_default=True, type=click.Choice(_WEIGHT_STORAGES),
              help="How 4-bit weight codes are stored. int4: ONNX INT4 initializers, two codes a byte (needs "
                   "--opset 21 and --target qdq or tensorrt; tensorrt stores only MatMul weights so, blocked, since "
                   "TensorRT has no INT4 convolution). int8: an INT8 container (any opset). auto: int4 for --target "
                   "qdq or tensorrt at --opset 21, else int8.")
@click.option("--parity/--no-parity", default=True, show_default=True,
              help="Before the ONNX is moved into place, compare ONNX Runtime with the PyTorch fake-quant model "
                   "on 4 inputs and print pass or fail. It fails on any nan/inf; on an input whose codes all "
                   "agree, a relative L2 error above 1e-5; in the first layer whose codes differ, more than "
                   "1e-3 of its codes differing or any by more than one step. --no-parity: skip the check.")
@click.option("--parity-gate/--no-parity-gate", default=True, show_default=True,
              help="A failed parity check writes nothing and exits 1. --no-parity-gate: write the ONNX anyway "
                   "and print a warning.")
@click.option("--pipeline", default=None, type=click.Path(path_type=Path, file_okay=False), metavar="DIR",
              help="Latent artifacts: the diffusers pipeline folder the artifact was compressed from (default: the "
                   "folder it records). Its VAE decoder, and its text encoder + tokenizer (Stable Diffusion) or "
                   "class table (class-embedding pipelines), are written into NAME.parts/ beside the ONNX, listed "
                   "in its manifest with their checksums; build-engine carries them into the engine.")
@click.option("--vae-precision", default="auto", show_default=True, type=click.Choice(_VAE_PRECISIONS),
              help="Latent artifacts: the VAE decoder ONNX's precision. auto: fp16 for --target tensorrt (TensorRT "
                   "runs a strongly typed graph in its own types), fp32 otherwise (exact, and faster on ONNX "
                   "Runtime's CPU, which has few FP16 kernels).")
@_overwrite_option
def export(artifact, onnx_path, fp, opset, target, weight_storage, parity, parity_gate, pipeline, vae_precision,
           overwrite) -> None:
    """Write an artifact as QDQ ONNX, with the learned codes and scales as they are (a latent artifact's VAE
    decoder and conditioning parts beside it)."""
    from pqcad_deploy.converters.export_onnx import export_onnx

    result = export_onnx(artifact, onnx_path, fp=fp, opset=opset, overwrite=overwrite, target=target,
                         weight_storage=weight_storage, parity=parity, parity_gate=parity_gate, pipeline=pipeline,
                         vae_precision=vae_precision)
    extra = "" if result.target == "qdq" else f", target {result.target}"
    extra += f", {result.int4_weight_layers} with INT4 weights" if result.int4_weight_layers else ""
    extra += f", {result.conditioning.describe()}" if result.conditioning is not None else ""
    if result.calibration_seconds and result.rewrite is None:
        extra += f", Conv output scales calibrated in {result.calibration_seconds:.1f} s"
    click.echo(f"wrote {result.path} ({result.precision}, opset {result.opset}, "
               f"{result.num_quantized_layers} Q/DQ layers{extra}, {result.size_bytes / 1e6:.2f} MB)")
    if result.rewrite is not None:
        click.echo(f"{result.target}: {result.rewrite}")
    if result.requested_target != result.target and not fp:
        tensorrt = "" if result.target == "tensorrt" else "; for --backend tensorrt export with --target tensorrt"
        click.echo(f"target {result.requested_target}: {result.target} ({result.target_reason}{tensorrt})")
    if result.parts is not None:
        click.echo(f"parts: {result.parts.describe()}")
    if result.parity is not None:
        click.echo(f"parity vs PyTorch: {result.parity}")
    for part in () if result.parts is None else result.parts.parity:
        click.echo(f"parity of the {part.kind} vs PyTorch: {part}")
    failed = [v for v in (result.parity, *(() if result.parts is None else result.parts.parity))
              if v is not None and not v.passed]
    if failed:
        click.echo(f"warning: {result.path} failed the parity check and was written because of "
                   "--no-parity-gate; do not deploy it without finding out why.", err=True)


@cli.command("build-engine", epilog=_EPILOG)
@click.argument("onnx_path", metavar="ONNX", type=click.Path(path_type=Path))
@click.option("--backend", default="onnxruntime", show_default=True, type=click.Choice(_BACKENDS),
              help="onnxruntime (everywhere) or tensorrt (NVIDIA GPUs and Jetson; needs TensorRT 10 and an ONNX "
                   "exported with --target tensorrt).")
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Engine directory to write.")
@click.option("--optimization-level", default="extended", show_default=True, type=click.Choice(_PORTABLE_LEVELS),
              help="onnxruntime graph optimization saved into the engine: basic or extended (portable levels; "
                   "ONNX Runtime's 'all' adds layouts specific to the building CPU). --provider cpu only.")
@click.option("--provider", default="cpu", show_default=True, type=click.Choice(_ORT_PROVIDERS),
              help="--backend onnxruntime's execution provider, recorded in the engine so sample runs there. cpu: "
                   "the engine holds ONNX Runtime's CPU-optimized graph. cuda, tensorrt: ONNX Runtime's CUDA or "
                   "TensorRT provider on an NVIDIA GPU (needs onnxruntime-gpu, see docs/JETSON.md); the engine "
                   "holds the exported graph, which ONNX Runtime optimizes for the provider when sample loads "
                   "it; tensorrt runs Q/DQ layers in INT8 and caches its TensorRT engines in ENGINE/trt_cache/. "
                   "A provider this onnxruntime lacks is refused.")
@_overwrite_option
@click.pass_context
def build_engine(ctx, onnx_path, backend, out, optimization_level, provider, overwrite) -> None:
    """Build an engine directory (optimized model + manifest) from an ONNX written by export."""
    def given(name: str) -> bool:
        return ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT

    if backend == "tensorrt":
        for flag, name in (("--provider", "provider"), ("--optimization-level", "optimization_level")):
            if given(name):
                raise click.BadParameter("applies to --backend onnxruntime only (TensorRT optimizes the whole "
                                         "graph itself); leave it out.", param_hint=flag)
    elif provider != "cpu" and given("optimization_level"):
        raise click.BadParameter(f"applies to --provider cpu only (a {provider} engine holds the exported graph, "
                                 "optimized by ONNX Runtime for its provider when sample loads it); leave it out.",
                                 param_hint="--optimization-level")
    started = time.perf_counter()
    from pqcad_deploy.engines.backends import build_engine as build

    onnxruntime = backend == "onnxruntime"
    manifest = build(backend, onnx_path, out, overwrite=overwrite,
                     optimization_level=optimization_level if onnxruntime and provider == "cpu" else None,
                     provider=provider if onnxruntime else None)
    where = f" on {manifest.ort_provider}" if manifest.ort_provider not in (None, "cpu") else ""
    conditioned = "" if manifest.onnx.conditioning is None else f", {manifest.onnx.conditioning.describe()}"
    roles = list(dict.fromkeys(p.role for p in manifest.onnx.parts))
    carried = f", parts: {', '.join(roles)}" if roles else ""
    click.echo(f"wrote {out} ({manifest.backend}{where}, {manifest.onnx.precision}, "
               f"{manifest.onnx.student_steps} sampling steps{conditioned}{carried}, "
               f"{time.perf_counter() - started:.1f} s)")
    if manifest.tensorrt is not None:  # where the plan runs, what runs in INT8, and how to build it by hand
        from pqcad_deploy.engines.tensorrt_options import LAYER_REPORT_FILE
        from pqcad_deploy.engines.tensorrt_report import read_layer_report

        built = manifest.tensorrt
        click.echo(f"built with TensorRT {built.tensorrt_version} on {built.gpu_name} "
                   f"(compute capability {built.compute_capability})")
        for line in read_layer_report(Path(out) / LAYER_REPORT_FILE).lines():
            click.echo(line)
        click.echo(f"trtexec equivalent: {built.trtexec_command}")


from pqcad_deploy.engines.onnx_findings import CHECK_TARGETS as _CHECK_TARGETS  # noqa: E402  (no onnx, no numpy)


@cli.command("check", epilog=_EPILOG)
@click.argument("onnx_path", metavar="ONNX", type=click.Path(path_type=Path))
@click.option("--target", required=True, type=click.Choice(_CHECK_TARGETS),
              help="The runtime whose rules apply: tensorrt (what build-engine --backend tensorrt refuses on "
                   "errors, plus warnings for lost INT8 fusions and FP32 math) or onnxruntime.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the findings (rule, severity, node, message, reference) and a summary as JSON.")
@click.pass_context
def check(ctx, onnx_path, target, as_json) -> None:
    """Check an ONNX graph against TensorRT's or ONNX Runtime's Q/DQ rules, statically (no TensorRT needed).

    Prints one line per finding, `rule-id severity node: message (see URL)`, then a summary line.
    Exits 1 when any finding is an error (build-engine --backend tensorrt refuses those), 0 otherwise.
    The rules and their sources: docs/CHECKER.md.
    """
    from pqcad_deploy.engines.onnx_check import check_onnx, format_human, format_json

    findings = check_onnx(onnx_path, target)
    click.echo((format_json if as_json else format_human)(findings, target, str(onnx_path)))
    if any(f.severity == "error" for f in findings):
        ctx.exit(1)


@cli.command(epilog=_EPILOG)
@click.argument("engine", type=click.Path(path_type=Path))
@click.option("-n", "num_images", default=64, show_default=True, type=POSITIVE,
              help="Number of images (any number: memory does not grow with it).")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Seed of the initial noise.")
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path),
              help="Directory for 00000.png ..., samples.json and grid.png. Images are written as they are "
                   "made into OUT.partial/, which becomes OUT when all are there.")
@click.option("--steps", default=None, type=POSITIVE,
              help="DDIM steps; default: the engine's own student timesteps.")
@click.option("--npz", default=None, type=click.Path(path_type=Path),
              help="Also write the images as a uint8 array (key 'images', N x H x W x C), built at the end "
                   "from the PNGs one at a time.")
@click.option("--batch-size", default=16, show_default=True, type=POSITIVE,
              help="Images per model call; never changes the images (calls are padded to a multiple of 8).")
@click.option("--threads", default=None, type=POSITIVE, help="ONNX Runtime intra-op threads (default: all cores).")
@click.option("--grid/--no-grid", default=True, show_default=True,
              help="Write grid.png of the first 64 images (8 x 8).")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run from OUT.partial/ (same engine, seed, steps and conditioning): "
                   "finished images are kept and the result equals an uninterrupted run's.")
@click.option("--class", "class_labels", default=None, metavar="LABELS",
              help="Class-conditional and class-embedding engines: comma-separated class labels (e.g. 3 or 0,4,7) "
                   "cycled over the images (image i gets the (i mod count)-th). Default: image i gets class i mod "
                   "num_classes, as PyTorch sampling (and FID) does. Recorded in samples.json.")
@click.option("--prompt", "prompts", multiple=True, metavar="TEXT",
              help="Text-conditional engines (Stable Diffusion): a prompt; repeat it for several, cycled over the "
                   "images (image i gets the (i mod count)-th). Each distinct prompt is encoded once by the "
                   "engine's text encoder (and the empty prompt, for guidance). Recorded in samples.json.")
@click.option("--prompt-file", default=None, type=click.Path(path_type=Path, dir_okay=False), metavar="FILE",
              help="Text-conditional engines: prompts, one per line (blank lines skipped), cycled like --prompt.")
@click.option("--guidance-scale", default=None, type=float, metavar="W",
              help="Conditional engines: classifier-free guidance scale, eps_u + W (eps_c - eps_u); 1 turns it off "
                   "(one model call per step instead of two); above 1 needs the model's null class. Default: "
                   "the scale the student was calibrated at (engine.json's conditioning). Recorded in "
                   "samples.json.")
@_overwrite_option
@_quiet_option
def sample(engine, num_images, seed, out, steps, npz, batch_size, threads, grid, resume, class_labels, prompts,
           prompt_file, guidance_scale, overwrite, quiet) -> None:
    """Generate images with DDIM (eta 0) on an engine; numpy only, no torch.

    A latent engine samples latents and decodes them through its VAE decoder; a text-conditional one needs
    --prompt or --prompt-file. Images are written batch by batch into OUT.partial/; after Ctrl-C or a crash,
    rerun the same command with --resume to continue (--overwrite discards it instead).
    """
    from pqcad_deploy.engines.conditioning import read_prompt_file
    from pqcad_deploy.engines.generate import generate_to_directory

    if prompts and prompt_file is not None:
        raise click.BadParameter("give the prompts with --prompt or with --prompt-file, not both.",
                                 param_hint="--prompt-file")
    labels = None if class_labels is None else _label_list(class_labels)
    prompt_list = read_prompt_file(prompt_file) if prompt_file is not None else (tuple(prompts) or None)
    done = generate_to_directory(engine, out, num_images, seed=seed, steps=steps, npz=npz,
                                 batch_size=batch_size, overwrite=overwrite, threads=threads,
                                 progress=not quiet, resume=resume, grid=grid, class_labels=labels,
                                 guidance_scale=guidance_scale, prompts=prompt_list)
    reused = f", {done.reused} kept from the interrupted run" if done.reused else ""
    conditioned = "" if done.conditions is None else f", {done.conditions.describe()}"
    click.echo(f"wrote {done.n} images to {done.out_dir} ({len(done.timesteps)} DDIM steps{conditioned}, "
               f"{done.images_per_second:.2f} images/s{reused})" + (f" and {done.npz}" if done.npz else ""))


def _label_list(text: str) -> list[int]:
    """--class's comma-separated labels as integers (their range is the engine's: checked by sample)."""
    parts = [p.strip() for p in text.split(",")]
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise click.BadParameter(f"must be comma-separated integer labels like 3 or 0,4,7; got {text!r}.",
                                 param_hint="--class") from None


@cli.group("eval", epilog=_EPILOG)
def eval_group() -> None:
    """Evaluate images, engines, artifacts and models (FID against the Fashion-MNIST reference)."""


@eval_group.command("fid", epilog=_EPILOG)
@click.argument("source")
@click.option("--ref", "reference", default=None, type=click.Path(path_type=Path),
              help="Reference statistics .npz (pqcad-fid-stats); default: the shipped statistics of the "
                   "60,000 Fashion-MNIST training images. Must come from the same preprocessing and "
                   "Inception weights.")
@click.option("-n", "num_images", default=None, type=click.IntRange(min=2),
              help="Number of images. Generated sources: default 10000, the count every reported FID "
                   "uses (FID is biased at small N: compare equal N only); on a 2-core CPU the Inception "
                   "runs ~6 images/s, so 10,000 take hours there (use --device cuda or a small N for a "
                   "quick look). PNG folder / .npz: the first N (default all).")
@click.option("--steps", default=None, type=POSITIVE,
              help="DDIM steps of generated sources; default: the engine's own timesteps, the "
                   "artifact's student_steps, or 100 for a model.")
@click.option("--seed", default=0, show_default=True, type=SEED,
              help="Seed of the initial noise of generated sources.")
@click.option("--device", default="cpu", show_default=True, type=_StageChoice("DEVICES"),
              help="Where the Inception network (and artifact/model sampling) runs: cpu or cuda. "
                   "Engines sample on their own runtime.")
@click.option("--batch-size", default=64, show_default=True, type=POSITIVE,
              help="Images per model call and per Inception forward pass.")
@click.option("--fp", is_flag=True, help="For an artifact SOURCE: sample its full-precision teacher instead "
                                         "of the fake-quant student.")
@click.option("--save-npz", default=None, type=click.Path(path_type=Path),
              help="Also save the evaluated images as uint8 (key 'images'), reusable as a SOURCE.")
@click.option("--json", "json_path", default=None, type=click.Path(path_type=Path),
              help="Also write the result as JSON: fid, n, steps, seed, source, source_kind, "
                   "reference_path, reference_description, seconds.")
@_overwrite_option
@_quiet_option
def eval_fid(source, reference, num_images, steps, seed, device, batch_size, fp, save_npz, json_path,
             overwrite, quiet) -> None:
    """FID of SOURCE against reference statistics.

    \b
    SOURCE is one of:
      a folder of PNGs, or an .npz (key 'images', from sample --npz): used as they are;
      an engine directory (engine.json): sampled on its runtime (numpy DDIM, CPU);
      an artifact directory (artifact.json): its fake-quant student (--fp: its teacher);
      'builtin' or a diffusers model directory: the FP model.
    Artifacts and models are sampled with diffusers' DDIMPipeline, image i seeded with seed + i;
    a conditional artifact as it was calibrated (class or prompt i mod count, its guidance scale), a
    latent one decoded by the VAE of the pipeline folder it records (checked against its hashes).
    """
    if num_images is not None and num_images < 2:
        raise click.BadParameter(f"must be an integer >= 2 (FID needs a covariance); got {num_images}.",
                                 param_hint="-n")
    if steps is not None and steps < 1:
        raise click.BadParameter(f"must be a positive integer; got {steps}.", param_hint="--steps")
    if batch_size < 1:
        raise click.BadParameter(f"must be a positive integer; got {batch_size}.", param_hint="--batch-size")
    from pqcad_deploy.eval.fid_sources import evaluate_fid

    r = evaluate_fid(source, reference=reference, n=num_images, steps=steps, seed=seed, device=device,
                     batch_size=batch_size, fp=fp, save_npz=save_npz, json_path=json_path,
                     overwrite=overwrite, progress=not quiet)
    steps_text = "" if r.info.steps is None else f", {r.info.steps} DDIM steps"
    click.echo(f"FID {r.fid:.2f} ({r.info.n} images from {r.info.label}{steps_text}, "
               f"reference: {r.reference_description})")


@cli.command(epilog=_EPILOG)
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path),
              help="Directory to write: analysis.json and analysis.png.")
@click.option("-n", "num_images", default=8, show_default=True, type=POSITIVE,
              help="Images the student samples; every (x_t, t) it visits is measured.")
@click.option("--seed", default=0, show_default=True, type=SEED,
              help="Seed of the initial noise (one torch.Generator for all images).")
@click.option("--batch-size", default=16, show_default=True, type=POSITIVE, help="Inputs per model call.")
@click.option("--device", default="cpu", show_default=True, type=_StageChoice("DEVICES"),
              help="Where the student and the teacher run: cpu or cuda.")
@click.option("--sensitivity-steps", default=10, show_default=True, type=POSITIVE,
              help="Measure per-layer sensitivity (two passes over the points per layer) on this many of the "
                   "student's timesteps, evenly spaced (the error by timestep and the drift use all of them).")
@click.option("--pipeline", default=None, type=click.Path(path_type=Path, file_okay=False), metavar="DIR",
              help="Latent artifacts: the diffusers pipeline folder the artifact was compressed from (default: the "
                   "folder it records); its VAE decodes the images the drift is measured on, and its text encoder "
                   "or class table gives the conditioning.")
@_overwrite_option
@_quiet_option
def analyze(artifact, out, num_images, seed, batch_size, device, sensitivity_steps, pipeline, overwrite,
            quiet) -> None:
    """Where an artifact's quantization error comes from, on the student's own DDIM trajectories.

    \b
    Measures, against the artifact's FP teacher on the same inputs:
      the noise-prediction error at each student timestep (relative MSE, SQNR dB);
      each quantized layer's sensitivity: the teacher with only its weight, or only its input,
        quantized (and all weights / all activations at once);
      the per-channel mean drift of the predicted x0 and of the final images (0-255; a latent
        artifact's decoded by its pipeline's VAE).
    """
    from pqcad_deploy.analyze import analyze_artifact, summary_lines

    result = analyze_artifact(artifact, out, n=num_images, seed=seed, batch_size=batch_size, device=device,
                              overwrite=overwrite, progress=not quiet, sensitivity_steps=sensitivity_steps,
                              pipeline=pipeline)
    for line in summary_lines(result.data):
        click.echo(line)
    click.echo(f"wrote {result.out_dir} (analysis.json, analysis.png; {result.seconds:.1f} s)")


def _user_error_types() -> tuple[type[BaseException], ...]:
    from pqcad_deploy.engines.errors import EngineError
    from pqcad_deploy.errors import PqcadError  # torch-free module

    return (EngineError, PqcadError)


def _interrupt_note(exc: BaseException | None) -> str:
    """compress interrupted after a checkpoint says how to resume; a bare Ctrl-C says 'interrupted.'."""
    return str(exc) if isinstance(exc, KeyboardInterrupt) and str(exc) else "interrupted."


_FULL_EXTRA_MODULES: frozenset[str] = frozenset({"torch", "diffusers", "safetensors", "scipy", "matplotlib"})
"""The packages of the `full` extra (pyproject.toml): the PyTorch stage behind compress, export and eval."""


def _command_name(argv: list[str] | None) -> str:
    """'compress', 'eval fid', ...: the command named on the command line (for messages)."""
    words: list[str] = []
    group: click.Group = cli
    for arg in sys.argv[1:] if argv is None else argv:
        command = group.commands.get(arg) if not arg.startswith("-") else None
        if command is None:
            continue
        words.append(arg)
        if not isinstance(command, click.Group):
            break
        group = command
    return " ".join(words) or "this command"


def _missing_extra(exc: ImportError, argv: list[str] | None) -> str | None:
    """One line for a package of the `full` extra missing in a runtime-only install, else None."""
    root = (exc.name or "").split(".")[0]
    if root not in _FULL_EXTRA_MODULES:
        return None
    return (f"{_command_name(argv)} needs the PyTorch stage, which is not installed (no module named {root!r}): "
            "pip install 'pqcad-deploy[full]' (from a source checkout: pip install -e '.[full]')")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one line per error, exit 2 for usage and 1 for everything else."""
    try:
        code = cli.main(args=argv, prog_name="pqcad-deploy", standalone_mode=False)
    except click.exceptions.Abort as exc:
        click.echo(f"error: {_interrupt_note(exc.__cause__)}", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
    except _user_error_types() as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except ImportError as exc:  # ModuleNotFoundError included
        line = _missing_extra(exc, argv)
        if line is None:
            raise
        click.echo(f"error: {line}", err=True)
        sys.exit(1)
    except KeyboardInterrupt as exc:
        click.echo(f"error: {_interrupt_note(exc)}", err=True)
        sys.exit(130)
    except OSError as exc:  # the safety net for I/O no library call wrapped: a full disk, a vanished file
        where = f" {exc.filename}" if exc.filename else ""
        click.echo(f"error: cannot read or write{where}: {exc.strerror or exc}; check the path, its permissions "
                   "and free space.", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
