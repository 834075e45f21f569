"""TensorRT runner: checks where ``model.plan`` was built, deserializes it, runs it with ``execute_async_v3``.

Device memory, the stream and page-locked host buffers come from cuda-python's runtime bindings
(:mod:`engines.cuda_runtime`), as in NVIDIA's Python samples, so no torch or pycuda is needed on the
device. Everything is allocated once for the profile's maximum batch in :meth:`activate`: a device
buffer and a pinned host buffer per tensor, and the tensor addresses are set once. Each call copies
the inputs into the pinned buffers, sets the input shapes (a shape TensorRT refuses is an error),
copies in, executes, copies out and synchronizes; the result is a fresh float32 array.

Before TensorRT reads the plan, the build record in ``engine.json`` (:class:`TensorRTBuildInfo`) is
compared with this machine: a plan built by another TensorRT version or on another GPU is refused
with one sentence saying what was built where (:func:`check_plan_built_here`). Like the builder, this
cannot run in this project's workplace (no TensorRT there); its tests skip without TensorRT.

Why not Polygraphy's ``TrtRunner`` / loaders (NVIDIA/TensorRT tools/Polygraphy, polygraphy/backend/trt,
read at 11.1): its runner's own docstring says runners "are not designed for production deployment
and should generally be used only for prototyping, testing, and debugging"; its ``infer`` installs a
debug listener and an output allocator on every call (this runner is called once per DDIM step and
batch, so per-call work is paid hundreds of times per image set); its CUDA wrapper
(polygraphy/cuda/cuda.py, ctypes over libcudart) has no page-locked allocation, so its copies are
pageable (``_get_array_on_cpu`` uses ``np.empty``); and it returns views into buffers it reuses on
the next call. Its loaders would replace three short functions in tensorrt_build.py while hiding the
TensorRT 10/11 differences we must guard (``CreateConfig`` sets INT8/FP16 by name and fails on 11).
The device then needs TensorRT and cuda-python only, both part of NVIDIA's own Jetson stack. Polygraphy
stays the right tool to cross-check an engine by hand (``polygraphy run model.onnx --trt --onnxrt``,
``polygraphy inspect model model.plan``); nothing here imports it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from .cuda_runtime import DeviceBuffer, GpuInfo, PinnedHostBuffer, cuda_call, current_gpu, import_cudart
from .errors import RunnerError
from .manifest import ENGINE_MANIFEST_FILE, OnnxManifest, TensorRTBuildInfo, read_engine_manifest
from .runner import Runner
from .tensorrt_build import import_tensorrt

__all__ = ["TensorRTRunner", "check_plan_built_here", "recorded_build"]


def check_plan_built_here(plan_path: str | os.PathLike[str], built: TensorRTBuildInfo, tensorrt_version: str,
                          gpu: GpuInfo) -> None:
    """Refuse a plan built by another TensorRT version or on another GPU model, before TensorRT reads it.

    TensorRT plans are specific to the TensorRT version and the GPU model that built them (TensorRT's
    "Engine Compatibility": by default an engine runs only with the TensorRT version that built it, and
    is not portable across GPU architectures); we refuse a different GPU name too, since NVIDIA's
    portability notes tie an engine to the exact GPU model.

    Raises:
        RunnerError: one sentence: built with what on what, this machine's TensorRT and GPU, rebuild here.
    """
    here = TensorRTBuildInfo(tensorrt_version=tensorrt_version, gpu_name=gpu.name,
                             compute_capability=gpu.compute_capability, trtexec_command=built.trtexec_command)
    if here == built:
        return
    raise RunnerError(
        f"{plan_path} was built with TensorRT {built.tensorrt_version} on {built.gpu_name} (compute capability "
        f"{built.compute_capability}), but this machine has TensorRT {tensorrt_version} on {gpu.name} (compute "
        f"capability {gpu.compute_capability}); a TensorRT plan runs only with the TensorRT version and GPU that "
        "built it: rebuild the engine here with pqcad-deploy build-engine --backend tensorrt.")


def recorded_build(plan_path: str | os.PathLike[str]) -> TensorRTBuildInfo | None:
    """The build record of the engine.json next to ``plan_path``; None without one (engine version < 3).

    Raises:
        ManifestError: that engine.json is invalid.
    """
    engine_dir = Path(plan_path).parent
    if not (engine_dir / ENGINE_MANIFEST_FILE).is_file():
        return None
    return read_engine_manifest(engine_dir).tensorrt


class TensorRTRunner(Runner):
    """Run a TensorRT plan built by :func:`engines.tensorrt_build.build_tensorrt_engine`.

    Args:
        plan_path: the engine directory's ``model.plan``.
        manifest: its ONNX manifest (from ``engine.json``).
        built: where the plan was built; by default read from the engine.json next to ``plan_path``
            (an engine.json older than version 3 has none, and the plan is then loaded unchecked).
    """

    def __init__(self, plan_path: str | os.PathLike[str], manifest: OnnxManifest,
                 built: TensorRTBuildInfo | None = None) -> None:
        super().__init__(manifest, name=f"tensorrt:{Path(plan_path).name}")
        self.plan_path = Path(plan_path)
        self.built = built
        self._state: dict[str, Any] = {}

    def activate_impl(self) -> None:
        trt = import_tensorrt()
        cudart = import_cudart()
        built = self.built if self.built is not None else recorded_build(self.plan_path)
        if built is not None:
            check_plan_built_here(self.plan_path, built, str(trt.__version__), current_gpu(cudart))
        self._state["cudart"] = cudart
        try:
            self._load(trt, cudart)
        except BaseException:
            self.deactivate_impl()  # free what was allocated before the failure
            raise

    def _load(self, trt: ModuleType, cudart: ModuleType) -> None:
        s = self._state
        s["runtime"] = runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        s["engine"] = engine = runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if engine is None:
            raise RunnerError(f"TensorRT cannot load {self.plan_path} (its log above says why); plans only run with the "
                              "TensorRT version and GPU that built them: rebuild the engine here.")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        out = self.manifest.output_name
        if sorted(names) != sorted([*self.manifest.input_names, out]):
            raise RunnerError(f"{self.plan_path} has tensors {names}, but its manifest promises "
                              f"{list(self.manifest.input_names)} -> {out!r}; rebuild the engine.")
        s["context"] = context = engine.create_execution_context()
        # get_tensor_profile_shape(name, profile) -> (min, opt, max) (common_runtime.py allocate_buffers)
        s["max_batch"] = max_batch = int(engine.get_tensor_profile_shape("sample", 0)[2][0])
        # elements per batch row of every tensor: sample, timestep, a conditional model's input, the output
        per_sample = {i.name: i.per_sample for i in self.manifest.graph_inputs}
        per_sample[out] = math.prod(self.manifest.image_shape)
        s["dtypes"] = dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        s["stream"] = cuda_call(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate()")
        s["device"], s["host"] = {}, {}
        for n in names:
            count = max_batch * per_sample[n]
            s["device"][n] = DeviceBuffer(cudart, count * dtypes[n].itemsize)
            s["host"][n] = PinnedHostBuffer(cudart, count, dtypes[n])
            if not context.set_tensor_address(n, s["device"][n].ptr):  # addresses stay set in the context
                raise RunnerError(f"TensorRT refused the device address of {n!r} in {self.plan_path}; "
                                  "rebuild the engine.")

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        s = self._state
        cudart, context, stream = s["cudart"], s["context"], s["stream"]
        batch = feed["sample"].shape[0]
        if batch > s["max_batch"]:
            twice = " (guidance runs each image twice per call)" if self.manifest.conditioning is not None else ""
            raise RunnerError(f"Batch {batch} exceeds the engine's maximum batch {s['max_batch']}; lower --batch-size"
                              f"{twice} or rebuild with a larger max_batch.")
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, arr in feed.items():
            host = s["host"][name]
            host.array[: arr.size] = arr.reshape(-1)  # into page-locked memory (cast to the engine's dtype)
            if not context.set_input_shape(name, arr.shape):
                raise RunnerError(f"TensorRT refused input {name!r} of shape {list(arr.shape)} for {self.plan_path} "
                                  f"(its optimization profile allows batch 1 to {s['max_batch']}); rebuild the engine "
                                  "for this shape.")
            nbytes = arr.size * host.dtype.itemsize
            cuda_call(cudart, cudart.cudaMemcpyAsync(s["device"][name].ptr, host.ptr, nbytes, h2d, stream),
                      f"cudaMemcpyAsync({name!r} to the GPU)")
        # The stream handle is passed as NVIDIA's samples pass it (common_runtime.py do_inference).
        if not context.execute_async_v3(stream):
            raise RunnerError(f"TensorRT execution of {self.plan_path} failed (its log above says why).")
        out = self.manifest.output_name
        shape = tuple(int(d) for d in context.get_tensor_shape(out))
        host = s["host"][out]
        count = math.prod(shape)
        nbytes = count * host.dtype.itemsize
        cuda_call(cudart, cudart.cudaMemcpyAsync(host.ptr, s["device"][out].ptr, nbytes, d2h, stream),
                  f"cudaMemcpyAsync({out!r} from the GPU)")
        cuda_call(cudart, cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize()")
        # A copy: the pinned buffer is overwritten by the next call.
        return {out: host.array[:count].reshape(shape).astype(np.float32, copy=True)}

    def layer_information(self) -> str:
        """The engine inspector's JSON of every layer (detailed when built with DETAILED verbosity).

        Raises:
            RunnerError: the runner is not active.
        """
        if not self.is_active:
            raise RunnerError(f"Runner {self.name} is not active; activate it before asking for its layers.")
        trt = import_tensorrt()  # imported by activate already: this returns the module
        inspector = self._state["engine"].create_engine_inspector()
        inspector.execution_context = self._state["context"]  # optional (TensorRT docs, Engine Inspector)
        return str(inspector.get_engine_information(trt.LayerInformationFormat.JSON))

    def deactivate_impl(self) -> None:
        s, self._state = self._state, {}
        for key in ("context", "engine", "runtime"):  # the last reference goes: context, engine, runtime
            s.pop(key, None)
        cudart = s.get("cudart")
        if cudart is None:
            return
        for buffers in (s.get("host", {}), s.get("device", {})):
            for buffer in buffers.values():
                buffer.free()
        if "stream" in s:
            cudart.cudaStreamDestroy(s["stream"])
