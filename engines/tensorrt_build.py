"""Build a TensorRT 10 engine directory (``model.plan`` + ``engine.json``) from our ONNX.

Written against TensorRT 10's documented Python API; it cannot run in this project's workplace (no
TensorRT there, as README's introduction says) and its tests skip without ``tensorrt``. The steps are small
callables, each usable alone: ONNX path -> network (:func:`parse_onnx`) -> plan bytes
(:func:`build_plan`) -> engine directory (:func:`build_tensorrt_engine`).

Precision: our ONNX carries explicit Q/DQ nodes, so the network is built STRONGLY_TYPED by default:
TensorRT then takes every tensor's type from the graph (INT8 where the Q/DQ pairs say so) and
precision builder flags are not allowed. ``int8`` / ``fp16`` only apply to a weakly typed build
(``strongly_typed=False``), where TensorRT needs the INT8 flag to honour Q/DQ and FP16 lets it run
the unquantized layers in half precision.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Any

from ._atomic import atomic_file, staged_directory
from ._lazy import TRT_HINT, lazy_import
from .build import check_buildable
from .errors import BackendUnavailableError, BuildError
from .manifest import EngineManifest, OnnxManifest, sha256_file, write_engine_manifest

__all__ = ["TRT_MODEL_FILE", "check_tensorrt_target", "import_tensorrt", "parse_onnx", "build_plan",
           "build_tensorrt_engine"]

TRT_MODEL_FILE = "model.plan"

# What export's ONNX Runtime targets (converters/ort_x86.py, converters/ort_qlinear.py) write and TensorRT
# does not take: integer-kernel ops, uint8 Q/DQ (TensorRT's Q/DQ are signed and symmetric) and int32 bias
# DequantizeLinear (QLinearConv's bias layout).
_ORT_ONLY_OPS = {"ConvInteger": "ort-x86", "MatMulInteger": "ort-x86", "QLinearConv": "ort-qlinear",
                 "QLinearMatMul": "ort-qlinear", "MatMulIntegerToFloat": "ort-x86"}


def check_tensorrt_target(onnx_path: str | os.PathLike[str]) -> None:
    """Refuse an ONNX exported for an ONNX Runtime target (ort-x86, ort-qlinear), read from its graph.

    Raises:
        BuildError: one sentence naming the target and saying to export with --target qdq.
    """
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name: i.data_type for i in model.graph.initializer}
    found = None
    for node in model.graph.node:
        if node.op_type in _ORT_ONLY_OPS:
            found = (_ORT_ONLY_OPS[node.op_type], f"{node.op_type} nodes")
        elif node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            if len(node.input) > 2 and inits.get(node.input[2]) == onnx.TensorProto.UINT8:
                found = ("ort-x86", "uint8 Q/DQ")
            elif node.op_type == "DequantizeLinear" and inits.get(node.input[0]) == onnx.TensorProto.INT32:
                found = ("ort-qlinear", "int32 bias DequantizeLinear")
        if found:
            break
    if found:
        raise BuildError(f"{onnx_path} was exported for ONNX Runtime (--target {found[0]}: {found[1]}), which "
                         "TensorRT does not take; export it again with --target qdq for --backend tensorrt, or "
                         "build this one with --backend onnxruntime.")


def import_tensorrt() -> ModuleType:
    """Import TensorRT (>= 10) or raise :class:`BackendUnavailableError` with what to do instead."""
    trt = lazy_import("tensorrt", TRT_HINT, label="TensorRT")
    major = int(str(getattr(trt, "__version__", "0")).split(".")[0] or 0)
    if major < 10:
        raise BackendUnavailableError(
            f"TensorRT {trt.__version__} is installed but this build needs TensorRT 10 or newer; {TRT_HINT}."
        )
    return trt


def parse_onnx(trt: ModuleType, onnx_path: Path, logger: Any, *, strongly_typed: bool) -> tuple[Any, Any, Any]:
    """Parse ``onnx_path`` into a new network; returns ``(builder, network, parser)``.

    The parser must outlive the network (it owns the weights), hence it is returned too.

    Raises:
        BuildError: listing the parser's errors.
    """
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads external data next to the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT cannot parse {onnx_path}: {errors or 'no details'}; export it again with "
                         "--target qdq and --weight-storage int8 (TensorRT's form), or build with --backend onnxruntime.")
    return builder, network, parser


def build_plan(
    trt: ModuleType,
    builder: Any,
    network: Any,
    manifest: OnnxManifest,
    *,
    int8: bool,
    fp16: bool,
    strongly_typed: bool,
    workspace_gb: float,
    opt_batch: int,
    max_batch: int,
) -> bytes:
    """Configure the builder (workspace, precision, batch profile) and return the serialized plan.

    Raises:
        BuildError: TensorRT returns no engine (its log says why).
    """
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if not strongly_typed:  # precision flags are refused on strongly typed networks
        if int8:
            config.set_flag(trt.BuilderFlag.INT8)
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
    c, h, w = manifest.image_shape
    profile = builder.create_optimization_profile()
    profile.set_shape("sample", (1, c, h, w), (opt_batch, c, h, w), (max_batch, c, h, w))
    profile.set_shape("timestep", (1,), (opt_batch,), (max_batch,))
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError("TensorRT could not build the engine (see its log above for the layer it stopped at); "
                         "export the ONNX with --target qdq (at --opset 17, 8-bit activations), raise workspace_gb "
                         "if the log reports too little memory, or build with --backend onnxruntime.")
    return bytes(memoryview(plan))


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
) -> EngineManifest:
    """Build ``out_dir/{model.plan, engine.json}`` for the GPU of this machine.

    A plan is specific to the GPU model and TensorRT version it was built with: build on the
    deployment device (e.g. the Jetson itself).

    Args:
        onnx_path: our ONNX (with ``pqcad.manifest`` metadata).
        out_dir: the engine directory to create.
        int8, fp16: precision flags for a weakly typed build (ignored when ``strongly_typed``; see module doc).
        strongly_typed: build a strongly typed network (types from the Q/DQ graph).
        workspace_gb: builder workspace memory pool limit in GiB.
        opt_batch, max_batch: the batch sizes of the optimization profile (minimum 1).
        overwrite: replace an existing non-empty ``out_dir``.

    Returns:
        The engine manifest that was written.

    Raises:
        ManifestError: ``onnx_path`` is not written by pqcad-deploy export.
        BackendUnavailableError: TensorRT 10 is not importable here.
        BuildError: bad arguments, an ONNX exported for ONNX Runtime (check_tensorrt_target), an existing
            ``out_dir``, parse or build failure.
    """
    if not 1 <= opt_batch <= max_batch:
        raise BuildError(f"Batch sizes must satisfy 1 <= opt_batch <= max_batch, got opt_batch={opt_batch}, max_batch={max_batch}.")
    if workspace_gb <= 0:
        raise BuildError(f"workspace_gb must be positive, got {workspace_gb}.")
    onnx_path = Path(onnx_path)
    manifest = check_buildable(onnx_path)
    check_tensorrt_target(onnx_path)
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder, network, _parser = parse_onnx(trt, onnx_path, logger, strongly_typed=strongly_typed)
    plan = build_plan(trt, builder, network, manifest, int8=int8, fp16=fp16, strongly_typed=strongly_typed,
                      workspace_gb=workspace_gb, opt_batch=opt_batch, max_batch=max_batch)
    with staged_directory(out_dir, overwrite=overwrite, error=BuildError, kind="engine") as tmp:
        with atomic_file(tmp / TRT_MODEL_FILE) as model_tmp:
            model_tmp.write_bytes(plan)
        engine = EngineManifest(
            backend="tensorrt",
            model_file=TRT_MODEL_FILE,
            model_sha256=sha256_file(tmp / TRT_MODEL_FILE),
            source_onnx_sha256=sha256_file(onnx_path),
            onnx=manifest,
        )
        write_engine_manifest(tmp, engine)
    return engine
