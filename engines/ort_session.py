"""The one place an ONNX Runtime session is made: the CPU provider unless told otherwise, an optional
graph-optimisation level and thread count, and optionally the optimised graph saved to a file (what
build-engine keeps as the engine). Every caller (the runner, build-engine, the parity check, the
benchmarks and scripts) goes through :func:`ort_session`, so a session option is set in one place.
"""

from __future__ import annotations

import os
from typing import Any, Literal, get_args

from ._lazy import ORT_HINT, lazy_import

__all__ = ["OptimizationLevel", "OPTIMIZATION_LEVELS", "ort_session"]

OptimizationLevel = Literal["disabled", "basic", "extended", "all"]
OPTIMIZATION_LEVELS: tuple[str, ...] = get_args(OptimizationLevel)
_ORT_LEVEL_NAMES = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                    "all": "ORT_ENABLE_ALL"}


def ort_session(model: str | os.PathLike[str] | bytes, *, optimization_level: OptimizationLevel | None = None,
                threads: int | None = None, inter_op_threads: int | None = None,
                providers: list[str] | None = None,
                optimized_model_path: str | os.PathLike[str] | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` of `model` (a path, or a serialised ModelProto).

    Args:
        optimization_level: one of OPTIMIZATION_LEVELS; None keeps ONNX Runtime's default (all).
        threads: intra-op threads; None keeps ONNX Runtime's default (all cores).
        inter_op_threads: inter-op threads (the benchmarks pin 1); None keeps the default.
        providers: execution providers in priority order; default the CPU provider alone.
        optimized_model_path: where ONNX Runtime saves the graph it optimised (build-engine's engine).

    Raises:
        BackendUnavailableError: onnxruntime is not installed. Load failures are ONNX Runtime's own
        exceptions: each caller words them for its command.
    """
    ort = lazy_import("onnxruntime", ORT_HINT)
    options = ort.SessionOptions()
    if optimization_level is not None:
        if optimization_level not in _ORT_LEVEL_NAMES:
            raise ValueError(f"optimization_level={optimization_level!r} is not one of {', '.join(OPTIMIZATION_LEVELS)}")
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _ORT_LEVEL_NAMES[optimization_level])
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    if inter_op_threads is not None:
        options.inter_op_num_threads = int(inter_op_threads)
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=options, providers=providers or ["CPUExecutionProvider"])
