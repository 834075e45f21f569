"""Issue 16, item 4: does our TensorRT export quantize the same tensors as NVIDIA ModelOpt's INT8 PTQ?

Why this exists: ModelOpt's ONNX PTQ (``modelopt.onnx.quantization.quantize``, INT8) encodes NVIDIA's
own rules for where Q/DQ goes so that TensorRT fuses it (Q/DQ on Conv/Gemm/MatMul inputs, on the
residual Add input, one shared Q/DQ per tensor, attention BMMs and Softmax handled its way). Run on the
same FP ONNX that our export traces (``pqcad-deploy export ART --fp``), its placement is the reference
our ``--target tensorrt`` must match, except for differences we make on purpose, each listed in
:data:`DELIBERATE_DIFFERENCES` with its reason. Anything else is a placement bug and fails the check.

How the two graphs are compared: both come from the same ``torch.onnx`` trace of the same UNet, so the
compute nodes carry the same module-scoped names (``/unet/down_blocks.0/resnets.0/conv1/Conv``) while
the Q/DQ nodes and weights do not (ModelOpt: ``<tensor>_QuantizeLinear``, ``<weight>_quantized``; ours:
``<layer>/input_quantize``, ``<layer>.weight_codes``). So a quantized tensor is keyed by the node that
*reads* it: (op kind, module path of the reader, the reader's own name in that module, input slot).
A consumer's input counts as quantized when it comes from a DequantizeLinear (through Casts) that reads
a QuantizeLinear (an activation) or a constant (a weight). Keying by reader makes the set independent
of whether one Q/DQ is shared by several readers (ModelOpt) or duplicated per reader (our ``qdq``).

Op kinds: ``Conv``, ``ConvTranspose``, ``Linear`` (a Gemm or a MatMul whose second input is a constant:
our export writes Linear as MatMul + Add, ModelOpt keeps torch's Gemm), ``BMM`` (a MatMul of two
activations: attention scores and attention x values), and otherwise the reader's op type (``Add``,
``Concat``, ``Resize``, ...).

Usage (ModelOpt lives in its own venv: it pins onnx~=1.21 and, on x86 Linux, onnxruntime-gpu + cupy;
on a CPU machine install torch 2.13 (CPU) first, then nvidia-modelopt, then its ONNX extra's packages
with the CPU ``onnxruntime~=1.24`` in place of onnxruntime-gpu and without cupy)::

    pqcad-deploy compress --model builtin --method minmax --preset fast --no-distill --out /tmp/mo/fm_art
    pqcad-deploy export /tmp/mo/fm_art --fp --onnx /tmp/mo/fm_fp.onnx
    pqcad-deploy export /tmp/mo/fm_art --target qdq --onnx /tmp/mo/fm_qdq.onnx
    PYTHONPATH=. /work/modelopt-venv/bin/python -m benchmarks.modelopt_agreement quantize \\
        --fp /tmp/mo/fm_fp.onnx --out /tmp/mo/fm_modelopt_int8_fp16.onnx
    python -m benchmarks.modelopt_agreement compare --modelopt /tmp/mo/fm_modelopt_int8_fp16.onnx \\
        --ours /tmp/mo/fm_qdq.onnx --json /tmp/mo/fm_agreement.json

``compare`` exits 0 when every difference is deliberate, 1 otherwise (and 2 on unreadable input).
Only ``quantize`` needs ModelOpt; ``compare`` and ``facts`` need onnx alone.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "QuantizedInput",
    "quantized_inputs",
    "quantized_tensors",
    "Deliberate",
    "DELIBERATE_DIFFERENCES",
    "Comparison",
    "compare",
    "compare_files",
    "placement_facts",
    "calibration_data",
    "modelopt_quantize",
    "format_table",
    "main",
]


# --- ModelOpt's side: INT8 PTQ of our FP ONNX -------------------------------------------------------

def calibration_data(fp_onnx: str | Path, samples: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for ModelOpt's calibration: noise-like ``sample`` [N, C, H, W] and ``timestep`` [N].

    Placement, not quality, is measured here, so the samples are standard normal noise (what x_t is at
    large t) and the timesteps are spread evenly over the model's own sampling grid (the ONNX
    manifest's ``student_timesteps``), so every part of the grid is seen.
    """
    from pqcad_deploy.engines.manifest import read_onnx_manifest

    manifest = read_onnx_manifest(fp_onnx)
    grid = np.asarray(manifest.student_timesteps, dtype=np.float32)
    picks = np.linspace(0, len(grid) - 1, samples).round().astype(np.int64)
    rng = np.random.default_rng(seed)
    return {"sample": rng.standard_normal((samples, *manifest.image_shape), dtype=np.float32),
            "timestep": grid[picks].copy()}


def modelopt_quantize(fp_onnx: str | Path, out: str | Path, *, samples: int = 32, batch: int | None = None,
                      calibration_method: str = "max", high_precision_dtype: str = "fp16",
                      seed: int = 0) -> dict[str, Any]:
    """``modelopt.onnx.quantization.quantize(quantize_mode="int8", calibration_eps=["cpu"])`` on a copy.

    ModelOpt may rewrite the file it is given (it saves a shape-inferred model over it), so it is
    handed a copy in a temporary folder; it also writes an opset-19 clone beside ``out`` while it runs
    (deleted at the end), so ``out``'s folder must be writable. ``batch`` sets ``calibration_shapes`` (calibration in batches
    of that size); None (the default) is ModelOpt's own default: one sample at a time. It also decides
    ModelOpt's GEMV check, which leaves a Gemm/MatMul float when its output has a dimension of 1. By
    default ModelOpt runs the model, sees the time-embedding Gemms' [1, C] outputs and leaves them
    float; given shapes, it judges by ONNX shape inference, which cannot see their batch (it comes from
    ``Shape(sample)`` through ConstantOfShape), and quantizes them.

    Returns:
        What was run: the call's arguments, ModelOpt's version and the seconds it took.
    """
    import modelopt
    from modelopt.onnx.quantization import quantize

    data = calibration_data(fp_onnx, samples, seed)
    c, h, w = data["sample"].shape[1:]
    call: dict[str, Any] = dict(quantize_mode="int8", calibration_method=calibration_method, calibration_eps=["cpu"],
                                high_precision_dtype=high_precision_dtype)
    if batch is not None:
        call["calibration_shapes"] = f"sample:{batch}x{c}x{h}x{w},timestep:{batch}"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        given = Path(tmp) / Path(fp_onnx).name
        shutil.copyfile(fp_onnx, given)
        quantize(onnx_path=str(given), calibration_data=data, output_path=str(Path(out).resolve()), **call)
    return {"modelopt_version": modelopt.__version__, "fp_onnx": str(fp_onnx), "out": str(out),
            "call": call, "calibration": {"samples": samples, "seed": seed,
                                          "timesteps": sorted({int(t) for t in data["timestep"]}, reverse=True)},
            "seconds": round(time.perf_counter() - started, 1)}


# --- the canonical set of quantized tensors ----------------------------------------------------------

PASS_THROUGH_OPS = frozenset({"Cast", "Identity"})
"""Ops between a DequantizeLinear and its reader that do not change which tensor is read: ModelOpt's FP16
conversion may put a Cast there."""

WEIGHT_PATH_OPS = frozenset({"Cast", "Identity", "DequantizeLinear", "QuantizeLinear", "Transpose", "Reshape",
                             "Unsqueeze", "Squeeze"})
"""Ops a constant weight may pass through on its way to a Gemm/MatMul (first input followed)."""

QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})

SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})
"""Readers of a tensor's shape alone: a Q/DQ before them changes nothing they compute (ModelOpt's shared
DequantizeLinear also feeds the Shape nodes of GroupNorm), so they are not counted."""

Role = Literal["weight", "activation"]


@dataclass(frozen=True)
class QuantizedInput:
    """One input slot of one compute node that reads a dequantized tensor.

    Attributes:
        kind: ``Conv``, ``ConvTranspose``, ``Linear`` (Gemm, or MatMul of a constant), ``BMM`` (MatMul of
            two activations), else the reader's op type (``Add``, ``Mul``, ``Concat``, ...).
        scope: the module path of the reader, ``down_blocks.0.resnets.0.conv1`` ("" when unscoped).
        node: the reader's own name inside its module, ``Conv``, ``Add_1`` (a Linear's Gemm is spelled
            ``MatMul``, as our export writes it).
        slot: the input index of the reader.
        role: ``weight`` (dequantized from a constant) or ``activation`` (through QuantizeLinear).
        node_name: the reader's full node name in its graph (for display only; not in the key).
        source: the tensor that was quantized (the QuantizeLinear's input, or the weight's name).
        dequantize: the DequantizeLinear's output read (readers sharing one Q/DQ share this name).
    """

    kind: str
    scope: str
    node: str
    slot: int
    role: Role
    node_name: str = ""
    source: str = ""
    dequantize: str = ""

    @property
    def key(self) -> str:
        """``Conv down_blocks.0.resnets.0.conv1/Conv[1]``: equal across two exports of the same trace."""
        return f"{self.kind} {self.scope}/{self.node}[{self.slot}]"


class _Index:
    """Producers and constants of one graph: what the key walk asks."""

    def __init__(self, model: Any) -> None:
        graph = model.graph
        self.nodes = list(graph.node)
        self.producer: dict[str, Any] = {out: n for n in self.nodes for out in n.output if out}
        inputs = {i.name for i in graph.input}
        self.constants = {t.name for t in graph.initializer if t.name not in inputs}
        self.constants |= {n.output[0] for n in self.nodes if n.op_type == "Constant" and n.output}
        self.root = _common_root(n.name for n in self.nodes)

    def source(self, tensor: str) -> Any:
        """The node that computes ``tensor``, looking through Casts and Identities (None for inputs)."""
        node = self.producer.get(tensor)
        while node is not None and node.op_type in PASS_THROUGH_OPS and node.input:
            node = self.producer.get(node.input[0])
        return node

    def is_constant(self, tensor: str, through: frozenset[str] = PASS_THROUGH_OPS, depth: int = 8) -> bool:
        """A build-time constant, possibly behind ``through`` ops (their first input followed)."""
        for _ in range(depth):
            if tensor in self.constants:
                return True
            node = self.producer.get(tensor)
            if node is None or node.op_type not in through or not node.input:
                return False
            tensor = node.input[0]
        return False


def _common_root(names: Iterable[str]) -> str:
    """The first scope segment most ``/a/b/Op`` names share (the export wrapper, ``unet``), or "".

    A majority rather than all: a rewrite may add a few scoped nodes of its own."""
    roots = Counter(name.split("/")[1] for name in names if name.startswith("/") and name.count("/") >= 2)
    if not roots:
        return ""
    root, count = roots.most_common(1)[0]
    return root if 2 * count > sum(roots.values()) else ""


def _scope_and_local(name: str, root: str) -> tuple[str, str]:
    """``/unet/down_blocks.0/resnets.0/conv1/Conv`` -> (``down_blocks.0.resnets.0.conv1``, ``Conv``)."""
    if not name.startswith("/"):
        return "", name
    parts = name[1:].split("/")
    if root and parts[0] == root and len(parts) > 1:
        parts = parts[1:]
    return ".".join(parts[:-1]), parts[-1]


def _kind(node: Any, index: _Index) -> str:
    if node.op_type in ("Gemm", "MatMul"):
        weight_like = len(node.input) > 1 and index.is_constant(node.input[1], WEIGHT_PATH_OPS)
        return "Linear" if weight_like else "BMM"
    return node.op_type


def _role(dequantize: Any, index: _Index) -> tuple[Role, str] | None:
    """(weight / activation, the tensor quantized) for the DequantizeLinear read; None when it is not a
    Q/DQ we recognise (a DequantizeLinear of a computed tensor with no QuantizeLinear before it)."""
    data = dequantize.input[0]
    if index.is_constant(data):
        return "weight", data  # codes stored as integers
    q = index.source(data)
    if q is None or q.op_type != "QuantizeLinear":
        return None
    # a float weight behind its own Q/DQ (ModelOpt), or an activation
    return ("weight" if index.is_constant(q.input[0]) else "activation"), q.input[0]


def quantized_inputs(model: Any) -> list[QuantizedInput]:
    """Every (reader, input slot) of ``model`` that reads a dequantized tensor, in graph order.

    Q/DQ nodes themselves and pass-through ops are not readers; everything else is, so a Q/DQ placed
    on a Concat, Resize or Softmax input shows up under that op's kind.

    Args:
        model: an onnx ModelProto (or a path to one).
    """
    index = _Index(_load(model))
    found = []
    for node in index.nodes:
        if node.op_type in QDQ_OPS or node.op_type in PASS_THROUGH_OPS or node.op_type in SHAPE_ONLY_OPS:
            continue
        kind = None
        for slot, tensor in enumerate(node.input):
            if not tensor:
                continue
            source = index.source(tensor)
            if source is None or source.op_type != "DequantizeLinear":
                continue
            recognised = _role(source, index)
            if recognised is None:
                continue
            kind = kind or _kind(node, index)
            scope, local = _scope_and_local(node.name, index.root)
            if kind == "Linear" and local.startswith("Gemm"):
                local = "MatMul" + local[len("Gemm"):]
            found.append(QuantizedInput(kind, scope, local, slot, recognised[0], node.name, recognised[1],
                                        source.output[0]))
    return found


def quantized_tensors(model: Any) -> set[str]:
    """The canonical set of quantized tensors of a QDQ graph: :attr:`QuantizedInput.key` of each.

    Args:
        model: an onnx ModelProto (or a path to one).
    """
    return {q.key for q in quantized_inputs(model)}


def _load(model: Any) -> Any:
    if isinstance(model, (str, Path)):
        import onnx

        return onnx.load(str(model), load_external_data=False)
    return model


# --- the comparison ----------------------------------------------------------------------------------

Side = Literal["modelopt", "ours"]


@dataclass(frozen=True)
class Deliberate:
    """A difference we make on purpose: keys matching ``patterns`` may be quantized on ``side`` alone.

    Attributes:
        name: a short id for tables and JSON.
        side: where the key is present alone: ``modelopt`` (ModelOpt quantizes it, we do not) or ``ours``.
        patterns: patterns over :attr:`QuantizedInput.key` in which ``*`` matches any text and every
            other character itself (the keys' ``[slot]`` brackets are literal, unlike in fnmatch).
        reason: why the difference is right for this project (shown next to every key it accepts).
    """

    name: str
    side: Side
    patterns: tuple[str, ...]
    reason: str

    def accepts(self, side: Side, key: str) -> bool:
        return side == self.side and any(_glob(p).fullmatch(key) for p in self.patterns)


def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")))


DELIBERATE_DIFFERENCES: tuple[Deliberate, ...] = (
    Deliberate(
        "attention-bmm", "modelopt", ("BMM *",),
        "ModelOpt quantizes both inputs of the attention score and attention-value matmuls (Q*K^T, "
        "softmax*V). Our student has quantizers on Conv2d and Linear layers only, so there is no learned "
        "scale to export for them and the ONNX must compute what the parity-checked student computes; "
        "TensorRT runs these in its FP16 fused attention (ModelOpt's disable_mha_qdq does the same)."),
    Deliberate(
        "time-embedding-linears", "ours",
        ("Linear time_embedding.linear_*/MatMul[*]", "Linear *.time_emb_proj/MatMul[*]"),
        "ModelOpt (by default, calibrating one sample at a time) leaves the time-embedding Linears float: "
        "their output is [1, C] there, a GEMV, which its rule says gains nothing from INT8 in TensorRT. "
        "The artifact learned INT8 weights and input scales for them (--precision-policy all) and the "
        "export writes what the student computes; --precision-policy tensorrt-safe keeps them float."),
    Deliberate(
        "time-embedding-silu", "modelopt",
        ("Mul time_embedding.act/Mul[*]", "Sigmoid time_embedding.act/Sigmoid[0]",
         "Mul *.nonlinearity_1/Mul[*]", "Sigmoid *.nonlinearity_1/Sigmoid[0]"),
        "ModelOpt quantizes both inputs of the time-embedding SiLU's Mul (Mul is one of its quantizable op "
        "types), and the Sigmoid reads the same shared Q/DQ. The student computes SiLU in float, and this "
        "path is a [batch, channels] vector per step: no INT8 kernel to gain."),
    Deliberate(
        "float-readers-of-shared-qdq", "modelopt",
        ("Reshape *norm1/Reshape[0]", "Concat up_blocks.*/Concat*[1]"),
        "ModelOpt shares one Q/DQ among all readers of a tensor, so GroupNorm (its Reshape) and the "
        "up-block skip Concat read the value it quantized for another reader (a residual Add, a "
        "conv_shortcut, a downsampler conv). The "
        "student computes GroupNorm and the skip Concat in float; giving them the Q/DQ of another "
        "layer would change what they compute."),
    Deliberate(
        "time-embedding-add", "modelopt", ("Add *resnets.*/Add[1]",),
        "ModelOpt quantizes the time-embedding input of each resnet's conv1 + temb Add, so TensorRT can fuse "
        "that Add into the INT8 conv1. That input is one value per channel broadcast over every pixel, so "
        "its rounding error is a per-channel offset of the whole feature map, not noise: on the CIFAR-10 "
        "pqcad W8A8 student it shifted the sampled images' mean by +1.5 grey levels on every channel "
        "(RESULTS section 23). --target tensorrt leaves it in FP16 (converters.tensorrt: time_embedding_adds)."),
)
"""The differences from ModelOpt that :func:`compare` accepts, each with its reason; the TensorRT target
(converters/tensorrt.py) is held to this list."""


@dataclass(frozen=True)
class Comparison:
    """Two key sets compared, each difference either accepted (with its reason) or not."""

    modelopt: frozenset[str]
    ours: frozenset[str]
    accepted: dict[str, str]   # key -> the Deliberate.name that accepts it
    unused: tuple[str, ...]    # Deliberate names that accepted nothing

    @property
    def common(self) -> set[str]:
        return set(self.modelopt & self.ours)

    @property
    def only_modelopt(self) -> set[str]:
        return set(self.modelopt - self.ours)

    @property
    def only_ours(self) -> set[str]:
        return set(self.ours - self.modelopt)

    @property
    def unlisted(self) -> dict[Side, list[str]]:
        return {"modelopt": sorted(k for k in self.only_modelopt if k not in self.accepted),
                "ours": sorted(k for k in self.only_ours if k not in self.accepted)}

    @property
    def ok(self) -> bool:
        return not any(self.unlisted.values())

    def per_kind(self) -> dict[str, dict[str, int]]:
        """kind -> counts of keys: modelopt, ours, common, only_modelopt, only_ours, accepted, unlisted."""
        rows: dict[str, Counter] = defaultdict(Counter)
        unlisted = {k for keys in self.unlisted.values() for k in keys}
        for key in self.modelopt | self.ours:
            row = rows[_key_kind(key)]
            row["modelopt"] += key in self.modelopt
            row["ours"] += key in self.ours
            row["common"] += key in self.modelopt and key in self.ours
            row["only_modelopt"] += key in self.modelopt and key not in self.ours
            row["only_ours"] += key in self.ours and key not in self.modelopt
            row["accepted"] += key in self.accepted
            row["unlisted"] += key in unlisted
        cols = ("modelopt", "ours", "common", "only_modelopt", "only_ours", "accepted", "unlisted")
        return {kind: {c: rows[kind][c] for c in cols} for kind in sorted(rows)}


def _key_kind(key: str) -> str:
    return key.split(" ", 1)[0]


def compare(modelopt: Iterable[str], ours: Iterable[str],
            deliberate: Iterable[Deliberate] = DELIBERATE_DIFFERENCES) -> Comparison:
    """Compare ModelOpt's key set with ours; a difference is accepted when a :class:`Deliberate` matches it."""
    modelopt, ours, deliberate = frozenset(modelopt), frozenset(ours), tuple(deliberate)
    accepted: dict[str, str] = {}
    for side, keys in (("modelopt", modelopt - ours), ("ours", ours - modelopt)):
        for key in keys:
            rule = next((d for d in deliberate if d.accepts(side, key)), None)
            if rule is not None:
                accepted[key] = rule.name
    used = set(accepted.values())
    return Comparison(modelopt, ours, accepted, tuple(d.name for d in deliberate if d.name not in used))


# --- placement facts of one QDQ graph ----------------------------------------------------------------

def _dtype(elem_type: int) -> str:
    from onnx import TensorProto

    return TensorProto.DataType.Name(elem_type).lower()


def _upstream(tensor: str, index: _Index, depth: int = 8) -> Any:
    """The node that computes ``tensor`` behind Q/DQ, Casts, reshapes and bias Adds (one computed
    operand followed): a Linear's Gemm, or its MatMul when our export split off the bias."""
    node = index.producer.get(tensor)
    for _ in range(depth):
        if node is None or not node.input:
            return node
        if node.op_type in WEIGHT_PATH_OPS:
            node = index.producer.get(node.input[0])
        elif node.op_type == "Add" and any(index.is_constant(t, WEIGHT_PATH_OPS) for t in node.input):
            node = index.producer.get(next(t for t in node.input if not index.is_constant(t, WEIGHT_PATH_OPS)))
        else:
            return node
    return node


def _add_role(add: Any, index: _Index) -> str:
    """``bias`` (a constant operand: Linear bias, GroupNorm affine), ``time_embedding`` (the projected
    time vector broadcast onto a feature map) or ``residual`` (two feature maps)."""
    if any(index.is_constant(t, WEIGHT_PATH_OPS) for t in add.input):
        return "bias"
    for tensor in add.input:
        node = _upstream(tensor, index)
        if node is not None and node.op_type in ("Gemm", "MatMul") and _kind(node, index) == "Linear":
            if "time_emb" in _scope_and_local(node.name, index.root)[0]:
                return "time_embedding"
    return "residual"


def _is_fusible_conv_output(tensor: str, index: _Index, readers: dict[str, int]) -> bool:
    """The operand is a Conv's output read by this Add alone: TensorRT fuses the Add into that Conv."""
    node = index.source(tensor)
    if node is not None and node.op_type == "DequantizeLinear":
        q = index.source(node.input[0])
        node = index.source(q.input[0]) if q is not None and q.input else None
    return node is not None and node.op_type == "Conv" and readers.get(node.output[0], 0) == 1


_SHAPE_MATH_OPS = frozenset({"Unsqueeze", "Shape", "Gather", "Cast", "Constant", "ConstantOfShape", "Squeeze"})


def placement_facts(model: Any) -> dict[str, Any]:
    """What a QDQ graph does where, in numbers: Q/DQ counts, sharing, Adds, the ops around attention and
    upsampling, opset, FP16 or FP32, scale dtypes and I/O casts."""
    model = _load(model)
    index = _Index(model)
    graph = model.graph
    inputs = quantized_inputs(model)
    qs = [n for n in index.nodes if n.op_type == "QuantizeLinear"]
    dqs = [n for n in index.nodes if n.op_type == "DequantizeLinear"]
    inits = {t.name: t for t in graph.initializer}
    act = [q for q in inputs if q.role == "activation"]
    q_per_tensor = Counter(q.input[0] for q in qs if not index.is_constant(q.input[0]))
    readers_per_dq = Counter(q.dequantize for q in act)

    adds = [n for n in index.nodes if n.op_type == "Add"]
    readers = Counter(t for n in index.nodes for t in n.input if t)
    quantized_by_node: dict[str, list[QuantizedInput]] = defaultdict(list)
    for q in inputs:
        quantized_by_node[q.node_name].append(q)
    add_rows: dict[str, Counter] = defaultdict(Counter)
    for add in adds:
        role = _add_role(add, index)
        add_rows[role]["nodes"] += 1
        slots = [q.slot for q in quantized_by_node.get(add.name, [])]
        add_rows[role]["with_qdq"] += bool(slots)
        add_rows[role]["both_inputs_qdq"] += len(slots) == 2
        if len(slots) == 1:  # the unquantized operand: the Conv output TensorRT fuses the Add into?
            other = add.input[1 - slots[0]]
            add_rows[role]["one_input_qdq_other_a_conv_output"] += _is_fusible_conv_output(other, index, readers)

    feeds_q = {n.input[0] for n in qs}

    def output_quantized(node: Any) -> bool:
        for out in node.output:
            if out in feeds_q:
                return True
            casts = [c for c in index.nodes if c.op_type == "Cast" and c.input and c.input[0] == out]
            if any(c.output[0] in feeds_q for c in casts):
                return True
        return False

    ops: dict[str, dict[str, int]] = {}
    def feature_concat(n: Any) -> bool:  # not the integer shape arithmetic of reshapes
        return n.op_type == "Concat" and any(
            not index.is_constant(t) and (index.source(t) is None or index.source(t).op_type not in _SHAPE_MATH_OPS)
            for t in n.input)

    for label, match in (("Concat", feature_concat),
                         ("Resize", lambda n: n.op_type == "Resize"),
                         ("GroupNorm", lambda n: n.op_type in ("InstanceNormalization", "GroupNormalization")),
                         ("Softmax", lambda n: n.op_type == "Softmax"),
                         ("BMM", lambda n: n.op_type in ("MatMul", "Gemm") and _kind(n, index) == "BMM"),
                         ("Sigmoid", lambda n: n.op_type == "Sigmoid"),
                         ("Mul", lambda n: n.op_type == "Mul")):
        nodes = [n for n in index.nodes if match(n)]
        ops[label] = {"nodes": len(nodes),
                      "input_quantized": sum(bool(quantized_by_node.get(n.name)) for n in nodes),
                      "output_quantized": sum(output_quantized(n) for n in nodes)}
    # GroupNorm's input reaches InstanceNormalization through a Reshape: count a DQ read by that Reshape
    norm_inputs = 0
    for n in index.nodes:
        if n.op_type in ("InstanceNormalization", "GroupNormalization"):
            src = index.producer.get(n.input[0])
            readers = [src] if src is not None and src.op_type == "Reshape" else []
            norm_inputs += any(quantized_by_node.get(r.name) for r in readers) or bool(quantized_by_node.get(n.name))
    ops["GroupNorm"]["input_quantized"] = norm_inputs

    def scale_dtypes(nodes: list[Any]) -> dict[str, int]:
        return dict(Counter(_dtype(inits[n.input[1]].data_type) if n.input[1] in inits else "computed"
                            for n in nodes))

    weight_axes = Counter()
    for n in dqs:
        if len(n.input) > 1 and n.input[1] in inits and len(inits[n.input[1]].dims) == 1:
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            weight_axes[f"axis {axis}"] += 1
    float_inits = Counter(_dtype(t.data_type) for t in graph.initializer
                          if _dtype(t.data_type) in ("float", "float16", "bfloat16") and len(t.dims) > 1)
    io_names = {i.name for i in graph.input} | {o.name for o in graph.output}
    io_casts = [{"node": n.name, "reads": n.input[0], "writes": n.output[0],
                 "to": _dtype(next(a.i for a in n.attribute if a.name == "to"))}
                for n in index.nodes if n.op_type == "Cast" and (n.input[0] in io_names or n.output[0] in io_names)]
    elem = lambda vi: _dtype(vi.type.tensor_type.elem_type)  # noqa: E731
    weights = [q for q in inputs if q.role == "weight"]
    return {
        "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
        "ir_version": model.ir_version,
        "nodes": len(index.nodes),
        "quantize_nodes": len(qs),
        "dequantize_nodes": len(dqs),
        "activation_qdq_pairs": sum(q_per_tensor.values()),
        "activation_tensors_quantized": len(q_per_tensor),
        "max_quantize_per_tensor": max(q_per_tensor.values(), default=0),
        "one_qdq_per_tensor": max(q_per_tensor.values(), default=0) <= 1,
        "activation_readers_of_a_shared_dequantize": sum(c for c in readers_per_dq.values() if c > 1),
        "weights_quantized": len(weights),
        "weight_storage": dict(Counter("int8 initializer -> DequantizeLinear"
                                       if index.is_constant(index.producer[w.dequantize].input[0])
                                       else "float initializer -> QuantizeLinear -> DequantizeLinear" for w in weights)),
        "weight_scale_axes": dict(weight_axes),
        "quantized_inputs_by_kind": {f"{k} {r}": c for (k, r), c in
                                     sorted(Counter((q.kind, q.role) for q in inputs).items())},
        "adds": {role: dict(c) for role, c in sorted(add_rows.items())},
        "ops": ops,
        "graph_float_dtype": dict(float_inits),
        "io_dtypes": {vi.name: elem(vi) for vi in list(graph.input) + list(graph.output)},
        "io_casts": io_casts,
        "quantize_scale_dtypes": scale_dtypes(qs),
        "dequantize_scale_dtypes": scale_dtypes(dqs),
        "zero_point_dtypes": dict(Counter(_dtype(inits[n.input[2]].data_type) if len(n.input) > 2 and n.input[2] in inits
                                          else "none" for n in qs + dqs)),
    }


# --- reports -----------------------------------------------------------------------------------------

def compare_files(modelopt_onnx: str | Path, ours_onnx: str | Path,
                  deliberate: Iterable[Deliberate] = DELIBERATE_DIFFERENCES) -> dict[str, Any]:
    """Compare two QDQ ONNX files: the JSON-ready report (sets, per-kind counts, reasons, both graphs' facts)."""
    import onnx

    models = {side: onnx.load(str(path), load_external_data=False)
              for side, path in (("modelopt", modelopt_onnx), ("ours", ours_onnx))}
    deliberate = tuple(deliberate)
    result = compare(quantized_tensors(models["modelopt"]), quantized_tensors(models["ours"]), deliberate)
    reasons = {d.name: d for d in deliberate}
    return {
        "modelopt_onnx": str(modelopt_onnx),
        "ours_onnx": str(ours_onnx),
        "ok": result.ok,
        "counts": {"modelopt": len(result.modelopt), "ours": len(result.ours), "common": len(result.common),
                   "only_modelopt": len(result.only_modelopt), "only_ours": len(result.only_ours),
                   "accepted": len(result.accepted),
                   "unlisted": sum(len(v) for v in result.unlisted.values())},
        "per_kind": result.per_kind(),
        "unlisted": result.unlisted,
        "accepted": {name: {"side": reasons[name].side, "reason": reasons[name].reason,
                            "keys": sorted(k for k, n in result.accepted.items() if n == name)}
                     for name in sorted(set(result.accepted.values()))},
        "deliberate_unused": list(result.unused),
        "facts": {side: placement_facts(model) for side, model in models.items()},
    }


def format_table(report: dict[str, Any]) -> str:
    """The human view of :func:`compare_files`' report: counts per kind, then every unlisted key."""
    cols = ("modelopt", "ours", "common", "only_modelopt", "only_ours", "accepted", "unlisted")
    width = max([len("kind"), len("total")] + [len(k) for k in report["per_kind"]])
    lines = [f"ModelOpt: {report['modelopt_onnx']}", f"ours:     {report['ours_onnx']}", "",
             "kind".ljust(width) + "".join(f"{c:>15}" for c in cols)]
    for kind, row in report["per_kind"].items():
        lines.append(kind.ljust(width) + "".join(f"{row[c]:>15}" for c in cols))
    lines.append("total".ljust(width) + "".join(f"{report['counts'][c]:>15}" for c in cols))
    for name, acc in report["accepted"].items():
        lines += ["", f"accepted ({name}, {len(acc['keys'])} only in {acc['side']}): {acc['reason']}"]
    for side, keys in report["unlisted"].items():
        if keys:
            lines += ["", f"UNLISTED, quantized only by {'ModelOpt' if side == 'modelopt' else 'ours'} ({len(keys)}):"]
            lines += [f"  {k}" for k in keys]
    lines += ["", "placement facts:" + "".join(f"{side:>28}" for side in report["facts"])]
    for label, value in _FACT_ROWS:
        lines.append(f"  {label:<40}" + "".join(f"{_short(value(f)):>28}" for f in report["facts"].values()))
    lines += ["", "agreement: " + ("yes (every difference is listed)" if report["ok"]
                                   else "NO: unlisted differences (fix the placement or list them with a reason)")]
    return "\n".join(lines)


def _ops(label: str, what: str) -> Any:
    return lambda f: f["ops"][label][what]


def _adds(role: str) -> Any:
    return lambda f: f"{f['adds'].get(role, {}).get('with_qdq', 0)}/{f['adds'].get(role, {}).get('nodes', 0)}"


_FACT_ROWS: tuple[tuple[str, Any], ...] = (
    ("opset", lambda f: f["opset"]),
    ("QuantizeLinear / DequantizeLinear nodes", lambda f: f"{f['quantize_nodes']} / {f['dequantize_nodes']}"),
    ("activation Q/DQ pairs / tensors", lambda f: f"{f['activation_qdq_pairs']} / {f['activation_tensors_quantized']}"),
    ("one Q/DQ per tensor (max Q per tensor)", lambda f: f"{f['one_qdq_per_tensor']} ({f['max_quantize_per_tensor']})"),
    ("weights quantized", lambda f: f["weights_quantized"]),
    ("residual Adds with Q/DQ", _adds("residual")),
    ("time-embedding Adds with Q/DQ", _adds("time_embedding")),
    ("Concat (feature) input / output Q/DQ", lambda f: f"{_ops('Concat', 'input_quantized')(f)} / "
                                                       f"{_ops('Concat', 'output_quantized')(f)} of {f['ops']['Concat']['nodes']}"),
    ("Resize input / output Q/DQ", lambda f: f"{_ops('Resize', 'input_quantized')(f)} / "
                                             f"{_ops('Resize', 'output_quantized')(f)} of {f['ops']['Resize']['nodes']}"),
    ("GroupNorm input Q/DQ", lambda f: f"{_ops('GroupNorm', 'input_quantized')(f)} of {f['ops']['GroupNorm']['nodes']}"),
    ("Softmax output Q/DQ", lambda f: f"{_ops('Softmax', 'output_quantized')(f)} of {f['ops']['Softmax']['nodes']}"),
    ("attention BMMs with input Q/DQ", lambda f: f"{_ops('BMM', 'input_quantized')(f)} of {f['ops']['BMM']['nodes']}"),
    ("float initializers (rank > 1)", lambda f: f["graph_float_dtype"]),
    ("Q/DQ scale dtypes", lambda f: sorted(set(f["quantize_scale_dtypes"]) | set(f["dequantize_scale_dtypes"]))),
    ("graph I/O casts", lambda f: len(f["io_casts"])),
)


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}:{v}" for k, v in value.items())
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _parse_allow(spec: str) -> Deliberate:
    side, sep, pattern = spec.partition(":")
    if not sep or side not in ("modelopt", "ours") or not pattern:
        raise argparse.ArgumentTypeError(f"--allow {spec!r}: expected SIDE:PATTERN with SIDE modelopt or ours, "
                                         "e.g. 'modelopt:Conv *conv_shortcut/Conv[*]'")
    return Deliberate(f"allowed:{spec}", side, (pattern,), "allowed on the command line (an artifact choice)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.modelopt_agreement", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="run ModelOpt's INT8 PTQ on our FP ONNX (needs nvidia-modelopt)")
    q.add_argument("--fp", required=True, help="FP ONNX from pqcad-deploy export ART --fp")
    q.add_argument("--out", required=True, help="ModelOpt's quantized ONNX to write")
    q.add_argument("--samples", type=int, default=32)
    q.add_argument("--batch", type=int, default=None,
                   help="calibration_shapes batch; default none (ModelOpt's default, which also leaves the "
                        "time-embedding GEMVs float)")
    q.add_argument("--calibration-method", default="max", choices=("max", "entropy"))
    q.add_argument("--high-precision-dtype", default="fp16", choices=("fp16", "bf16", "fp32"))
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--json", help="also write what was run here (ModelOpt logs to stdout as well)")
    c = sub.add_parser("compare", help="compare ModelOpt's placement with ours; exit 1 on an unlisted difference")
    c.add_argument("--modelopt", required=True, help="ModelOpt's quantized ONNX")
    c.add_argument("--ours", required=True, help="our export of the same artifact")
    c.add_argument("--allow", action="append", type=_parse_allow, default=[], metavar="SIDE:PATTERN",
                   help="accept one more difference (repeatable), e.g. for an artifact's float layers")
    c.add_argument("--json", help="write the full report here")
    f = sub.add_parser("facts", help="placement facts of one QDQ ONNX as JSON")
    f.add_argument("onnx")
    args = ap.parse_args(argv)

    if args.command == "quantize":
        info = modelopt_quantize(args.fp, args.out, samples=args.samples, batch=args.batch,
                                 calibration_method=args.calibration_method,
                                 high_precision_dtype=args.high_precision_dtype, seed=args.seed)
        print(json.dumps(info, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(info, indent=1) + "\n")
        return 0
    if args.command == "facts":
        print(json.dumps(placement_facts(args.onnx), indent=1))
        return 0
    for path in (args.modelopt, args.ours):
        if not Path(path).is_file():
            print(f"error: {path} does not exist; pass a QDQ ONNX file.", file=sys.stderr)
            return 2
    report = compare_files(args.modelopt, args.ours, DELIBERATE_DIFFERENCES + tuple(args.allow))
    print(format_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
