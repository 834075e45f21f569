"""TensorRT runner: deserializes ``model.plan`` and executes it with ``execute_async_v3``.

Device memory is handled with the plain CUDA runtime bindings (cuda-python), imported lazily, so no
torch or pycuda is needed on the device. Buffers are allocated once for the profile's maximum batch
and reused; each call sets the input shapes and tensor addresses, copies in, executes, copies out.
Like the builder, this cannot run in this project's workplace; its tests skip without TensorRT.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ._lazy import CUDA_HINT, lazy_import
from .errors import BackendUnavailableError, RunnerError
from .manifest import OnnxManifest
from .runner import Runner
from .tensorrt_build import import_tensorrt

__all__ = ["TensorRTRunner"]


def _import_cudart() -> ModuleType:
    try:  # cuda-python >= 12.6 moved the runtime bindings
        return lazy_import("cuda.bindings.runtime", CUDA_HINT, label="cuda-python")
    except BackendUnavailableError:
        return lazy_import("cuda.cudart", CUDA_HINT, label="cuda-python")


class TensorRTRunner(Runner):
    """Run a TensorRT plan built by :func:`engines.tensorrt_build.build_tensorrt_engine`.

    Args:
        plan_path: the engine directory's ``model.plan``.
        manifest: its ONNX manifest (from ``engine.json``).
    """

    def __init__(self, plan_path: str | os.PathLike[str], manifest: OnnxManifest) -> None:
        super().__init__(manifest, name=f"tensorrt:{Path(plan_path).name}")
        self.plan_path = Path(plan_path)
        self._state: dict[str, Any] = {}

    def _cuda(self, result: tuple[Any, ...]) -> Any:
        cudart = self._state["cudart"]
        err, *rest = result
        if err != cudart.cudaError_t.cudaSuccess:
            raise RunnerError(f"CUDA call failed with {err}; check the GPU and driver of this machine.")
        return rest[0] if len(rest) == 1 else tuple(rest)

    def activate_impl(self) -> None:
        trt = import_tensorrt()
        self._state["cudart"] = cudart = _import_cudart()
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if engine is None:
            raise RunnerError(f"TensorRT cannot load {self.plan_path}; plans only run with the TensorRT version and GPU that built them, rebuild it here.")
        context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        out = self.manifest.output_name
        if sorted(names) != sorted([*self.manifest.input_names, out]):
            raise RunnerError(f"{self.plan_path} has tensors {names}, but its manifest promises {list(self.manifest.input_names)} -> {out!r}.")
        max_batch = int(engine.get_tensor_profile_shape("sample", 0)[2][0])
        c, h, w = self.manifest.image_shape
        dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        sizes = {"sample": max_batch * c * h * w, "timestep": max_batch, out: max_batch * c * h * w}
        self._state.update(runtime=runtime, engine=engine, context=context, max_batch=max_batch, dtypes=dtypes,
                           stream=self._cuda(cudart.cudaStreamCreate()), buffers={})
        for n in names:
            self._state["buffers"][n] = self._cuda(cudart.cudaMalloc(sizes[n] * dtypes[n].itemsize))

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        s = self._state
        cudart, context, stream, buffers = s["cudart"], s["context"], s["stream"], s["buffers"]
        batch = feed["sample"].shape[0]
        if batch > s["max_batch"]:
            raise RunnerError(f"Batch {batch} exceeds the engine's maximum batch {s['max_batch']}; lower --batch-size or rebuild with a larger max_batch.")
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        hosts = {}
        for name, arr in feed.items():
            host = np.ascontiguousarray(arr, dtype=s["dtypes"][name])
            hosts[name] = host  # keep alive until the stream is synchronized
            context.set_input_shape(name, host.shape)
            self._cuda(cudart.cudaMemcpyAsync(buffers[name], host.ctypes.data, host.nbytes, h2d, stream))
        for name, ptr in buffers.items():
            context.set_tensor_address(name, int(ptr))
        if not context.execute_async_v3(stream):
            raise RunnerError("TensorRT execution failed (see its log above).")
        out_name = self.manifest.output_name
        result = np.empty(tuple(context.get_tensor_shape(out_name)), dtype=s["dtypes"][out_name])
        self._cuda(cudart.cudaMemcpyAsync(result.ctypes.data, buffers[out_name], result.nbytes, d2h, stream))
        self._cuda(cudart.cudaStreamSynchronize(stream))
        return {out_name: result.astype(np.float32, copy=False)}

    def deactivate_impl(self) -> None:
        s, self._state = self._state, {}
        cudart = s.get("cudart")
        if cudart is None:
            return
        for ptr in s.get("buffers", {}).values():
            cudart.cudaFree(ptr)
        if "stream" in s:
            cudart.cudaStreamDestroy(s["stream"])
