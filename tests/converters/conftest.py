"""Artifacts of every fixture UNet at W8A8 and W4A8, compressed once per session."""

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
            compress(CompressConfig(model=str(unet_dirs[name]), weight_bits=wbits, act_bits=8, teacher_steps=10,
                                    preset="fast"), out, progress=False)
            made[(name, wbits)] = out
    return made
