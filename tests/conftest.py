"""Shared fixtures: the small UNets of tests/_unets.py saved once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# One torch/OpenMP thread for the whole suite (and the subprocesses it starts): on this project's
# 2-core machines, two torch threads competing with anything else made small models 20x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from _unets import UNET_CONFIGS, make_unet_dir  # noqa: E402


@pytest.fixture(scope="session")
def unet_dirs(tmp_path_factory) -> dict[str, Path]:
    """name -> model directory, one per configuration in UNET_CONFIGS."""
    root = tmp_path_factory.mktemp("unets")
    return {name: make_unet_dir(root / name, name) for name in UNET_CONFIGS}


@pytest.fixture(scope="session")
def small_unet_dir(unet_dirs) -> Path:
    return unet_dirs["c1_32_attn1_default"]


@pytest.fixture(scope="session")
def sd_pipeline_dir(tmp_path_factory) -> Path:
    """The SD-1.5-shaped pipeline of tests/_pipelines.py, written once per run (5 s): never edit it, copy it."""
    from _pipelines import make_sd_pipeline_dir

    return make_sd_pipeline_dir(tmp_path_factory.mktemp("sd") / "sd")


@pytest.fixture(scope="session")
def class_conditional_dir(tmp_path_factory) -> Path:
    """The class-conditional UNet2DModel of tests/_pipelines.py, written once per run: never edit it, copy it."""
    from _pipelines import make_class_conditional_unet_dir

    return make_class_conditional_unet_dir(tmp_path_factory.mktemp("cc") / "cc")


@pytest.fixture(scope="session")
def class_latent_dir(tmp_path_factory) -> Path:
    """The class-embedding latent pipeline of tests/_pipelines.py, written once per run: never edit it, copy it."""
    from _pipelines import make_class_latent_pipeline_dir

    return make_class_latent_pipeline_dir(tmp_path_factory.mktemp("cl") / "cl")


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs (root on Linux, as on this project's machines and CI), to fill a disk for real.

    Skipped with the reason where mounting is refused.
    """
    import shutil
    import subprocess

    if sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root on Linux")
    mnt = tmp_path / "full"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
