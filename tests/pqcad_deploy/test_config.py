"""CompressConfig / CalibrationConfig validation and their sorted-JSON serialisation."""

from __future__ import annotations

import dataclasses
import json

import pytest

from pqcad_deploy.choices import (
    ACT_BITS, CALIBRATION_SELECTIONS, DEVICES, LADDER_WEIGHT_BITS, METHODS, PRESETS, WEIGHT_BITS,
)
from pqcad_deploy.config import (
    CONFIG_VERSION, CalibrationConfig, CompressConfig, config_to_dict,
)
from pqcad_deploy.presets import PRESETS as PRESET_SETTINGS
from pqcad_deploy.errors import ConfigError


def test_defaults_are_valid_and_frozen():
    c = CompressConfig()
    assert (c.model, c.method, c.weight_bits, c.act_bits, c.teacher_steps, c.preset, c.device, c.seed,
            c.distill, c.calibration, c.avg_weight_bits, c.act_scale_check) == (
        "builtin", "pqcad", 8, 8, 100, "default", "cpu", 0, True, None, None, True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.weight_bits = 4  # type: ignore[misc]


def test_choice_tuples_pinned():
    assert METHODS == ("minmax", "brecq", "pqcad") and WEIGHT_BITS == (8, 4) and ACT_BITS == (8, 4)
    assert LADDER_WEIGHT_BITS == (8, 6, 4)
    assert PRESETS == ("fast", "default") and DEVICES == ("cpu", "cuda")
    assert CALIBRATION_SELECTIONS == ("none", "density_diversity")


@pytest.mark.parametrize("field", ["weight_bits", "act_bits"])
@pytest.mark.parametrize("bad", [0, 1, 2, 9, 16, -8, 8.0, "8", True, None])
def test_bits_validation(field, bad):
    flag = "--" + field.replace("_", "-")
    with pytest.raises(ConfigError) as exc:
        CompressConfig(**{field: bad})
    assert str(exc.value) == f"{flag} must be one of 8, 4; got {bad!r}."


@pytest.mark.parametrize("wb,ab", [(8, 8), (4, 8), (4, 4), (8, 4)])
def test_all_supported_bit_pairs(wb, ab):
    c = CompressConfig(weight_bits=wb, act_bits=ab)
    assert (c.weight_bits, c.act_bits) == (wb, ab)


@pytest.mark.parametrize("bad", ["slow", "FAST", "", None])
def test_preset_validation(bad):
    with pytest.raises(ConfigError) as exc:
        CompressConfig(preset=bad)
    assert str(exc.value) == f"--preset must be one of fast, default; got {bad!r}."


@pytest.mark.parametrize("bad", ["gpu", "cuda:0", "mps", "CPU"])
def test_device_validation(bad):
    with pytest.raises(ConfigError) as exc:
        CompressConfig(device=bad)
    assert str(exc.value) == f"--device must be one of cpu, cuda; got {bad!r}."


@pytest.mark.parametrize("bad", ["nope", "MinMax", "PQCAD"])
def test_method_validation(bad):
    with pytest.raises(ConfigError, match=r"^--method must be one of minmax, brecq, pqcad; got"):
        CompressConfig(method=bad)


@pytest.mark.parametrize("bad", [0, 1, 1001, -5, 10.0, "10", None])
def test_teacher_steps_validation(bad):
    with pytest.raises(ConfigError) as exc:
        CompressConfig(teacher_steps=bad)
    assert str(exc.value) == f"--teacher-steps must be an integer in [2, 1000]; got {bad!r}."


@pytest.mark.parametrize("ok", [2, 10, 1000])
def test_teacher_steps_bounds_inclusive(ok):
    assert CompressConfig(teacher_steps=ok).teacher_steps == ok


@pytest.mark.parametrize("bad", [-1, 1.5, "0"])
def test_seed_validation(bad):
    with pytest.raises(ConfigError, match=r"^--seed must be a non-negative integer; got"):
        CompressConfig(seed=bad)


def test_distill_needs_an_even_number_of_teacher_steps():
    assert CompressConfig(distill=True, teacher_steps=10).distill
    with pytest.raises(ConfigError, match=r"^distillation \(on by default\) halves the teacher's steps, so "
                                          r"--teacher-steps must be even; got 9\. Pass an even number, or --no-distill\.$"):
        CompressConfig(distill=True, teacher_steps=9)
    assert CompressConfig(distill=False, teacher_steps=9).teacher_steps == 9


@pytest.mark.parametrize("field", ["num_trajectories", "timesteps_kept", "batch_size"])
@pytest.mark.parametrize("bad", [0, -1, 1.0, "4"])
def test_calibration_config_validation(field, bad):
    with pytest.raises(ConfigError) as exc:
        CalibrationConfig(**{field: bad})
    assert str(exc.value) == f"calibration {field} must be a positive integer; got {bad!r}."


def test_calibration_comes_from_preset_unless_given():
    assert CompressConfig(preset="fast", method="minmax").calibration_config == CalibrationConfig(4, 8, 4)
    assert CompressConfig(preset="default", method="brecq").calibration_config == CalibrationConfig(32, 16, 32)
    # pqcad (the default) draws C_QC with normally distributed timesteps
    assert CompressConfig(preset="fast").calibration_config == CalibrationConfig(4, 8, 4, timestep_sampling="normal")
    assert PRESET_SETTINGS["fast"].calibration == CalibrationConfig(num_trajectories=4, timesteps_kept=8, batch_size=4)
    custom = CalibrationConfig(num_trajectories=2, timesteps_kept=3, batch_size=1)
    assert CompressConfig(preset="fast", calibration=custom).calibration_config is custom


def test_config_to_dict_compress():
    c = CompressConfig(model="some/dir", weight_bits=4, act_bits=8, teacher_steps=10, preset="fast", seed=3)
    d = config_to_dict(c)
    assert d == {
        "_type": "CompressConfig", "_version": CONFIG_VERSION, "model": "some/dir", "method": "pqcad",
        "weight_bits": 4, "act_bits": 8, "teacher_steps": 10, "preset": "fast", "device": "cpu",
        "seed": 3, "distill": True, "avg_weight_bits": None,
        "first_last": "w8-fp-input",  # the effective policy (pqcad's default) is recorded
        "act_scale_init": "mse",  # the effective start of stage 2 (the learned methods' default)
        "layer_loss": False, "act_scale_check": True,
        "precision_policy": "all", "keep_float": [], "bias_correction": False,
        "bias_correction_data": "calibration", "split_concat": "none", "smoothquant_alpha": None, "rounds": 1, "guard": "auto", "guidance_scale": 1.0,
        "null_class": None, "prompt_file": None,
        # the effective calibration is recorded even when it came from the preset
        "calibration": {"num_trajectories": 4, "timesteps_kept": 8, "batch_size": 4,
                        "timestep_sampling": "normal", "timestep_mean": 0.4, "timestep_std": 0.3,
                        "selection": "none", "selection_oversample": 4},
    }
    assert CONFIG_VERSION == 1
    text = json.dumps(d, sort_keys=True)
    assert json.loads(text) == d
    assert list(json.loads(text)) == sorted(d)
    # same config, same bytes
    assert json.dumps(config_to_dict(dataclasses.replace(c)), sort_keys=True) == text


def test_config_to_dict_calibration():
    d = config_to_dict(CalibrationConfig(num_trajectories=2, timesteps_kept=5, batch_size=2))
    assert d == {"_type": "CalibrationConfig", "_version": 1, "num_trajectories": 2, "timesteps_kept": 5,
                 "batch_size": 2, "timestep_sampling": "uniform", "timestep_mean": 0.4, "timestep_std": 0.3,
                 "selection": "none", "selection_oversample": 4}


def test_pqcad_preset_calibration_draws_normal_timesteps():
    # recorded in the artifact's options as used; an explicit calibration is taken as given
    assert CompressConfig(method="pqcad", preset="fast").calibration_config == dataclasses.replace(
        PRESET_SETTINGS["fast"].calibration, timestep_sampling="normal")
    assert config_to_dict(CompressConfig(method="pqcad"))["calibration"]["timestep_sampling"] == "normal"
    custom = CalibrationConfig(num_trajectories=2, timesteps_kept=3, batch_size=1)
    assert CompressConfig(method="pqcad", calibration=custom).calibration_config is custom


@pytest.mark.parametrize("ok", [4.5, 5, 8, 4.001])
def test_avg_weight_bits_accepted_as_float(ok):
    c = CompressConfig(weight_bits=4, avg_weight_bits=ok)
    assert c.avg_weight_bits == float(ok) and type(c.avg_weight_bits) is float
    assert config_to_dict(c)["avg_weight_bits"] == float(ok)


@pytest.mark.parametrize("bad", [4, 4.0, 3.5, 8.01, 9, float("nan"), float("inf"), "4.5", True])
def test_avg_weight_bits_validation(bad):
    with pytest.raises(ConfigError) as exc:
        CompressConfig(weight_bits=4, avg_weight_bits=bad)
    assert str(exc.value) == (f"--avg-weight-bits must be a number in (4, 8] (the average weight bits, between "
                              f"--weight-bits and 8); got {bad!r}.")


def test_avg_weight_bits_needs_a_target_below_8():
    with pytest.raises(ConfigError) as exc:
        CompressConfig(weight_bits=8, avg_weight_bits=8.0)
    assert "--avg-weight-bits needs --weight-bits 4" in str(exc.value)


@pytest.mark.parametrize("bad", ["kcenter", "None", "", None])
def test_calibration_selection_validation(bad):
    with pytest.raises(ConfigError) as exc:
        CalibrationConfig(selection=bad)
    assert str(exc.value) == f"--calibration-selection must be one of none, density_diversity; got {bad!r}."


@pytest.mark.parametrize("bad", [1, 0, -2, 2.0, "4", True])
def test_calibration_oversample_validation(bad):
    with pytest.raises(ConfigError) as exc:
        CalibrationConfig(selection="density_diversity", selection_oversample=bad)
    assert str(exc.value).startswith("--calibration-oversample must be an integer >= 2") and repr(bad) in str(exc.value)


def test_first_last_default_depends_on_the_method_and_is_validated():
    assert CompressConfig(method="minmax").first_last_policy == "target"
    assert CompressConfig(method="pqcad").first_last_policy == "w8-fp-input"
    assert CompressConfig(method="brecq", first_last="w8a8").first_last_policy == "w8a8"
    with pytest.raises(ConfigError, match="--first-last must be one of w8-fp-input, w8a8, target; got 'fp16'"):
        CompressConfig(first_last="fp16")


def test_keep_float_patterns_are_checked_and_stored_as_a_tuple():
    c = CompressConfig(keep_float=["*attentions*"], precision_policy="tensorrt-safe", bias_correction=True)
    assert c.keep_float == ("*attentions*",)
    assert config_to_dict(c)["keep_float"] == ["*attentions*"]
    for bad in ("*attn*", ("",), (3,)):
        with pytest.raises(ConfigError, match="--keep-float takes non-empty layer-name patterns"):
            CompressConfig(keep_float=bad)
    with pytest.raises(ConfigError, match="--precision-policy must be one of all, tensorrt-safe"):
        CompressConfig(precision_policy="none")
