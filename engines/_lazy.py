"""The one place where heavy optional packages are imported.

onnxruntime, tensorrt and the CUDA bindings are optional at import time: ``engines`` must import on
a machine that has only one of them (a Jetson has TensorRT, a CPU box has onnxruntime), and
``pqcad-deploy --help`` must stay fast. Modules therefore call :func:`lazy_import` inside the
function that needs the package, and a missing package becomes a
:class:`~engines.errors.BackendUnavailableError` carrying the install hint instead of a bare
``ModuleNotFoundError`` deep in a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import BackendUnavailableError

__all__ = ["lazy_import", "ORT_HINT", "TRT_HINT", "CUDA_HINT"]

ORT_HINT = "install it with `pip install onnxruntime` (or onnxruntime-gpu on a CUDA machine)"
TRT_HINT = (
    "use --backend onnxruntime, or build on a machine with TensorRT 10 (e.g. a Jetson with JetPack 6)"
)
CUDA_HINT = "install the CUDA Python bindings matching your CUDA version (`pip install cuda-python`)"


def lazy_import(name: str, install_hint: str, *, label: str | None = None) -> ModuleType:
    """Import ``name`` now, or explain how to get it.

    Args:
        name: dotted module name, e.g. ``"onnxruntime"`` or ``"cuda.bindings.runtime"``.
        install_hint: what the user should do, appended to the message.
        label: the package's human name for the message (default ``name``), e.g. "TensorRT".

    Returns:
        The imported module.

    Raises:
        BackendUnavailableError: when the import fails for any reason (missing package, or a package
            whose native libraries do not load, which is common for GPU wheels).
    """
    try:
        return importlib.import_module(name)
    except Exception as exc:  # ImportError, OSError from missing .so files, ...
        reason = exc if isinstance(exc, ImportError) else f"{type(exc).__name__}: {exc}"
        raise BackendUnavailableError(
            f"{label or name} is not installed on this machine: {reason}; {install_hint}."
        ) from exc
