"""The registries are the one place each concept is defined: the CLI's choices, the presets and the
stages read them, and every entry resolves to code that exists."""

from __future__ import annotations

import importlib
import inspect
import json

import pytest

from pqcad_deploy import choices
from pqcad_deploy.methods.registry import METHOD_REGISTRY, method_spec
from pqcad_deploy.presets import PRESETS, PresetSettings, preset_settings, preset_to_dict


def test_every_method_entry_runs_a_real_function_and_the_choices_follow_the_registry():
    assert choices.METHODS == tuple(METHOD_REGISTRY) == ("minmax", "brecq", "pqcad")
    for name, spec in METHOD_REGISTRY.items():
        module, _, function = spec.run.partition(":")
        run = getattr(importlib.import_module(module), function)
        assert list(inspect.signature(run).parameters) == ["job"], name
        assert choices.FIRST_LAST_DEFAULTS[name] == spec.first_last_default in choices.FIRST_LAST_POLICIES
        assert choices.ACT_SCALE_INIT_DEFAULTS[name] == spec.act_scale_init_default in choices.ACT_SCALE_INITS
        assert spec.calibration_timesteps in choices.TIMESTEP_SAMPLINGS
    assert [n for n, s in METHOD_REGISTRY.items() if s.resumable] == ["brecq", "pqcad"]
    with pytest.raises(Exception, match=r"--method must be one of minmax, brecq, pqcad; got 'gptq'"):
        method_spec("gptq")


def test_the_presets_table_names_every_preset_and_records_as_json():
    assert tuple(PRESETS) == choices.PRESETS
    for name in choices.PRESETS:
        settings = preset_settings(name)
        assert isinstance(settings, PresetSettings)
        recorded = json.loads(json.dumps(preset_to_dict(settings)))
        assert recorded["distill"]["iters"] == settings.distill.iters
    assert PRESETS["default"].dc.fresh and PRESETS["default"].distill.batch_size == 64  # RESULTS section 18
    with pytest.raises(Exception, match="--preset"):
        preset_settings("huge")


def test_export_targets_and_engine_backends_are_registries():
    from pqcad_deploy.converters.export_onnx import TARGETS
    from pqcad_deploy.converters.targets import EXPORT_TARGETS
    from pqcad_deploy.engines.backends import ENGINE_BACKENDS
    from pqcad_deploy.engines.manifest import BACKENDS

    assert TARGETS == ("onnxruntime", *EXPORT_TARGETS)
    # INT4 initializers: the qdq layout, and tensorrt's blocked MatMul weights
    assert [n for n, t in EXPORT_TARGETS.items() if t.int4_refusal is None] == ["qdq", "tensorrt"]
    assert {n: t.parity_level for n, t in EXPORT_TARGETS.items()} == {
        "qdq": "disabled", "ort-x86": "extended", "ort-qlinear": "extended", "tensorrt": "disabled"}
    assert {n: (t.default_opset, t.min_opset, t.parity_output_tolerance) for n, t in EXPORT_TARGETS.items()} == {
        "qdq": (17, 13, None), "ort-x86": (17, 13, None), "ort-qlinear": (17, 13, None), "tensorrt": (19, 19, 5e-2)}
    assert tuple(ENGINE_BACKENDS) == BACKENDS
