"""Build an ONNX Runtime engine directory from our ONNX.

The build is ONNX Runtime's offline graph optimization: the fused graph (QDQ folded into integer
kernels, constant folding, node fusions) is saved once so every ``sample`` run skips that work. The
default level is EXTENDED, not ALL: ALL adds layout transformations (NCHWc) specific to the CPU the
build ran on, and an engine directory must run on any machine with the same onnxruntime.

The directory is assembled in a temporary sibling and renamed into place at the end, so a failed
build never leaves a valid-looking engine.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from ._atomic import staged_directory
from ._lazy import ORT_HINT, lazy_import
from .ort_session import OPTIMIZATION_LEVELS, OptimizationLevel, ort_session
from .ddim import DDIMConfig
from .errors import BuildError, ConfigError
from .manifest import (
    EngineManifest,
    OnnxManifest,
    check_graph_file,
    read_onnx_manifest,
    sha256_file,
    write_engine_manifest,
)

__all__ = ["OptimizationLevel", "OPTIMIZATION_LEVELS", "ORT_MODEL_FILE", "build_onnxruntime_engine", "check_buildable"]

ORT_MODEL_FILE = "model.onnx"


def check_buildable(onnx_path: str | os.PathLike[str]) -> OnnxManifest:
    """Read our manifest from ``onnx_path`` and check that the runtime can sample with it.

    Failing here (a foreign ONNX, an unsupported scheduler config) is cheaper than failing after a
    long build or at the first ``sample``.

    The manifest is also checked against the graph it describes (input/output names, the sample's
    C/H/W, fp32 vs quantized nodes): a manifest claiming w4a4 on a float graph is refused here.

    Raises:
        ManifestError: not our ONNX, an invalid manifest, or one that disagrees with its graph.
        BuildError: the scheduler config is one the numpy sampler refuses.
    """
    manifest = read_onnx_manifest(onnx_path)
    check_graph_file(onnx_path, manifest)
    try:
        DDIMConfig.from_dict(manifest.scheduler_config)
    except ConfigError as exc:
        raise BuildError(f"{onnx_path}: {exc}") from exc
    return manifest


def build_onnxruntime_engine(
    onnx_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    optimization_level: OptimizationLevel = "extended",
    overwrite: bool = False,
    smoke_test: bool = True,
) -> EngineManifest:
    """Optimize ``onnx_path`` with ONNX Runtime and write ``out_dir/{model.onnx, engine.json}``.

    Args:
        onnx_path: our ONNX (with ``pqcad.manifest`` metadata).
        out_dir: the engine directory to create.
        optimization_level: ONNX Runtime graph optimization level; "extended" by default (see module doc).
        overwrite: replace an existing non-empty ``out_dir``.
        smoke_test: run the optimized model once on a batch of one and check the output shape,
            so a graph that loads but cannot run is caught at build time.

    Returns:
        The engine manifest that was written.

    Raises:
        ManifestError: ``onnx_path`` is missing, unreadable or not written by pqcad-deploy export.
        BuildError: bad arguments, an existing ``out_dir``, an unwritable parent, or ONNX Runtime failing.
        BackendUnavailableError: onnxruntime is not installed.
    """
    if optimization_level not in OPTIMIZATION_LEVELS:
        raise BuildError(f"optimization_level={optimization_level!r} is not one of {', '.join(OPTIMIZATION_LEVELS)}.")
    onnx_path = Path(onnx_path)
    manifest = check_buildable(onnx_path)
    lazy_import("onnxruntime", ORT_HINT)  # before staging anything: the clear error when it is missing
    with staged_directory(out_dir, overwrite=overwrite, error=BuildError, kind="engine") as tmp:
        model_path = tmp / ORT_MODEL_FILE
        try:
            ort_session(onnx_path, optimization_level=optimization_level, optimized_model_path=model_path)
        except Exception as exc:
            if _input_loads(onnx_path):  # so it was saving the optimized model that failed
                raise _write_failure(out_dir, tmp, exc) from exc
            raise BuildError(f"ONNX Runtime could not load {onnx_path} ({type(exc).__name__}: {exc}); check the export.") from exc
        if not model_path.is_file():
            raise _write_failure(out_dir, tmp, None)
        if smoke_test:
            try:
                _smoke_test(model_path, manifest)
            except BuildError as exc:  # a truncated write reads as a broken model
                if _disk_full(tmp):
                    raise _write_failure(out_dir, tmp, exc) from exc
                raise
        engine = EngineManifest(
            backend="onnxruntime",
            model_file=ORT_MODEL_FILE,
            model_sha256=sha256_file(model_path),
            source_onnx_sha256=sha256_file(onnx_path),
            onnx=manifest,
        )
        write_engine_manifest(tmp, engine)
    return engine


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _disk_full(path: Path, margin: int = 1 << 20) -> bool:
    free = _free_bytes(path)
    return free is not None and free < margin


def _input_loads(onnx_path: Path) -> bool:
    """Whether ONNX Runtime loads the input when it writes nothing (tells a bad input from a bad output)."""
    try:
        ort_session(onnx_path, optimization_level="disabled")
    except Exception:
        return False
    return True


def _write_failure(out_dir: str | os.PathLike[str], tmp: Path, exc: BaseException | None) -> BuildError:
    """The error for an optimized model that could not be written where the engine goes."""
    free = _free_bytes(tmp)
    where = f"the disk holding {Path(out_dir).resolve().parent}"
    state = (f"{where} is full ({free} bytes free)" if free is not None and free < (1 << 20)
             else f"{where} has {free} bytes free" if free is not None else f"{where} cannot be inspected")
    detail = "" if exc is None else f" ({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''})"
    return BuildError(f"cannot write the engine to {out_dir}: ONNX Runtime failed to save the optimized model"
                      f"{detail} although it loads the input ONNX fine, and {state}; free space or choose "
                      "another -o location.")


def _smoke_test(model_path: Path, manifest: OnnxManifest) -> None:
    c, h, w = manifest.image_shape
    feed = {"sample": np.zeros((1, c, h, w), np.float32),
            "timestep": np.full((1,), manifest.student_timesteps[0], np.float32)}
    try:
        session = ort_session(model_path)
        (out,) = session.run([manifest.output_name], feed)
    except Exception as exc:
        raise BuildError(f"The optimized model does not run ({type(exc).__name__}: {exc}); try optimization_level='basic'.") from exc
    if tuple(out.shape) != (1, c, h, w):
        raise BuildError(f"The model's {manifest.output_name!r} has shape {list(out.shape)}, expected [1, {c}, {h}, {w}]; check the export.")
