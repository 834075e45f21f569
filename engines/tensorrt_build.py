"""Build a TensorRT engine directory (``model.plan``, ``layers.json``, ``engine.json``) from our ONNX.

Written against TensorRT 10's documented Python API, with TensorRT 11's removals guarded (cited where
they matter); it cannot run in this project's workplace (no TensorRT there, as README's introduction
says) and its tests skip without ``tensorrt``. The steps are small callables, each usable alone: ONNX
path -> network (:func:`parse_onnx`) -> plan bytes (:func:`build_plan`) -> engine directory
(:func:`build_tensorrt_engine`), which also runs the plan once through the runner on a batch of one
(the smoke test, as build.py does for ONNX Runtime) and writes the engine inspector's per-layer JSON.

engine.json records where the plan was built (TensorRT version, GPU name and compute capability, and
the equivalent trtexec command line: :class:`engines.manifest.TensorRTBuildInfo`), so the runner can
refuse a plan copied to another machine before TensorRT reads it.

Precision: see :mod:`engines.tensorrt_options` (strongly typed by default: types from the Q/DQ graph;
the weakly typed INT8/FP16 path exists on TensorRT 10 only).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ._atomic import atomic_file, staged_directory
from ._lazy import TRT_HINT, lazy_import
from .build import check_buildable
from .cuda_runtime import current_gpu, import_cudart
from .errors import BackendUnavailableError, BuildError, EngineError
from .latent_parts import carry_parts
from .manifest import EngineManifest, OnnxManifest, TensorRTBuildInfo, sha256_file, write_engine_manifest
from .runner import zero_feed
from .tensorrt_options import LAYER_REPORT_FILE, TRT_MODEL_FILE, TensorRTBuildOptions, trtexec_command
from .tensorrt_report import summarize_layer_information

__all__ = ["TRT_MODEL_FILE", "LAYER_REPORT_FILE", "check_tensorrt_target", "import_tensorrt", "network_flags",
           "parse_onnx", "build_plan", "smoke_test_plan", "build_tensorrt_engine"]


def check_tensorrt_target(onnx_path: str | os.PathLike[str]) -> None:
    """Refuse a graph that breaks an error rule of the static ONNX checker for TensorRT.

    The checker (``engines.onnx_check``, ``pqcad-deploy check``; rules in docs/CHECKER.md) states
    TensorRT's documented Q/DQ and parser limits, so a graph TensorRT would refuse, or build into
    something other than the Q/DQ graph says, is stopped here, before TensorRT is imported: the same
    message on a machine without TensorRT as on the Jetson. Warnings (a fusion lost, FP32 math) do
    not refuse a build; ``pqcad-deploy check`` lists them.

    Raises:
        BuildError: the first error finding's message, its rule id and node, and how many other errors
            there are, with the ``pqcad-deploy check ONNX --target tensorrt`` command that lists them all;
            or the file cannot be read as ONNX.
    """
    from .onnx_check import OnnxCheckError, check_onnx

    try:
        findings = check_onnx(onnx_path, "tensorrt")
    except OnnxCheckError as exc:
        raise BuildError(str(exc)) from exc
    errors = [f for f in findings if f.severity == "error"]
    if errors:
        first = errors[0]
        others = f"{len(errors) - 1} other error(s) too" if len(errors) > 1 else "no other errors"
        raise BuildError(f"{onnx_path} breaks TensorRT rule {first.rule} at {first.node}: {first.message} "
                         f"({others}; `pqcad-deploy check {onnx_path} --target tensorrt` lists every finding.)")


def import_tensorrt() -> ModuleType:
    """Import TensorRT (>= 10) or raise :class:`BackendUnavailableError` with what to do instead."""
    trt = lazy_import("tensorrt", TRT_HINT, label="TensorRT")
    major = int(str(getattr(trt, "__version__", "0")).split(".")[0] or 0)
    if major < 10:
        raise BackendUnavailableError(
            f"TensorRT {trt.__version__} is installed but this build needs TensorRT 10 or newer; {TRT_HINT}."
        )
    return trt


def network_flags(trt: ModuleType, strongly_typed: bool) -> int:
    """The ``create_network`` flags: STRONGLY_TYPED when asked for and this TensorRT still has the flag.

    TensorRT 11 deprecated ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` (every network is strongly
    typed there; the flag is accepted and ignored, NVIDIA/TensorRT samples/python/strongly_type_autocast/
    sample.py still passes it at 11.1), so a TensorRT without it gets 0 and still builds strongly typed.
    """
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 1 << int(flag) if strongly_typed and flag is not None else 0


def parse_onnx(trt: ModuleType, onnx_path: Path, logger: Any, *, strongly_typed: bool) -> tuple[Any, Any, Any]:
    """Parse ``onnx_path`` into a new network; returns ``(builder, network, parser)``.

    The parser must outlive the network (it owns the weights), hence it is returned too.

    Raises:
        BuildError: listing the parser's errors.
    """
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt, strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads external data next to the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT cannot parse {onnx_path}: {errors or 'no details'}; export it again with "
                         "--target tensorrt (TensorRT's form; check it with pqcad-deploy check ONNX --target tensorrt), or build "
                         "with --backend onnxruntime.")
    return builder, network, parser


def build_plan(trt: ModuleType, builder: Any, network: Any, manifest: OnnxManifest,
               options: TensorRTBuildOptions) -> bytes:
    """Configure the builder (workspace, precision flags, batch profile, detailed layer information)
    and return the serialized plan.

    Raises:
        BuildError: a weakly typed build on TensorRT 11 (:meth:`TensorRTBuildOptions.builder_flags`), or
            TensorRT returns no engine (its log says why).
    """
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    # Flags by name, only those this TensorRT has (BuilderFlag is a pybind11 enum: __members__, as
    # Polygraphy's backend/trt/config.py reads trt.PreviewFeature.__members__).
    for name in options.builder_flags(trt.BuilderFlag.__members__, str(trt.__version__)):
        config.set_flag(getattr(trt.BuilderFlag, name))
    # Layer names and parameters in the plan, for the engine inspector (layers.json); Polygraphy's
    # CreateConfig sets the same by default (backend/trt/config.py).
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in options.profile_shapes(manifest.image_shape, manifest.conditioning).items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError("TensorRT could not build the engine (see its log above for the layer it stopped at); "
                         "export the ONNX with --target tensorrt (FP16, 8-bit activations), raise workspace_gb "
                         "if the log reports too little memory, or build with --backend onnxruntime.")
    return bytes(memoryview(plan))


def smoke_test_plan(plan_path: Path, manifest: OnnxManifest, built: TensorRTBuildInfo, *, run: bool = True) -> str:
    """Load ``plan_path`` through :class:`~engines.tensorrt_runner.TensorRTRunner` (its build-record
    check included), run it once on a batch of one when ``run``, and return the inspector's layer JSON.

    A plan that builds but cannot be loaded or run is caught here, at build time, not at the first
    ``sample``.

    Raises:
        BuildError: the runner refuses or fails, the output has the wrong shape or is not finite, or
            the layer information is not the inspector's JSON.
    """
    from .tensorrt_runner import TensorRTRunner  # here: tensorrt_runner imports this module

    c, h, w = manifest.image_shape
    feed = zero_feed(manifest)  # with a conditional model's input
    try:
        with TensorRTRunner(plan_path, manifest, built=built) as runner:
            out = runner.infer(feed)[manifest.output_name] if run else None
            layers = runner.layer_information()
    except EngineError as exc:
        raise BuildError(f"The built TensorRT engine does not run: {exc}") from exc
    if out is not None and tuple(out.shape) != (1, c, h, w):
        raise BuildError(f"The TensorRT engine's {manifest.output_name!r} has shape {list(out.shape)}, expected "
                         f"[1, {c}, {h}, {w}]; check the export.")
    if out is not None and not np.isfinite(out).all():
        raise BuildError(f"The TensorRT engine's {manifest.output_name!r} is not finite on a zero input; export the "
                         "ONNX again and check its parity, or build with --backend onnxruntime.")
    try:
        summarize_layer_information(json.loads(layers), source="the engine inspector's output")
    except (ValueError, EngineError) as exc:
        raise BuildError(f"TensorRT's engine inspector returned no per-layer JSON ({exc}); "
                         "rebuild the engine.") from exc
    return layers


def build_tensorrt_engine(
    onnx_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    int8: bool = True,
    fp16: bool = True,
    strongly_typed: bool = True,
    workspace_gb: float = 2.0,
    opt_batch: int = 8,
    max_batch: int = 32,
    overwrite: bool = False,
    smoke_test: bool = True,
) -> EngineManifest:
    """Build ``out_dir/{model.plan, layers.json, engine.json}`` for the GPU of this machine.

    A plan is specific to the GPU model and TensorRT version it was built with: build on the
    deployment device (e.g. the Jetson itself). engine.json records both, and the trtexec command
    line that builds the same plan (``manifest.tensorrt.trtexec_command``).

    Args:
        onnx_path: our ONNX (with ``pqcad.manifest`` metadata).
        out_dir: the engine directory to create.
        int8, fp16: precision flags for a weakly typed build (ignored when ``strongly_typed``).
        strongly_typed: build a strongly typed network (types from the Q/DQ graph); False needs TensorRT 10.
        workspace_gb: builder workspace memory pool limit in GiB.
        opt_batch, max_batch: the batch sizes of the optimization profile in images per call (minimum 1;
            doubled for a model that guides: TensorRTBuildOptions.profile_shapes).
        overwrite: replace an existing non-empty ``out_dir``.
        smoke_test: run the plan once on a batch of one through the runner (it is loaded either way,
            for the layer report).

    Returns:
        The engine manifest that was written.

    Raises:
        ManifestError: ``onnx_path`` is not written by pqcad-deploy export.
        BackendUnavailableError: TensorRT 10+ or cuda-python is not importable here.
        BuildError: bad arguments, an ONNX exported for ONNX Runtime (check_tensorrt_target), a weakly
            typed build on TensorRT 11, an existing ``out_dir``, parse, build or smoke-test failure.
    """
    options = TensorRTBuildOptions(strongly_typed=strongly_typed, int8=int8, fp16=fp16, workspace_gb=workspace_gb,
                                   opt_batch=opt_batch, max_batch=max_batch)
    onnx_path = Path(onnx_path)
    manifest = check_buildable(onnx_path)
    check_tensorrt_target(onnx_path)
    trt = import_tensorrt()
    options.builder_flags(trt.BuilderFlag.__members__, str(trt.__version__))  # refuse before parsing, not after
    cudart = import_cudart()
    gpu = current_gpu(cudart, error=BuildError)
    built = TensorRTBuildInfo(tensorrt_version=str(trt.__version__), gpu_name=gpu.name,
                              compute_capability=gpu.compute_capability,
                              trtexec_command=trtexec_command(onnx_path, out_dir, manifest, options))
    logger = trt.Logger(trt.Logger.WARNING)
    builder, network, _parser = parse_onnx(trt, onnx_path, logger, strongly_typed=strongly_typed)
    plan = build_plan(trt, builder, network, manifest, options)
    with staged_directory(out_dir, overwrite=overwrite, error=BuildError, kind="engine") as tmp:
        with atomic_file(tmp / TRT_MODEL_FILE) as model_tmp:
            model_tmp.write_bytes(plan)
        layers = smoke_test_plan(tmp / TRT_MODEL_FILE, manifest, built, run=smoke_test)
        with atomic_file(tmp / LAYER_REPORT_FILE) as report_tmp:
            report_tmp.write_text(layers, encoding="utf-8")
        carried = carry_parts(onnx_path, manifest, tmp)  # a latent model's parts run on ONNX Runtime (latent_parts)
        engine = EngineManifest(
            backend="tensorrt",
            model_file=TRT_MODEL_FILE,
            model_sha256=sha256_file(tmp / TRT_MODEL_FILE),
            source_onnx_sha256=sha256_file(onnx_path),
            onnx=carried,
            tensorrt=built,
        )
        write_engine_manifest(tmp, engine)
    return engine
