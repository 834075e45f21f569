"""The engine backends, one entry each: how build-engine builds an engine folder for a backend and how
sample runs one. cli.py and engines.generate read this table instead of branching on the name, so a
backend is one entry (its build and runner modules are imported only when used: a Jetson has TensorRT
and no ONNX Runtime wheel of our choosing, a CPU machine the reverse). The names are
engines.manifest.BACKENDS (what an engine.json may say).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .manifest import BACKENDS, EngineManifest, OnnxManifest
from .runner import Runner

__all__ = ["EngineBackend", "ENGINE_BACKENDS", "engine_backend", "build_engine"]


@dataclass(frozen=True)
class EngineBackend:
    """build(onnx_path, out_dir, overwrite, optimization_level) -> EngineManifest (the ONNX Runtime level
    is ignored by backends without one); runner(model_path, onnx_manifest, threads) -> an inactive Runner."""

    build: Callable[[Path, Path, bool, str], EngineManifest]
    runner: Callable[[Path, OnnxManifest, "int | None"], Runner]


def _build_onnxruntime(onnx_path: Path, out_dir: Path, overwrite: bool, optimization_level: str) -> EngineManifest:
    from .build import build_onnxruntime_engine

    return build_onnxruntime_engine(onnx_path, out_dir, optimization_level=optimization_level, overwrite=overwrite)


def _onnxruntime_runner(model: Path, manifest: OnnxManifest, threads: int | None) -> Runner:
    from .ort import OnnxRuntimeRunner

    return OnnxRuntimeRunner(model, manifest, intra_op_threads=threads)


def _build_tensorrt(onnx_path: Path, out_dir: Path, overwrite: bool, optimization_level: str) -> EngineManifest:
    from .tensorrt_build import build_tensorrt_engine

    return build_tensorrt_engine(onnx_path, out_dir, overwrite=overwrite)


def _tensorrt_runner(model: Path, manifest: OnnxManifest, threads: int | None) -> Runner:
    from .tensorrt_runner import TensorRTRunner

    return TensorRTRunner(model, manifest)


ENGINE_BACKENDS: dict[str, EngineBackend] = {
    "onnxruntime": EngineBackend(build=_build_onnxruntime, runner=_onnxruntime_runner),
    "tensorrt": EngineBackend(build=_build_tensorrt, runner=_tensorrt_runner),
}
assert tuple(ENGINE_BACKENDS) == BACKENDS, "engines.manifest.BACKENDS names the backends this table defines"


def engine_backend(name: str) -> EngineBackend:
    """The entry of `name` (engine.json and the CLI have checked it against BACKENDS)."""
    return ENGINE_BACKENDS[name]


def build_engine(backend: str, onnx_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                 overwrite: bool = False, optimization_level: str = "extended") -> EngineManifest:
    """build-engine for any backend."""
    return engine_backend(backend).build(Path(onnx_path), Path(out_dir), overwrite, optimization_level)
