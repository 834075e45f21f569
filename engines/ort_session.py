"""The one place an ONNX Runtime session is made: the CPU provider unless told otherwise, an optional
graph-optimisation level and thread count, and optionally the optimised graph saved to a file (what
build-engine keeps as the engine). Every caller (the runner, build-engine, the parity check, the
benchmarks and scripts) goes through :func:`ort_session`, so a session option is set in one place.

Execution providers are named by :data:`~engines.manifest.ORT_PROVIDERS` (cpu, cuda, tensorrt), the
names engine.json records. Asking for one is checked twice, because ONNX Runtime itself only warns
and runs everything on the CPU when a provider is missing (a CPU-only onnxruntime wheel) or listed but
unable to start (onnxruntime-gpu without the CUDA, cuDNN or TensorRT libraries it loads): before the
session, against ``onnxruntime.get_available_providers()``, and after it, against the providers the
session really registered. Either failure is one :class:`BackendUnavailableError` sentence.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal, get_args

from ._lazy import ORT_HINT, lazy_import
from .errors import BackendUnavailableError
from .manifest import ORT_PROVIDERS, OrtProvider

__all__ = ["OptimizationLevel", "OPTIMIZATION_LEVELS", "OrtProvider", "ORT_PROVIDERS", "ORT_PROVIDER_NAMES",
           "GPU_ORT_HINT", "TensorRTProviderOptions", "check_provider_available", "check_session_provider",
           "execution_providers", "ort_session"]

OptimizationLevel = Literal["disabled", "basic", "extended", "all"]
OPTIMIZATION_LEVELS: tuple[str, ...] = get_args(OptimizationLevel)
_ORT_LEVEL_NAMES = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
                    "all": "ORT_ENABLE_ALL"}

ORT_PROVIDER_NAMES: dict[str, str] = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                                      "tensorrt": "TensorrtExecutionProvider"}
"""Our provider names -> ONNX Runtime's."""
assert tuple(ORT_PROVIDER_NAMES) == ORT_PROVIDERS, "engines.manifest.ORT_PROVIDERS names the providers mapped here"
_FALLBACKS: dict[str, tuple[str, ...]] = {"cpu": ("cpu",), "cuda": ("cuda", "cpu"),
                                          "tensorrt": ("tensorrt", "cuda", "cpu")}
"""Each provider's priority list. ONNX Runtime's documentation recommends registering CUDA after TensorRT
(nodes TensorRT does not take run on CUDA rather than on the CPU) and the CPU provider last."""
GPU_ORT_HINT = ("install onnxruntime-gpu in place of onnxruntime (pip uninstall -y onnxruntime onnxruntime-gpu, "
                "then pip install onnxruntime-gpu; docs/JETSON.md for a Jetson), or build with --provider cpu")


@dataclass(frozen=True)
class TensorRTProviderOptions:
    """What ONNX Runtime's TensorRT execution provider is told (its ``trt_*`` provider options).

    Attributes:
        int8: ``trt_int8_enable``. A graph with Q/DQ nodes needs it: the provider builds weakly typed
            TensorRT networks, and TensorRT honours Q/DQ there only with its INT8 flag. ONNX Runtime's
            documentation adds that no calibration table may be given for a Q/DQ model (TensorRT
            refuses one when the graph holds Q/DQ nodes), so none is.
        fp16: ``trt_fp16_enable``: lets TensorRT run the layers left in floating point in FP16. Off by
            default, so those layers stay FP32 as in the CPU engine and in the strongly typed build of
            the tensorrt backend (the three paths then differ only by kernel rounding).
        engine_cache_dir: ``trt_engine_cache_enable`` + ``trt_engine_cache_path``: where the provider
            keeps the engines it builds, so only the first session pays TensorRT's build (minutes for a
            UNet on a Jetson). Its cache file names hash the model's file name (not its directory), the
            graph's tensor names and the ONNX Runtime, CUDA and TensorRT versions, and carry the GPU's
            compute capability: a cache copied to another device or version is not used but rebuilt.
            None: no cache (every session builds).
    """

    int8: bool
    fp16: bool = False
    engine_cache_dir: str | None = None

    def as_provider_options(self) -> dict[str, object]:
        """The dict ONNX Runtime's Python API takes for TensorrtExecutionProvider (bools as True/False)."""
        options: dict[str, object] = {"trt_int8_enable": self.int8, "trt_fp16_enable": self.fp16}
        if self.engine_cache_dir is not None:
            options.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(self.engine_cache_dir))
        return options


def check_provider_available(provider: str) -> None:
    """Refuse a provider this onnxruntime does not offer, in one sentence.

    Raises:
        ValueError: a name outside ORT_PROVIDERS (a caller's bug: the CLI and engine.json check names first).
        BackendUnavailableError: onnxruntime is missing, or ``get_available_providers()`` lacks it.
    """
    if provider not in ORT_PROVIDER_NAMES:
        raise ValueError(f"provider={provider!r} is not one of {', '.join(ORT_PROVIDERS)}")
    ort = lazy_import("onnxruntime", ORT_HINT)
    available = list(ort.get_available_providers())
    name = ORT_PROVIDER_NAMES[provider]
    if name not in available:
        raise BackendUnavailableError(
            f"ONNX Runtime's {name} (--provider {provider}) is not available here: onnxruntime "
            f"{getattr(ort, '__version__', '?')} offers {', '.join(available) or 'none'}; {GPU_ORT_HINT}.")


def check_session_provider(session: Any, provider: str) -> None:
    """Refuse a session that does not run on ``provider`` (ONNX Runtime fell back to the CPU).

    onnxruntime-gpu lists CUDA and TensorRT as available even when the libraries they load are missing;
    the session then warns and registers the CPU provider alone, which would sample on the CPU without
    saying so.

    Raises:
        BackendUnavailableError: ``session.get_providers()`` lacks the provider.
    """
    name = ORT_PROVIDER_NAMES[provider]
    active = list(session.get_providers())
    if name not in active:
        needs = "CUDA 12 and cuDNN 9" + (" and TensorRT 10" if provider == "tensorrt" else "")
        raise BackendUnavailableError(
            f"ONNX Runtime could not start its {name} (--provider {provider}) and fell back to "
            f"{', '.join(active) or 'nothing'}: the {needs} libraries it loads are missing or of another version "
            "(ONNX Runtime's log above names the one); install them or build with --provider cpu.")


def execution_providers(provider: str, tensorrt_options: TensorRTProviderOptions | None = None) -> list[Any]:
    """The ``providers`` list for an InferenceSession on ``provider`` (with its fallbacks, see _FALLBACKS)."""
    if provider not in _FALLBACKS:
        raise ValueError(f"provider={provider!r} is not one of {', '.join(ORT_PROVIDERS)}")
    providers: list[Any] = []
    for name in _FALLBACKS[provider]:
        if name == "tensorrt" and tensorrt_options is not None:
            providers.append((ORT_PROVIDER_NAMES[name], tensorrt_options.as_provider_options()))
        else:
            providers.append(ORT_PROVIDER_NAMES[name])
    return providers


def ort_session(model: str | os.PathLike[str] | bytes, *, optimization_level: OptimizationLevel | None = None,
                threads: int | None = None, inter_op_threads: int | None = None,
                providers: list[str] | None = None,
                optimized_model_path: str | os.PathLike[str] | None = None,
                provider: OrtProvider | None = None,
                tensorrt_options: TensorRTProviderOptions | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` of `model` (a path, or a serialised ModelProto).

    Args:
        optimization_level: one of OPTIMIZATION_LEVELS; None keeps ONNX Runtime's default (all).
        threads: intra-op threads; None keeps ONNX Runtime's default (all cores).
        inter_op_threads: inter-op threads (the benchmarks pin 1); None keeps the default.
        providers: ONNX Runtime's execution provider names in priority order, used as given (the
            benchmarks); default the CPU provider alone. Not together with ``provider``.
        optimized_model_path: where ONNX Runtime saves the graph it optimised (build-engine's engine).
        provider: one of ORT_PROVIDERS (engine.json's ``ort_provider``), checked before and after the
            session is made (module doc).
        tensorrt_options: the TensorRT provider's options, for ``provider="tensorrt"``.

    Raises:
        BackendUnavailableError: onnxruntime is not installed, or ``provider`` is not available or did not
        start. Load failures are ONNX Runtime's own exceptions: each caller words them for its command.
    """
    if provider is not None and providers is not None:
        raise ValueError("pass providers (ONNX Runtime's names) or provider (one of ORT_PROVIDERS), not both")
    if tensorrt_options is not None and provider != "tensorrt":
        raise ValueError(f"tensorrt_options are for provider='tensorrt', got provider={provider!r}")
    if provider is not None:
        check_provider_available(provider)
        providers = execution_providers(provider, tensorrt_options)
    ort = lazy_import("onnxruntime", ORT_HINT)
    options = ort.SessionOptions()
    # errors only: on an FP16 graph (--target tensorrt run on the CPU) ONNX Runtime's optimizer logs one
    # "could not constant fold" warning per fused node, which says nothing about the result
    options.log_severity_level = 3
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
    session = ort.InferenceSession(source, sess_options=options, providers=providers or ["CPUExecutionProvider"])
    if provider is not None:
        check_session_provider(session, provider)
    return session
