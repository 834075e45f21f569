"""Lookup tables over an ONNX graph, shared by the target rewrites (converters.ort_x86, ort_qlinear).

Both rewrites find a layer's nodes by name, its tensors by initializer name, and check who consumes
a tensor before they replace it; building the three maps in one place keeps them identical.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GraphIndex", "consumer_map", "index_graph", "replace_nodes"]


@dataclass
class GraphIndex:
    """initializers and nodes by name, and the nodes that read each tensor (in graph order)."""

    inits: dict
    by_name: dict
    consumers: dict[str, list]

    def quantized_op(self, layer: str, names):
        """The Conv or MatMul that reads ``layer``'s weight DequantizeLinear, checked for the default
        target's layout (for a Conv: inputs DQ(activation), DQ(weight), the activation DQ read by it alone).

        names: the layer's converters.naming.qdq_names.
        """
        from pqcad_deploy.errors import ExportError

        wdq = self.by_name[names.weight_dequantize]
        users = self.consumers.get(wdq.output[0], [])
        if len(users) != 1:
            raise ExportError(f"{layer}: its weight DequantizeLinear feeds {len(users)} nodes, expected 1")
        op = users[0]
        if op.op_type not in ("Conv", "MatMul"):
            raise ExportError(f"{layer}: weight feeds {op.op_type}, expected Conv or MatMul")
        if op.op_type == "Conv":
            dq = self.by_name[names.input_dequantize]
            if list(op.input[:2]) != [dq.output[0], wdq.output[0]] or len(self.consumers[dq.output[0]]) != 1:
                raise ExportError(f"{layer}: unexpected Q/DQ layout around its Conv")
        return op


def consumer_map(nodes) -> dict[str, list]:
    """{tensor: the nodes that read it, in graph order}."""
    consumers: dict[str, list] = {}
    for node in nodes:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def index_graph(graph) -> GraphIndex:
    return GraphIndex(inits={i.name: i for i in graph.initializer}, by_name={n.name: n for n in graph.node},
                      consumers=consumer_map(graph.node))


def replace_nodes(graph, nodes: list, dead_inits: set[str]) -> None:
    """Set the graph's nodes to ``nodes`` and drop the initializers in ``dead_inits`` nothing reads any more."""
    del graph.node[:]
    graph.node.extend(nodes)
    still_used = {name for node in graph.node for name in node.input}
    keep = [i for i in graph.initializer if i.name not in dead_inits or i.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
