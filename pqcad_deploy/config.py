"""Frozen, versioned configs for the PyTorch stage.

A config is serialised as sorted JSON with its type and version (stored in the artifact's
provenance) and only ever loaded back into its own type, so an artifact says exactly how it was made.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

from pqcad_deploy.choices import (
    ACT_BITS, ACT_SCALE_INIT_DEFAULTS, ACT_SCALE_INITS, BIAS_CORRECTION_DATA, DEVICES, FIRST_LAST_DEFAULTS, FIRST_LAST_POLICIES, METHODS,
    GUARD_METRICS, PRECISION_POLICY_NAMES, PRESETS, SPLIT_CONCAT,
    WEIGHT_BITS, ActScaleInit, Device, FirstLastPolicy, Method, Preset, check_choice,
)
from pqcad_deploy.errors import ConfigError
from pqcad_deploy.methods.registry import METHOD_REGISTRY, method_spec
from pqcad_deploy.presets import CalibrationConfig, PresetSettings, preset_settings

__all__ = ["CalibrationConfig", "CompressConfig", "config_to_dict"]

CONFIG_VERSION = 1


@dataclass(frozen=True)
class CompressConfig:
    """Everything `compress` needs; the CLI builds one, the library validates it.

    Args:
        model: a local diffusers model directory, a hub id, or "builtin".
        method: the compression method (see choices.METHODS).
        weight_bits / act_bits: target bits of every quantized layer.
        teacher_steps: DDIM steps of the FP teacher (and of the student when not distilled).
        preset: "fast" (tests and demos, under a minute on a CPU) or "default".
        device: where the PyTorch work runs.
        seed: seeds the calibration noise; the same seed gives the same artifact.
        distill: CAD, distillation to half the steps (pqcad_deploy.distill); on by default (PQ + CAD
            is the method; docs/RESULTS.md section 6 measures it).
        calibration: overrides the preset's calibration set when given.
        avg_weight_bits: None (off) or a budget of parameter-weighted average weight bits in
            (weight_bits, 8]: the first and last conv stay at 8 bits and the most outlier-heavy
            layers (weight-channel kurtosis, MPQ-DM) are raised to 8 within it
            (quant.mixed_precision); for every method, so the methods compare on one plan.
        first_last: precision of conv_in / conv_out (layer_precision): "w8-fp-input", "w8a8" or
            "target"; None picks the method's default (see :attr:`first_last_policy`).
        act_scale_init: brecq / pqcad stage 2: how activation scales start before they are learned
            ("minmax", "percentile" 99.99, "mse" clipping search, per layer over the calibration set's
            timesteps); None picks the method's default (:attr:`activation_scale_init`: mse for the
            learned methods, measured in docs/RESULTS.md section 15).
        layer_loss: brecq / pqcad: add the per-layer output errors inside each block to the block
            reconstruction loss (EDA-DM).
        act_scale_check: brecq / pqcad: after stage 2, keep the learned activation scales only if
            the student's own sampled images are closer to the FP model's with them than with the
            starting scales (pqcad_deploy.act_scale_check).
        precision_policy: which layers stay float altogether (pqcad_deploy.precision_policy):
            "all" (default: every Conv2d and Linear quantizes) or "tensorrt-safe" (ModelOpt's
            exclusions: time embedding path, shortcut convs). Not the default because it did not
            help on both builtin models (docs/RESULTS.md section 15).
        keep_float: further shell patterns over layer names kept in float (``--keep-float``).
        bias_correction: after quantizing, fold each quantized layer's mean output error per channel
            (measured on the FP trajectories of the calibration set) into its bias
            (pqcad_deploy.quant.bias_correction). Off by default: it fixes the colour model's drift and
            FID but makes the Fashion-MNIST model's images brighter (docs/RESULTS.md section 15).
        bias_correction_data: what the correction's mean errors are estimated on: "calibration" (the
            calibration set, as measured in RESULTS section 15), "fp-uniform" (the FP model's DDIM
            trajectories, every kept timestep evenly spread) or "student" (the quantized student's own
            DDIM trajectories, evenly spread; both models evaluated on its x_t). The CPU proxy of
            RESULTS section 15 ranked the last two above the first on both models.
        rounds: CAD rounds; each halves the steps again (N -> N/2 -> ... -> N/2^rounds), the next
            round's teacher being the previous round's student (progressive distillation).
        split_concat: which up-block resnet convs that read ``cat([h, skip])`` are computed as two convs
            and an Add, each half with its own activation scale (Q-Diffusion's split shortcut;
            pqcad_deploy.quant.rewrites): "none", "shortcut" (the 1x1 conv_shortcut) or
            "shortcut+conv1" (and conv1).
        smoothquant_alpha: None (off) or SmoothQuant's migration strength in (0, 1) for every Linear with
            a quantized input: its input is multiplied per channel by 1/s (a Mul in the ONNX) and its
            weight columns by s, s = max|x|^alpha / max|w|^(1 - alpha) on the calibration set.
        guard: how the distillation guard judges each round (pqcad_deploy.distill.guard): "psnr" (mean
            per-image PSNR of a few images against FP at the teacher steps, any device), "fid" (FID of
            the preset's ``guard.fid_images`` images per student against FP's, with the FID weights: a GPU)
            or "auto" (fid on cuda where the weights are installed, else psnr; compress records which ran).
        guidance_scale: a conditional model's classifier-free guidance scale for the FP trajectories the
            student is calibrated on (pqcad_deploy.conditioning); 1 is no guidance. The artifact records it
            and the engines sample with it by default.
        null_class: a class-conditional model's "no class" label (the unconditional half of guidance);
            needed for a guidance scale above 1.
        prompt_file: a text-conditional pipeline's prompts (one per line) for the calibration and
            distillation trajectories; sample i is drawn with prompt i % count.
    """

    model: str = "builtin"
    method: Method = "pqcad"
    weight_bits: int = 8
    act_bits: int = 8
    teacher_steps: int = 100
    preset: Preset = "default"
    device: Device = "cpu"
    seed: int = 0
    distill: bool = True
    calibration: CalibrationConfig | None = field(default=None)
    avg_weight_bits: float | None = None
    first_last: FirstLastPolicy | None = None
    act_scale_init: ActScaleInit | None = None
    layer_loss: bool = False
    act_scale_check: bool = True
    precision_policy: str = "all"
    keep_float: tuple[str, ...] = ()
    bias_correction: bool = False
    bias_correction_data: str = "calibration"
    split_concat: str = "none"
    smoothquant_alpha: float | None = None
    rounds: int = 1
    guard: str = "auto"
    guidance_scale: float = 1.0
    null_class: int | None = None
    prompt_file: str | None = None

    def __post_init__(self) -> None:
        check_choice("--method", self.method, METHODS)
        check_choice("--weight-bits", self.weight_bits, WEIGHT_BITS)
        check_choice("--act-bits", self.act_bits, ACT_BITS)
        check_choice("--preset", self.preset, PRESETS)
        check_choice("--device", self.device, DEVICES)
        if not isinstance(self.teacher_steps, int) or not 2 <= self.teacher_steps <= 1000:
            raise ConfigError(f"--teacher-steps must be an integer in [2, 1000]; got {self.teacher_steps!r}.")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"--seed must be a non-negative integer; got {self.seed!r}.")
        if not isinstance(self.rounds, int) or isinstance(self.rounds, bool) or not 1 <= self.rounds <= 8:
            raise ConfigError(f"--rounds must be an integer in [1, 8]; got {self.rounds!r}.")
        if self.rounds > 1 and not self.distill:
            raise ConfigError("--rounds applies to distillation; drop --no-distill, or drop --rounds.")
        if self.distill and self.rounds > 1 and self.teacher_steps % 2 ** self.rounds:
            raise ConfigError(f"--rounds {self.rounds} halves the steps {self.rounds} times, so --teacher-steps must be "
                              f"divisible by {2 ** self.rounds}; got {self.teacher_steps}.")
        check_choice("--guard", self.guard, GUARD_METRICS)
        scale = self.guidance_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 1:
            raise ConfigError(f"--guidance-scale must be a finite number >= 1 (1 turns guidance off); got {scale!r}.")
        object.__setattr__(self, "guidance_scale", float(scale))
        if self.null_class is not None and (isinstance(self.null_class, bool) or not isinstance(self.null_class, int)
                                            or self.null_class < 0):
            raise ConfigError(f"--null-class must be a non-negative integer label; got {self.null_class!r}.")
        if self.distill and self.teacher_steps % 2:
            raise ConfigError(f"distillation (on by default) halves the teacher's steps, so --teacher-steps must "
                              f"be even; got {self.teacher_steps}. Pass an even number, or --no-distill.")
        self._check_avg_weight_bits()
        if self.first_last is not None:
            check_choice("--first-last", self.first_last, FIRST_LAST_POLICIES)
        if self.act_scale_init is not None:
            check_choice("--act-scale-init", self.act_scale_init, ACT_SCALE_INITS)
        check_choice("--layer-loss", self.layer_loss, (False, True))
        check_choice("--act-scale-check", self.act_scale_check, (False, True))
        check_choice("--precision-policy", self.precision_policy, PRECISION_POLICY_NAMES)
        check_choice("--bias-correction", self.bias_correction, (False, True))
        check_choice("--bias-correction-data", self.bias_correction_data, BIAS_CORRECTION_DATA)
        if self.bias_correction_data != "calibration" and not self.bias_correction:
            raise ConfigError("--bias-correction-data only applies with --bias-correction; add it, or drop "
                              "--bias-correction-data.")
        check_choice("--split-concat", self.split_concat, SPLIT_CONCAT)
        alpha = self.smoothquant_alpha
        if alpha is not None:
            if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0.0 < alpha < 1.0:
                raise ConfigError(f"--smoothquant-alpha must be a number in (0, 1) (how much of the activation's "
                                  f"range moves into the weight); got {alpha!r}.")
            object.__setattr__(self, "smoothquant_alpha", float(alpha))
        if isinstance(self.keep_float, str) or not all(isinstance(p, str) and p for p in self.keep_float):
            raise ConfigError(f"--keep-float takes non-empty layer-name patterns; got {self.keep_float!r}.")
        object.__setattr__(self, "keep_float", tuple(self.keep_float))
        spec = method_spec(self.method)
        if not spec.learns_activation_scales and (self.act_scale_init not in (None, spec.act_scale_init_default)
                                                  or self.layer_loss):
            learned = " or ".join(f"--method {name}" for name, s in METHOD_REGISTRY.items() if s.learns_activation_scales)
            raise ConfigError(f"--act-scale-init and --layer-loss apply to the learned methods; use {learned}, or "
                              f"drop them for {self.method}.")

    def _check_avg_weight_bits(self) -> None:
        value = self.avg_weight_bits
        if value is None:
            return
        if self.weight_bits == 8:
            raise ConfigError(f"--avg-weight-bits needs --weight-bits 4 (at 8 every layer is already at 8 bits); "
                              f"got --avg-weight-bits {value!r} with --weight-bits 8.")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
                or not self.weight_bits < value <= 8:
            raise ConfigError(f"--avg-weight-bits must be a number in ({self.weight_bits}, 8] (the average weight "
                              f"bits, between --weight-bits and 8); got {value!r}.")
        object.__setattr__(self, "avg_weight_bits", float(value))  # 5 and 5.0: one artifact

    @property
    def first_last_policy(self) -> FirstLastPolicy:
        """The given policy, else the method's default (minmax: target; brecq, pqcad: w8-fp-input)."""
        return self.first_last if self.first_last is not None else FIRST_LAST_DEFAULTS[self.method]

    @property
    def activation_scale_init(self) -> ActScaleInit:
        """The given stage-2 start, else the method's default (minmax: minmax; brecq, pqcad: mse)."""
        return self.act_scale_init if self.act_scale_init is not None else ACT_SCALE_INIT_DEFAULTS[self.method]

    @property
    def settings(self) -> PresetSettings:
        """The preset's settings (presets.PRESETS); compress reads them once, at its start."""
        return preset_settings(self.preset)

    @property
    def calibration_config(self) -> CalibrationConfig:
        """The given calibration, else the preset's; for pqcad with normally distributed timesteps (C_QC)."""
        if self.calibration is not None:
            return self.calibration
        preset = self.settings.calibration
        sampling = method_spec(self.method).calibration_timesteps
        return preset if preset.timestep_sampling == sampling else dataclasses.replace(preset, timestep_sampling=sampling)


def config_to_dict(config: object) -> dict:
    """Sorted-JSON-ready dict of a config dataclass, tagged with its type and version."""
    data = dataclasses.asdict(config)  # type: ignore[arg-type]
    if isinstance(config, CompressConfig):
        data["calibration"] = dataclasses.asdict(config.calibration_config)
        data["first_last"] = config.first_last_policy
        data["act_scale_init"] = config.activation_scale_init
    data["_type"] = type(config).__name__
    data["_version"] = CONFIG_VERSION
    return json.loads(json.dumps(data, sort_keys=True))
