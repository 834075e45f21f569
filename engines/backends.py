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

from .errors import BuildError
from .manifest import BACKENDS, EngineManifest
from .runner import Runner

__all__ = ["EngineBackend", "ENGINE_BACKENDS", "engine_backend", "build_engine"]


@dataclass(frozen=True)
class EngineBackend:
    """build(onnx_path, out_dir, overwrite, optimization_level, provider) -> EngineManifest, where the ONNX
    Runtime level and execution provider are None unless asked for (a backend without them refuses them);
    runner(model_path, engine_manifest, threads) -> an inactive Runner (the engine.json `sample` verified: its
    ONNX manifest, the ONNX Runtime provider, where a TensorRT plan was built)."""

    build: Callable[[Path, Path, bool, "str | None", "str | None"], EngineManifest]
    runner: Callable[[Path, EngineManifest, "int | None"], Runner]


def _build_onnxruntime(onnx_path: Path, out_dir: Path, overwrite: bool, optimization_level: str | None,
                       provider: str | None) -> EngineManifest:
    from .build import build_onnxruntime_engine

    return build_onnxruntime_engine(onnx_path, out_dir, optimization_level=optimization_level,
                                    provider=provider or "cpu", overwrite=overwrite)


def _onnxruntime_runner(model: Path, engine: EngineManifest, threads: int | None) -> Runner:
    """The engine's runner on the provider its engine.json records."""
    from .build import tensorrt_provider_options
    from .ort import OnnxRuntimeRunner

    provider = engine.ort_provider or "cpu"
    options = tensorrt_provider_options(engine.onnx, model.parent) if provider == "tensorrt" else None
    return OnnxRuntimeRunner(model, engine.onnx, provider=provider, intra_op_threads=threads,
                             tensorrt_options=options)


def _build_tensorrt(onnx_path: Path, out_dir: Path, overwrite: bool, optimization_level: str | None,
                    provider: str | None) -> EngineManifest:
    for name, value in (("optimization_level", optimization_level), ("provider", provider)):
        if value is not None:  # ONNX Runtime's settings: TensorRT builds its own plan
            raise BuildError(f"{name}={value!r} is a setting of backend onnxruntime; backend tensorrt takes none "
                             "(TensorRT optimizes the whole graph itself): leave it out.")
    from .tensorrt_build import build_tensorrt_engine

    return build_tensorrt_engine(onnx_path, out_dir, overwrite=overwrite)


def _tensorrt_runner(model: Path, engine: EngineManifest, threads: int | None) -> Runner:
    from .tensorrt_runner import TensorRTRunner

    return TensorRTRunner(model, engine.onnx, built=engine.tensorrt)


ENGINE_BACKENDS: dict[str, EngineBackend] = {
    "onnxruntime": EngineBackend(build=_build_onnxruntime, runner=_onnxruntime_runner),
    "tensorrt": EngineBackend(build=_build_tensorrt, runner=_tensorrt_runner),
}
assert tuple(ENGINE_BACKENDS) == BACKENDS, "engines.manifest.BACKENDS names the backends this table defines"


def engine_backend(name: str) -> EngineBackend:
    """The entry of `name` (engine.json and the CLI have checked it against BACKENDS)."""
    return ENGINE_BACKENDS[name]


def build_engine(backend: str, onnx_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                 overwrite: bool = False, optimization_level: str | None = None,
                 provider: str | None = None) -> EngineManifest:
    """build-engine for any backend.

    Args:
        optimization_level, provider: backend onnxruntime's graph optimization level (cpu provider only)
            and execution provider (engines.manifest.ORT_PROVIDERS); None: its defaults (extended, cpu).
            Backend tensorrt refuses both.
    """
    return engine_backend(backend).build(Path(onnx_path), Path(out_dir), overwrite, optimization_level, provider)
