"""Artifacts of every fixture UNet at W8A8 and W4A8, compressed once per session.

Method and distillation are pinned (min-max, no CAD): these tests are about the converter, and the
compress defaults may change. So is the calibration set, at 8 pairs (2 trajectories x 4 timesteps)
instead of the fast preset's 32: it only sets the activation scales, parity is measured on inputs of
its own, and the first rounding flips stay as rare (1e-5 to 3e-5 of a layer's codes, measured, on every
model with both set sizes) at a third less setup time.
"""

from __future__ import annotations

import dataclasses

import pytest

from _unets import UNET_CONFIGS


@pytest.fixture(scope="session")
def artifacts(unet_dirs, tmp_path_factory):
    """(config name, weight bits) -> artifact directory."""
    from pqcad_deploy.compress import compress
    from pqcad_deploy.config import CompressConfig
    from pqcad_deploy.presets import PRESETS, CalibrationConfig

    root = tmp_path_factory.mktemp("artifacts")
    made = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PRESETS, "fast", dataclasses.replace(
            PRESETS["fast"], calibration=CalibrationConfig(num_trajectories=2, timesteps_kept=4, batch_size=2)))
        for name in UNET_CONFIGS:
            for wbits in (8, 4):
                out = root / f"{name}_w{wbits}a8"
                compress(CompressConfig(model=str(unet_dirs[name]), method="minmax", distill=False,
                                        weight_bits=wbits, act_bits=8, teacher_steps=10, preset="fast"),
                         out, progress=False)
                made[(name, wbits)] = out
    return made


@pytest.fixture(scope="session")
def exported(artifacts, tmp_path_factory):
    """(config name, weight bits) -> the artifact exported with the defaults (target qdq, opset 17)."""
    from pqcad_deploy.converters.export_onnx import export_onnx

    root = tmp_path_factory.mktemp("onnx")
    return {key: export_onnx(art, root / f"{key[0]}_w{key[1]}.onnx").path for key, art in artifacts.items()}
