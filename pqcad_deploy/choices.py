"""The fixed sets of string and integer choices, each a Literal backed by one tuple.

Validation and error messages both read the tuples, so a message can never list a choice the code
no longer accepts.
"""

from __future__ import annotations

from typing import Literal

from pqcad_deploy.errors import ConfigError
from pqcad_deploy.methods.registry import METHOD_REGISTRY

__all__ = [
    "METHODS",
    "Method",
    "WEIGHT_BITS",
    "LADDER_WEIGHT_BITS",
    "ACT_BITS",
    "PRESETS",
    "Preset",
    "TIMESTEP_SAMPLINGS",
    "TimestepSampling",
    "CALIBRATION_SELECTIONS",
    "CalibrationSelection",
    "DEVICES",
    "Device",
    "FIRST_LAST_POLICIES",
    "FIRST_LAST_DEFAULTS",
    "FirstLastPolicy",
    "ACT_SCALE_INITS",
    "ActScaleInit",
    "ACT_SCALE_INIT_DEFAULTS",
    "PRECISION_POLICY_NAMES",
    "BIAS_CORRECTION_DATA",
    "SPLIT_CONCAT",
    "GUARD_METRICS",
    "check_choice",
]

Method = Literal["minmax", "brecq", "pqcad"]
METHODS: tuple[str, ...] = tuple(METHOD_REGISTRY)  # the method facts live in methods.registry

WEIGHT_BITS: tuple[int, ...] = (8, 4)
# Bit-widths a weight quantizer can hold: the targets plus PQ's intermediate ladder level.
LADDER_WEIGHT_BITS: tuple[int, ...] = (8, 6, 4)
ACT_BITS: tuple[int, ...] = (8, 4)

Preset = Literal["fast", "default"]
PRESETS: tuple[str, ...] = ("fast", "default")

TimestepSampling = Literal["uniform", "normal"]
TIMESTEP_SAMPLINGS: tuple[str, ...] = ("uniform", "normal")

# "none": keep every drawn sample; "density_diversity": EDA-DM selection from oversampled candidates
CalibrationSelection = Literal["none", "density_diversity"]
CALIBRATION_SELECTIONS: tuple[str, ...] = ("none", "density_diversity")

Device = Literal["cpu", "cuda"]
DEVICES: tuple[str, ...] = ("cpu", "cuda")

# precision of conv_in / conv_out (pqcad_deploy.layer_precision)
FirstLastPolicy = Literal["w8-fp-input", "w8a8", "target"]
FIRST_LAST_POLICIES: tuple[str, ...] = ("w8-fp-input", "w8a8", "target")
FIRST_LAST_DEFAULTS: dict[str, str] = {name: m.first_last_default for name, m in METHOD_REGISTRY.items()}

# how stage 2 initialises the activation scales before learning them (methods.brecq.calibrate_activations)
ActScaleInit = Literal["minmax", "percentile", "mse"]
ACT_SCALE_INITS: tuple[str, ...] = ("minmax", "percentile", "mse")
ACT_SCALE_INIT_DEFAULTS: dict[str, str] = {name: m.act_scale_init_default for name, m in METHOD_REGISTRY.items()}


# which layers quantize at all (pqcad_deploy.precision_policy.PRECISION_POLICIES holds what each keeps float)
PRECISION_POLICY_NAMES: tuple[str, ...] = ("all", "tensorrt-safe")

# what bias correction estimates the mean errors on (pqcad_deploy.compress._bias_correction_data)
BIAS_CORRECTION_DATA: tuple[str, ...] = ("calibration", "fp-uniform", "student")

# which up-block convs that read the skip concat are split in two (pqcad_deploy.quant.rewrites.SPLIT_CONCAT_CHOICES)
SPLIT_CONCAT: tuple[str, ...] = ("none", "shortcut", "shortcut+conv1")

# how the distillation guard judges a distilled student (pqcad_deploy.distill.guard.GUARD_METRICS)
# ("auto": fid on a GPU with the FID weights installed, else psnr; distill.guard.resolve_guard_metric)
GUARD_METRICS: tuple[str, ...] = ("auto", "psnr", "fid")


def check_choice(name: str, value: object, allowed: tuple) -> None:
    """Raise ConfigError naming the option, the value and the allowed values.

    The type must match too: 8.0 or numpy.int64(8) compare equal to 8 but would be written to the
    artifact as a float or fail JSON serialisation.
    """
    if not any(type(value) is type(a) and value == a for a in allowed):
        shown = ", ".join(str(a) for a in allowed)
        raise ConfigError(f"{name} must be one of {shown}; got {value!r}.")
