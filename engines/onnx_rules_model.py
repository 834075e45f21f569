"""Checker rules about the model as a whole: which ops a target can import, the opset, and whether
the graph inputs fit the build profile ``build-engine --backend tensorrt`` sets.

These come first in the registry: a graph exported for the wrong runtime breaks them, and their
message (which export target wrote the op, what to export instead) is the most useful one to stop on.
"""

from __future__ import annotations

from collections.abc import Iterator

from onnx import TensorProto

from . import onnx_rule_refs as ref
from .errors import ManifestError
from .manifest import INPUT_NAMES, METADATA_KEY, OnnxManifest
from .onnx_findings import Hit, Rule
from .onnx_graph_view import DEFAULT_DOMAINS, GraphView

__all__ = ["RULES", "TRT_OPSET_RANGE"]

TRT_OPSET_RANGE = (9, 20)
"""The opsets onnx-tensorrt documents for TensorRT 10.0-10.1 (operators.md); the 10.2 and 10.3
changelogs add none, so this is what a Jetson on JetPack 6 (TensorRT 10.3) is known to read."""

_ORT_INTEGER_OPS: dict[str, str | None] = {
    "ConvInteger": "ort-x86", "MatMulInteger": "ort-x86", "MatMulIntegerToFloat": "ort-x86",
    "QLinearConv": "ort-qlinear", "QLinearMatMul": "ort-qlinear",
    "DynamicQuantizeLinear": None, "DynamicQuantizeMatMul": None, "QGemm": None, "QLinearAdd": None,
    "QLinearMul": None, "QLinearConcat": None, "QLinearAveragePool": None, "QLinearGlobalAveragePool": None,
    "QLinearSigmoid": None, "QLinearLeakyRelu": None, "QAttention": None, "MatMulNBits": None,
}
"""Integer-kernel ops TensorRT's parser does not import, with the export target that writes them."""
_FOR_TENSORRT = "export it again with --target tensorrt for --backend tensorrt, or build this one with --backend onnxruntime"


def _trt_unsupported_ops(view: GraphView, target: str) -> Iterator[Hit]:
    for node in view.nodes:
        op, domain = node.op_type, node.domain
        if domain in DEFAULT_DOMAINS and op in _ORT_INTEGER_OPS:
            writer = _ORT_INTEGER_OPS[op]
            made_by = f" (--target {writer} writes it)" if writer else ""
            yield view.name(node), (f"{op} is an ONNX Runtime integer kernel{made_by} that TensorRT's ONNX parser does "
                                    f"not import; {_FOR_TENSORRT}.")
        elif domain == "com.microsoft":
            writer = _ORT_INTEGER_OPS.get(op)
            made_by = f" (--target {writer} writes it)" if writer else ""
            yield view.name(node), (f"{op} of domain com.microsoft is an ONNX Runtime contrib op{made_by} that TensorRT's "
                                    f"ONNX parser does not import; {_FOR_TENSORRT}.")


def _trt_int32_bias(view: GraphView, target: str) -> Iterator[Hit]:
    for q in view.qdq_nodes():
        if not q.is_quantize and view.elem_type(q.data) == TensorProto.INT32:
            yield q.name, ("DequantizeLinear of int32 values (the bias --target ort-qlinear writes for QLinearConv, or "
                           "the ConvInteger accumulator --target ort-x86 rescales) is not imported by TensorRT, which "
                           f"dequantizes only INT8, FP8 and INT4; {_FOR_TENSORRT}.")


def _ort_unsupported_ops(view: GraphView, target: str) -> Iterator[Hit]:
    for node in view.nodes:
        if node.domain == "trt" or node.op_type.startswith("TRT_"):
            yield view.name(node), (f"{node.op_type} is a TensorRT custom op (onnx-tensorrt's TRT_ ops) that ONNX Runtime "
                                    "has no kernel for; export with standard DequantizeLinear (opset 21 for INT4) for "
                                    "--backend onnxruntime, or build this one with --backend tensorrt.")


def _trt_opset(view: GraphView, target: str) -> Iterator[Hit]:
    low, high = TRT_OPSET_RANGE
    if view.opset is None:
        yield "<model>", ("the model imports no ONNX standard-domain opset, so TensorRT cannot tell which operator "
                          f"versions it uses; export it again with --opset 17 (TensorRT reads {low}-{high}).")
    elif not low <= view.opset <= high:
        yield "<model>", (f"opset {view.opset} is outside the opsets {low}-{high} onnx-tensorrt documents for the "
                          "TensorRT 10.3 of JetPack 6 (a newer parser may read it, this one is not known to); export "
                          f"it again with --opset {min(max(view.opset, 17), high)}, storing 4-bit weights in INT8 "
                          "containers (--weight-storage int8).")


def _read_manifest(view: GraphView) -> tuple[OnnxManifest | None, str | None]:
    """(manifest, None) from our ONNX manifest, (None, None) without one, (None, why) when unreadable."""
    text = view.metadata.get(METADATA_KEY)
    if text is None:
        return None, None
    try:
        return OnnxManifest.from_json(text, source="the ONNX manifest"), None
    except ManifestError as exc:
        return None, str(exc)


def _trt_input_profile(view: GraphView, target: str) -> Iterator[Hit]:
    manifest, manifest_error = _read_manifest(view)
    if manifest_error:
        yield "<model>", (f"its pqcad manifest cannot be read ({manifest_error}), so the TensorRT build profile has "
                          "no image shape; re-export the ONNX with pqcad-deploy export.")
    # what build-engine's profile covers: the manifest's inputs (a conditional model's included), else ours
    expected = {i.name: i for i in manifest.graph_inputs} if manifest is not None else {}
    names = tuple(expected) or INPUT_NAMES
    image_shape = None if manifest is None else manifest.image_shape
    covered = ", ".join(names[:-1]) + " and " + names[-1]
    for inp in view.inputs:
        dims = view.shape(inp.name)
        if dims is None:
            yield inp.name, (f"graph input {inp.name!r} has no declared shape, so the TensorRT build profile cannot "
                             "cover it; export it with a static shape and a dynamic batch dimension.")
            continue
        symbolic = [k for k, d in enumerate(dims) if d is None]
        shown = "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
        spec = expected.get(inp.name)
        if any(k > 0 for k in symbolic):
            yield inp.name, (f"graph input {inp.name!r} has shape {shown} with a dynamic dimension other than the "
                             "batch (dim 0), but build-engine's TensorRT profile varies only the batch; export it "
                             "with static C, H, W.")
        elif symbolic and inp.name not in names:
            yield inp.name, (f"graph input {inp.name!r} has a dynamic batch, but build-engine's TensorRT profile "
                             f"covers only {covered}; export the model with only those inputs.")
        elif inp.name == "sample" and image_shape is not None and (len(dims) != 4 or tuple(dims[1:]) != image_shape):
            yield inp.name, (f"graph input 'sample' has shape {shown}, but its manifest's image_shape is "
                             f"{list(image_shape)} and the TensorRT profile is built from it; re-export the ONNX.")
        elif inp.name == "timestep" and len(dims) != 1:
            yield inp.name, (f"graph input 'timestep' has rank {len(dims)}, but build-engine's TensorRT profile "
                             "gives it shape (batch,); export it as a 1-D tensor.")
        elif spec is not None and (len(dims) != 1 + len(spec.dims) or tuple(dims[1:]) != spec.dims):
            # a conditional model's input (sample and timestep are checked above)
            yield inp.name, (f"graph input {inp.name!r} has shape {shown}, but its manifest gives it "
                             f"{spec.shape_text()} and the TensorRT profile is built from it; re-export the ONNX.")


RULES: tuple[Rule, ...] = (
    Rule("trt-unsupported-op", "integer-kernel or com.microsoft ops TensorRT's parser does not import",
         ("tensorrt",), "error", ref.ONNX_TRT_OPERATORS, _trt_unsupported_ops),
    Rule("trt-int32-bias-dequantize", "int32 bias DequantizeLinear (QLinearConv's bias layout)",
         ("tensorrt",), "error", ref.ONNX_TRT_OPERATORS, _trt_int32_bias),
    Rule("ort-unsupported-op", "TensorRT custom ops (TRT_INT4DequantizeLinear, ...) ONNX Runtime cannot run",
         ("onnxruntime",), "error", ref.ORT_OPERATOR_KERNELS, _ort_unsupported_ops),
    Rule("trt-opset-range", "an opset outside the 9-20 TensorRT 10.3's parser documents",
         ("tensorrt",), "warning", ref.ONNX_TRT_OPERATORS, _trt_opset),
    Rule("trt-input-profile", "graph inputs the build-engine optimization profile does not cover",
         ("tensorrt",), "error", ref.TRT_OPTIMIZATION_PROFILE, _trt_input_profile),
)
