"""A read-only index over an ONNX graph, built once per check and shared by every rule.

Rules ask graph questions (who produces this tensor, who reads it, is it a build-time constant,
what is its element type and shape); answering them from the raw protobuf in each rule would
repeat the same loops twenty times and drift. Types and shapes of intermediate tensors come from
ONNX shape inference when it succeeds; where it cannot tell, the answer is ``None`` and the rules
that need it stay silent rather than guess.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

__all__ = ["GraphView", "QdqNode", "DEFAULT_DOMAINS", "FOUR_BIT_TYPES", "dtype_name"]

DEFAULT_DOMAINS = ("", "ai.onnx")
"""The ONNX standard domain, as writers spell it."""
FOUR_BIT_TYPES = frozenset({TensorProto.INT4, TensorProto.UINT4})


def dtype_name(elem_type: int | None) -> str:
    """``TensorProto.FLOAT16`` -> ``float16`` (for messages); ``unknown`` for None."""
    if elem_type is None:
        return "unknown"
    return {TensorProto.FLOAT: "float32", TensorProto.DOUBLE: "float64"}.get(
        elem_type, TensorProto.DataType.Name(elem_type).lower())


@dataclass(frozen=True)
class QdqNode:
    """A QuantizeLinear / DequantizeLinear node of the standard domain, with its parts named.

    Attributes:
        node: the node itself.
        name: its display name.
        is_quantize: QuantizeLinear (True) or DequantizeLinear (False).
        data: the tensor quantized (Q) or the codes dequantized (DQ).
        scale: the scale tensor's name.
        zero_point: the zero-point tensor's name, or "" when absent.
        axis: the ``axis`` attribute (ONNX default 1).
        block_size: the ``block_size`` attribute (0: not blocked).
    """

    node: Any
    name: str
    is_quantize: bool
    data: str
    scale: str
    zero_point: str
    axis: int
    block_size: int


class GraphView:
    """Producers, consumers, constants, element types and shapes of one model's main graph.

    Args:
        model: the ModelProto to index (not modified).
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.graph = model.graph
        self.opset: int | None = next((int(o.version) for o in model.opset_import if o.domain in DEFAULT_DOMAINS), None)
        self.initializers: dict[str, Any] = {t.name: t for t in self.graph.initializer}
        self.inputs = [i for i in self.graph.input if i.name not in self.initializers]
        self._overridable = {i.name for i in self.graph.input}  # an initializer listed as input is a default
        self.output_names = {o.name for o in self.graph.output}
        self.metadata: dict[str, str] = {p.key: p.value for p in model.metadata_props}
        self.nodes = list(self.graph.node)
        self._names = {id(n): n.name or f"{n.op_type}#{i}" for i, n in enumerate(self.nodes)}
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[tuple[Any, int]]] = defaultdict(list)
        self._constants: dict[str, Any] = {}
        for node in self.nodes:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for k, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((node, k))
            if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS and node.output:
                value = _constant_value(node)
                if value is not None:
                    self._constants[node.output[0]] = value
        self._types: dict[str, int] = {}
        self._shapes: dict[str, list[int | None]] = {}
        self._read_value_infos(self.graph)
        self._infer_shapes()
        self._qdq = self._find_qdq()
        self._qdq_by_node = {id(q.node): q for q in self._qdq}

    # ------------------------------------------------------------------ naming and structure

    def name(self, node: Any) -> str:
        """The node's name, or ``OpType#index`` for an unnamed node."""
        return self._names[id(node)]

    def producer_op(self, tensor: str) -> str | None:
        """The op type that writes ``tensor`` (None for graph inputs, initializers, dangling names)."""
        node = self.producer.get(tensor)
        return None if node is None else node.op_type

    def readers(self, tensor: str) -> list[Any]:
        """The nodes that read ``tensor`` (each node once)."""
        seen: dict[int, Any] = {}
        for node, _ in self.consumers.get(tensor, []):
            seen.setdefault(id(node), node)
        return list(seen.values())

    def qdq_nodes(self) -> list[QdqNode]:
        """Every standard-domain QuantizeLinear / DequantizeLinear, in graph order."""
        return list(self._qdq)

    def _find_qdq(self) -> list[QdqNode]:
        found = []
        for node in self.nodes:
            if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.domain not in DEFAULT_DOMAINS:
                continue
            if len(node.input) < 2:
                continue
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            found.append(QdqNode(node=node, name=self.name(node), is_quantize=node.op_type == "QuantizeLinear",
                                 data=node.input[0], scale=node.input[1],
                                 zero_point=node.input[2] if len(node.input) > 2 else "",
                                 axis=int(attrs.get("axis", 1)), block_size=int(attrs.get("block_size", 0))))
        return found

    def dequantize_feeding(self, tensor: str) -> QdqNode | None:
        """The DequantizeLinear whose output is ``tensor`` (through Identity), if any."""
        node = self._skip_identity(tensor)
        if node is None or node.op_type != "DequantizeLinear" or node.domain not in DEFAULT_DOMAINS:
            return None
        return self._qdq_by_node.get(id(node))

    def _skip_identity(self, tensor: str) -> Any:
        node = self.producer.get(tensor)
        while node is not None and node.op_type == "Identity" and node.input:
            node = self.producer.get(node.input[0])
        return node

    # ------------------------------------------------------------------ constants

    def is_constant(self, tensor: str) -> bool:
        """An initializer or a Constant node's output, possibly through Identity (a build-time constant)."""
        while True:
            if tensor in self.initializers and tensor not in self._overridable:
                return True
            if tensor in self._constants:
                return True
            node = self.producer.get(tensor)
            if node is None or node.op_type != "Identity" or not node.input:
                return False
            tensor = node.input[0]

    def constant_proto(self, tensor: str) -> Any:
        """The TensorProto behind a constant tensor (initializer or Constant), or None."""
        while True:
            if tensor in self.initializers:
                return self.initializers[tensor]
            if tensor in self._constants:
                return self._constants[tensor]
            node = self.producer.get(tensor)
            if node is None or node.op_type != "Identity" or not node.input:
                return None
            tensor = node.input[0]

    def constant_array(self, tensor: str) -> np.ndarray | None:
        """A constant's values, or None (not constant, stored as external data, or an unreadable type)."""
        proto = self.constant_proto(tensor)
        if proto is None or proto.data_location == TensorProto.EXTERNAL:
            return None
        try:
            return numpy_helper.to_array(proto)
        except Exception:  # a type numpy_helper cannot convert here: the value rules skip it
            return None

    # ------------------------------------------------------------------ types and shapes

    def elem_type(self, tensor: str) -> int | None:
        """The tensor's element type (TensorProto enum), or None when neither the graph nor inference says."""
        proto = self.constant_proto(tensor)
        if proto is not None:
            return int(proto.data_type)
        return self._types.get(tensor)

    def shape(self, tensor: str) -> list[int | None] | None:
        """The tensor's dims (None for a symbolic dim), or None when the rank is unknown."""
        proto = self.constant_proto(tensor)
        if proto is not None:
            return [int(d) for d in proto.dims]
        return self._shapes.get(tensor)

    def _read_value_infos(self, graph: Any) -> None:
        for vi in (*graph.input, *graph.output, *graph.value_info):
            t = vi.type
            if not t.HasField("tensor_type"):
                continue
            if t.tensor_type.elem_type:
                self._types.setdefault(vi.name, int(t.tensor_type.elem_type))
            if t.tensor_type.HasField("shape"):
                self._shapes.setdefault(vi.name, [d.dim_value if d.HasField("dim_value") else None
                                                  for d in t.tensor_type.shape.dim])

    def _infer_shapes(self) -> None:
        """Fill intermediate types and shapes from ONNX shape inference; a graph it cannot infer keeps
        only what it declares (rules needing more stay silent)."""
        try:
            inferred = onnx.shape_inference.infer_shapes(self.model, strict_mode=False)
        except Exception:  # an op unknown to this onnx, a >2 GB model: no inferred types
            return
        self._read_value_infos(inferred.graph)


def _constant_value(node: Any) -> Any:
    """A Constant node's value as a TensorProto (the ``value`` attribute or its scalar/list forms)."""
    for attr in node.attribute:
        if attr.name == "value":
            return attr.t
        if attr.name in ("value_float", "value_floats", "value_int", "value_ints"):
            value = onnx.helper.get_attribute_value(attr)
            dtype = np.float32 if attr.name.startswith("value_float") else np.int64
            return numpy_helper.from_array(np.asarray(value, dtype=dtype))
    return None
