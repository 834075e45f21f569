"""ONNX Runtime runner: the onnxruntime backend of the runtime, on the CPU, CUDA or TensorRT provider."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BackendUnavailableError, RunnerError
from .manifest import OnnxManifest, OrtProvider
from .ort_session import TensorRTProviderOptions, ort_session
from .runner import Runner

__all__ = ["OnnxRuntimeRunner"]


class OnnxRuntimeRunner(Runner):
    """Run our ONNX (or an engine's optimized ``model.onnx``) with ONNX Runtime.

    Args:
        model_path: the ONNX file.
        manifest: its manifest (from the ONNX or from ``engine.json``).
        provider: the execution provider (engine.json's ``ort_provider``): "cpu" (default), "cuda" or
            "tensorrt". An engine's model must run on the provider it was built for: a cpu engine's
            ``model.onnx`` holds fused CPU kernels, a cuda / tensorrt engine's the exported graph
            (engines.build). An absent or failing provider is a BackendUnavailableError at activation,
            never a silent fall-back to the CPU.
        intra_op_threads: threads per operator; default ONNX Runtime's choice (all cores).
        tensorrt_options: the TensorRT provider's options (engines.build.tensorrt_provider_options),
            for provider "tensorrt" only.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        manifest: OnnxManifest,
        provider: OrtProvider = "cpu",
        intra_op_threads: int | None = None,
        tensorrt_options: TensorRTProviderOptions | None = None,
    ) -> None:
        super().__init__(manifest, name=f"onnxruntime:{Path(model_path).name}")
        self.model_path = Path(model_path)
        self.provider = provider
        self.intra_op_threads = intra_op_threads
        self.tensorrt_options = tensorrt_options
        self._session: Any = None

    def activate_impl(self) -> None:
        try:
            session = ort_session(self.model_path, threads=self.intra_op_threads, provider=self.provider,
                                  tensorrt_options=self.tensorrt_options)
        except BackendUnavailableError:
            raise
        except Exception as exc:
            raise RunnerError(f"ONNX Runtime cannot load {self.model_path} ({type(exc).__name__}: {exc}); rebuild the engine.") from exc
        inputs = [i.name for i in session.get_inputs()]
        outputs = [o.name for o in session.get_outputs()]
        if sorted(inputs) != sorted(self.manifest.input_names) or self.manifest.output_name not in outputs:
            raise RunnerError(
                f"{self.model_path} has inputs {inputs} and outputs {outputs}, but its manifest promises "
                f"{list(self.manifest.input_names)} -> {self.manifest.output_name!r}; re-export it."
            )
        self._session = session

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            (out,) = self._session.run([self.manifest.output_name], feed)
        except Exception as exc:  # shapes the graph refuses, out of memory, a broken kernel ...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise RunnerError(f"ONNX Runtime failed to run {self.model_path} on a batch of shape "
                              f"{list(feed['sample'].shape)} ({type(exc).__name__}: {first[:300]}); "
                              "rebuild the engine with pqcad-deploy build-engine.") from exc
        return {self.manifest.output_name: out}

    def deactivate_impl(self) -> None:
        self._session = None
