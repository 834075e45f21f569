"""Lookup tables over an ONNX graph, shared by the target rewrites (converters.ort_x86, ort_qlinear).

Both rewrites find a layer's nodes by name, its tensors by initializer name, and check who consumes
a tensor before they replace it; building the three maps in one place keeps them identical.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["GraphIndex", "index_graph", "replace_nodes"]


@dataclass
class GraphIndex:
    """initializers and nodes by name, and the nodes that read each tensor (in graph order)."""

    inits: dict
    by_name: dict
    consumers: dict[str, list]

    def weight_consumer(self, layer: str, weight_dequantize: str):
        """The one node that reads ``layer``'s weight DequantizeLinear (its Conv or MatMul)."""
        from pqcad_deploy.errors import ExportError

        users = self.consumers.get(self.by_name[weight_dequantize].output[0], [])
        if len(users) != 1:
            raise ExportError(f"{layer}: its weight DequantizeLinear feeds {len(users)} nodes, expected 1")
        return users[0]


def index_graph(graph) -> GraphIndex:
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return GraphIndex(inits={i.name: i for i in graph.initializer}, by_name={n.name: n for n in graph.node},
                      consumers=consumers)


def replace_nodes(graph, nodes: list, dead_inits: set[str]) -> None:
    """Set the graph's nodes to ``nodes`` and drop the initializers in ``dead_inits`` nothing reads any more."""
    del graph.node[:]
    graph.node.extend(nodes)
    still_used = {name for node in graph.node for name in node.input}
    keep = [i for i in graph.initializer if i.name not in dead_inits or i.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
