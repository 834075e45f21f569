"""The few CUDA runtime calls the TensorRT path makes, through cuda-python (imported lazily).

TensorRT needs device memory, a stream and, for fast copies, page-locked host memory; NVIDIA's own
Python samples get them from cuda-python's runtime bindings (NVIDIA/TensorRT
samples/python/common_runtime.py: ``cuda_call``, ``PinnedHostMem``, ``DeviceMem``), which is what this
module follows, so a Jetson needs neither torch nor pycuda. It also names the GPU a plan is built on
(:func:`current_gpu`), since a plan only runs on the GPU model that built it.

Every call returns ``(cudaError_t, *results)``; :func:`cuda_call` turns a failure into one sentence.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from ._lazy import CUDA_HINT, lazy_import
from .errors import BackendUnavailableError, EngineError, RunnerError

__all__ = ["GpuInfo", "import_cudart", "cuda_call", "current_gpu", "PinnedHostBuffer", "DeviceBuffer"]


def import_cudart() -> ModuleType:
    """Import cuda-python's runtime bindings (``cuda.bindings.runtime``, ``cuda.cudart`` before 12.6).

    Raises:
        BackendUnavailableError: cuda-python is not installed, with the install hint.
    """
    try:  # the module NVIDIA's samples import (common_runtime.py: `from cuda.bindings import runtime`)
        return lazy_import("cuda.bindings.runtime", CUDA_HINT, label="cuda-python")
    except BackendUnavailableError:
        return lazy_import("cuda.cudart", CUDA_HINT, label="cuda-python")


def cuda_call(cudart: ModuleType, result: tuple[Any, ...], what: str, error: type[EngineError] = RunnerError) -> Any:
    """Unpack a cuda-python call's ``(err, *values)``: the value (or tuple of values, or None).

    Args:
        cudart: the runtime module (:func:`import_cudart`).
        result: what the call returned.
        what: the call's name for the message, e.g. "cudaMallocHost(1048576)".
        error: the error class to raise (BuildError during a build).

    Raises:
        error: the call failed; the message names it and CUDA's error name.
    """
    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        name = getattr(err, "name", str(err))
        raise error(f"CUDA call {what} failed with {name}; check the GPU and driver of this machine (nvidia-smi), "
                    "and that no other process holds all its memory.")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@dataclass(frozen=True)
class GpuInfo:
    """A CUDA device's name (e.g. "Orin", "NVIDIA H200") and compute capability ("8.7", "9.0")."""

    name: str
    compute_capability: str


def current_gpu(cudart: ModuleType, error: type[EngineError] = RunnerError) -> GpuInfo:
    """The name and compute capability of the current CUDA device (the one TensorRT builds and runs on).

    Raises:
        error: no CUDA device, or the driver cannot be queried.
    """
    device = cuda_call(cudart, cudart.cudaGetDevice(), "cudaGetDevice()", error)
    prop = cuda_call(cudart, cudart.cudaGetDeviceProperties(device), f"cudaGetDeviceProperties({device})", error)
    name = prop.name
    if isinstance(name, bytes):  # cudaDeviceProp.name is a char[256]: bytes up to the first NUL
        name = name.split(b"\0", 1)[0].decode("utf-8", "replace")
    return GpuInfo(name=str(name).strip(), compute_capability=f"{prop.major}.{prop.minor}")


class PinnedHostBuffer:
    """Page-locked host memory (cudaMallocHost) seen as a flat numpy array of ``count`` x ``dtype``.

    Why: ``cudaMemcpyAsync`` from pageable memory is staged through a driver buffer and does not overlap
    with anything; from page-locked memory it is a direct DMA. The runner allocates one per tensor for
    the engine's maximum batch, once, and reuses it for every call. The array view follows
    common_runtime.py's ``PinnedHostMem.array`` (a byte view cast to ``dtype``). Never keep the array
    after :meth:`free`.
    """

    def __init__(self, cudart: ModuleType, count: int, dtype: np.dtype | type,
                 error: type[EngineError] = RunnerError) -> None:
        self._cudart = cudart
        self.dtype = np.dtype(dtype)
        self.nbytes = int(count) * self.dtype.itemsize
        allocated = cuda_call(cudart, cudart.cudaMallocHost(self.nbytes), f"cudaMallocHost({self.nbytes})", error)
        self.ptr: int = int(allocated)
        raw = ctypes.cast(ctypes.c_void_p(self.ptr), ctypes.POINTER(ctypes.c_ubyte))
        self.array: np.ndarray | None = np.ctypeslib.as_array(raw, (self.nbytes,)).view(self.dtype)

    def free(self) -> None:
        """Release the memory (idempotent); the array view is dropped first."""
        self.array = None
        if self.ptr:
            self._cudart.cudaFreeHost(self.ptr)  # best effort: freeing never raises over the real error
            self.ptr = 0


class DeviceBuffer:
    """``nbytes`` of device memory (cudaMalloc), released by :meth:`free`."""

    def __init__(self, cudart: ModuleType, nbytes: int, error: type[EngineError] = RunnerError) -> None:
        self._cudart = cudart
        self.nbytes = int(nbytes)
        self.ptr: int = int(cuda_call(cudart, cudart.cudaMalloc(self.nbytes), f"cudaMalloc({self.nbytes})", error))

    def free(self) -> None:
        """Release the memory (idempotent)."""
        if self.ptr:
            self._cudart.cudaFree(self.ptr)
            self.ptr = 0
