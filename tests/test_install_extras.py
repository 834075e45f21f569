"""The install extras resolve, for the machine they are for, from the package registry (pip's resolver).

``jetson``: the torch-free runtime on JetPack 6.1/6.2 (aarch64, CPython 3.10, glibc 2.35 of Ubuntu 22.04)
resolves to wheels only, with cuda-python 12.6, NumPy 1.x, onnx and onnxruntime, and without torch or any
``nvidia-*`` CUDA wheel (JetPack brings CUDA and TensorRT). ``gpu``: x86_64 gets onnxruntime-gpu next to
the base onnxruntime (why README says to reinstall onnxruntime-gpu alone).

What is resolved is the requirement list read from pyproject.toml, not a wheel built from the checkout:
pip's ``--platform`` resolution takes wheels only (``--only-binary=:all:``), so it cannot build our
project for another platform, and building our wheel would only copy the same lists into its metadata
(``[project] dependencies`` and ``optional-dependencies`` are static, setuptools writes them verbatim as
Requires-Dist). ``pip install --dry-run --report`` resolves from the registry's metadata files (PEP 658)
without downloading the wheels and writes the resolved set as JSON.

Needs the registry: skipped with the reason when it cannot be reached (checked with one HEAD request).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JETSON_PLATFORMS = ["manylinux2014_aarch64"] + [f"manylinux_2_{n}_aarch64" for n in range(17, 36)]
"""Every manylinux tag a JetPack 6 system takes: its Ubuntu 22.04 has glibc 2.35 (pip matches tags exactly)."""
X86_PLATFORMS = ["manylinux2014_x86_64"] + [f"manylinux_2_{n}_x86_64" for n in range(17, 36)]


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml on Python 3.10 needs tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _requirements(extra: str) -> list[str]:
    """The base dependencies plus one extra's, as written in pyproject.toml."""
    project = _pyproject()["project"]
    extra_requirements = project["optional-dependencies"][extra]
    self_references = [r for r in extra_requirements if re.match(r"pqcad[-_.]deploy\b", r, re.I)]
    assert not self_references, f"extra {extra!r} names the project itself ({self_references}); expand it here"
    return [*project["dependencies"], *extra_requirements]


def _registry_or_skip() -> None:
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(f"{index}/pip/", method="HEAD"), timeout=5).close()
    except (urllib.error.URLError, OSError) as exc:
        pytest.skip(f"the package registry {index} cannot be reached from here ({exc}); the resolution needs it")


def _resolve(requirements: list[str], platforms: list[str], python: str, tmp_path: Path) -> dict[str, dict]:
    """pip's resolution of ``requirements`` for ``platforms`` / CPython ``python``: name -> report entry."""
    _registry_or_skip()
    report = tmp_path / "report.json"
    abi = "cp" + python.replace(".", "")
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report",
           str(report), "--only-binary=:all:", *(f"--platform={p}" for p in platforms), "--python-version", python,
           "--implementation", "cp", "--abi", abi, *requirements]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, (f"pip could not resolve {requirements} for {platforms[0]} cp{python}:\n"
                                  f"{proc.stderr[-3000:]}")
    entries = json.loads(report.read_text())["install"]
    return {re.sub(r"[-_.]+", "-", e["metadata"]["name"]).lower(): e for e in entries}


def _wheel(entry: dict) -> str:
    return entry["download_info"]["url"].rsplit("/", 1)[-1]


def test_jetson_extra_resolves_for_jetpack6_without_torch(tmp_path: Path) -> None:
    resolved = _resolve(_requirements("jetson"), JETSON_PLATFORMS, "3.10", tmp_path)
    names = set(resolved)
    assert {"cuda-python", "numpy", "onnx", "onnxruntime", "click", "tqdm", "pillow"} <= names, sorted(names)
    assert "torch" not in names and not [n for n in names if n.startswith("nvidia-")], sorted(names)
    versions = {n: e["metadata"]["version"] for n, e in resolved.items()}
    assert versions["numpy"].startswith("1."), versions  # TensorRT 10.3's bindings (pyproject's comment)
    assert versions["cuda-python"].startswith("12.6."), versions  # CUDA 12.6 of JetPack 6.1/6.2
    for name, entry in resolved.items():  # every file is an aarch64 CPython 3.10 wheel or a pure one
        wheel = _wheel(entry)
        assert wheel.endswith(".whl") and (("cp310" in wheel or "abi3" in wheel) and "aarch64" in wheel
                                           or wheel.endswith("-none-any.whl")), (name, wheel)


def test_gpu_extra_brings_onnxruntime_gpu_next_to_onnxruntime(tmp_path: Path) -> None:
    resolved = _resolve(_requirements("gpu"), X86_PLATFORMS, "3.11", tmp_path)
    assert {"onnxruntime", "onnxruntime-gpu"} <= set(resolved), sorted(resolved)
    assert "torch" not in resolved and not [n for n in resolved if n.startswith("nvidia-")], sorted(resolved)
    assert "x86_64" in _wheel(resolved["onnxruntime-gpu"])
