"""Artifacts of every fixture UNet at W8A8 and W4A8, compressed once per session.

Method and distillation are pinned (min-max, no CAD): these tests are about the converter, and the
compress defaults may change.
"""

from __future__ import annotations

import pytest

from _unets import UNET_CONFIGS


@pytest.fixture(scope="session")
def artifacts(unet_dirs, tmp_path_factory):
    """(config name, weight bits) -> artifact directory."""
    from pqcad_deploy.compress import compress
    from pqcad_deploy.config import CompressConfig

    root = tmp_path_factory.mktemp("artifacts")
    made = {}
    for name in UNET_CONFIGS:
        for wbits in (8, 4):
            out = root / f"{name}_w{wbits}a8"
            compress(CompressConfig(model=str(unet_dirs[name]), method="minmax", distill=False, weight_bits=wbits,
                                    act_bits=8, teacher_steps=10, preset="fast"), out, progress=False)
            made[(name, wbits)] = out
    return made


@pytest.fixture(scope="session")
def exported(artifacts, tmp_path_factory):
    """(config name, weight bits) -> the artifact exported with the defaults (target qdq, opset 17)."""
    from converters.export_onnx import export_onnx

    root = tmp_path_factory.mktemp("onnx")
    return {key: export_onnx(art, root / f"{key[0]}_w{key[1]}.onnx").path for key, art in artifacts.items()}
