"""Which precision each layer of a TensorRT engine runs in, read from the engine inspector's JSON.

A Q/DQ graph says which layers should run in INT8; only the built engine says which do (a Q/DQ pair
TensorRT cannot fuse leaves its layer in float, silently). build-engine writes the inspector's
per-layer JSON next to the plan (``layers.json``, the format ``trtexec --exportLayerInfo`` writes);
this module, pure Python, summarises it: layers per precision and the layers not running in INT8.

The reading follows NVIDIA's trt-engine-explorer (NVIDIA/TensorRT tools/experimental/trt-engine-explorer,
tag v11.0): a layer's type is its ``ParameterType`` else its ``LayerType`` and its precision is that of
its first input (trex/layer.py ``Layer.__init__``); ``NoOp`` layers are left out (trex/layer.py
``fold_no_ops``); the data type is the type word of the input's ``Format/Datatype`` string
(trex/activations.py, Polygraphy backend/trt/util.py ``dtype_from_fmt_dtype``). TensorRT 11 splits that
field ("Migrating IEngineInspector Usage from TensorRT 10.x to 11.x", which shows a ``DataType`` key
beside ``Format`` for I/O tensors); a ``DataType`` key, when present, is read first.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import EngineError

__all__ = ["COMPUTE_LAYER_TYPES", "LayerPrecision", "LayerReport", "datatype_of", "summarize_layer_information",
           "read_layer_report"]

COMPUTE_LAYER_TYPES: frozenset[str] = frozenset({"Convolution", "Deconvolution", "MatrixMultiply"})
"""The layer types that do a quantized layer's arithmetic (trex/colors.py names them); one of these not
in INT8 is a Q/DQ pair TensorRT did not fuse, or a layer the export left in float on purpose."""

# Type words of the inspector's format strings -> precision names (trex/activations.py's table).
_TYPE_WORDS: dict[str, str] = {
    "FP32": "FP32", "FLOAT": "FP32", "FP16": "FP16", "HALF": "FP16", "BFLOAT16": "BF16", "BF16": "BF16",
    "INT8": "INT8", "FP8": "FP8", "INT4": "INT4", "FP4": "FP4", "FP4E2M1": "FP4", "INT32": "INT32",
    "INT64": "INT64", "UINT8": "UINT8", "BOOL": "BOOL", "DOUBLE": "FP64",
}
UNKNOWN = "unknown"


def datatype_of(tensor: dict[str, Any]) -> str:
    """The precision of one inspector tensor entry ("FP32", "FP16", "INT8", ..., or "unknown").

    "Thirty-two wide channel vectorized row major Int8 format" -> "INT8"; "Row major linear FP32" ->
    "FP32"; a TensorRT 11 entry's ``DataType`` ("Float", "Half", "Int8") is read before its format.
    """
    for key in ("DataType", "Datatype", "Format/Datatype"):
        text = tensor.get(key)
        if isinstance(text, str):
            for word in re.split(r"[^0-9A-Za-z]+", text.upper()):
                if word in _TYPE_WORDS:
                    return _TYPE_WORDS[word]
    return UNKNOWN


@dataclass(frozen=True)
class LayerPrecision:
    """One engine layer: its name, type (e.g. "Convolution", "Reformat") and input precision."""

    name: str
    type: str
    precision: str


@dataclass(frozen=True)
class LayerReport:
    """What the engine runs in which precision.

    Attributes:
        layers: every layer but NoOps, in engine order.
        counts: precision -> number of layers, largest first.
        not_int8: the layers whose input is not INT8 (reformats and poolings included).
        compute_not_int8: the Convolution / Deconvolution / MatrixMultiply layers among them.
    """

    layers: tuple[LayerPrecision, ...]

    @property
    def counts(self) -> dict[str, int]:
        return dict(Counter(layer.precision for layer in self.layers).most_common())

    @property
    def not_int8(self) -> tuple[LayerPrecision, ...]:
        return tuple(layer for layer in self.layers if layer.precision != "INT8")

    @property
    def compute_not_int8(self) -> tuple[LayerPrecision, ...]:
        return tuple(layer for layer in self.not_int8 if layer.type in COMPUTE_LAYER_TYPES)

    def lines(self, limit: int = 10) -> list[str]:
        """The summary build-engine prints: counts, then up to ``limit`` compute layers not in INT8."""
        counts = ", ".join(f"{precision} {n}" for precision, n in self.counts.items())
        compute = [layer for layer in self.layers if layer.type in COMPUTE_LAYER_TYPES]
        out = [f"TensorRT layers by input precision: {counts} ({len(self.layers)} layers)",
               f"convolution / matrix-multiply layers not in INT8: {len(self.compute_not_int8)} of {len(compute)}"]
        out += [f"  {layer.name} ({layer.precision})" for layer in self.compute_not_int8[:limit]]
        if len(self.compute_not_int8) > limit:
            out.append(f"  ... and {len(self.compute_not_int8) - limit} more")
        return out


def summarize_layer_information(info: object, source: str = "layer information") -> LayerReport:
    """Summarise the inspector's ``get_engine_information(LayerInformationFormat.JSON)``, parsed.

    Raises:
        EngineError: not the inspector's JSON, or one built without detailed profiling verbosity
            (then ``Layers`` holds names only and no precision can be read).
    """
    layers = info.get("Layers") if isinstance(info, dict) else None
    if not isinstance(layers, list):
        raise EngineError(f"{source} is not TensorRT engine-inspector JSON (no \"Layers\" list); rebuild the engine "
                          "with pqcad-deploy build-engine --backend tensorrt.")
    if layers and not all(isinstance(layer, dict) for layer in layers):
        raise EngineError(f"{source} holds layer names only: the engine was built without detailed profiling "
                          "verbosity; rebuild it with pqcad-deploy build-engine --backend tensorrt (or trtexec "
                          "--profilingVerbosity=detailed).")
    kept = []
    for layer in layers:
        kind = layer.get("ParameterType") or layer.get("LayerType") or UNKNOWN
        if layer.get("LayerType") == "NoOp" or kind == "NoOp":
            continue
        inputs = layer.get("Inputs") or []
        precision = datatype_of(inputs[0]) if inputs and isinstance(inputs[0], dict) else UNKNOWN
        kept.append(LayerPrecision(name=str(layer.get("Name", "")), type=str(kind), precision=precision))
    return LayerReport(layers=tuple(kept))


def read_layer_report(path: str | os.PathLike[str]) -> LayerReport:
    """:func:`summarize_layer_information` of a ``layers.json`` file.

    Raises:
        EngineError: the file is missing, unreadable, not JSON, or not the inspector's JSON.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EngineError(f"cannot read the layer report {path} ({exc}); rebuild the engine.") from exc
    try:
        info = json.loads(text)
    except json.JSONDecodeError as exc:
        raise EngineError(f"{path} is not valid JSON ({exc}); rebuild the engine.") from exc
    return summarize_layer_information(info, source=str(path))
