"""What one input of our UNet ONNX is: its name, its dtype and its shape after the batch axis.

Every input of the graphs export writes has the batch first and dynamic (so guidance can run the
unconditional and conditional halves in one call), and a static rest: ``sample`` float32 [C, H, W],
``timestep`` float32 [], and a conditional model's input (engines.conditioning: ``class_labels`` int64
[]; later ``encoder_hidden_states`` float32 [tokens, width]). The runners' input check, the TensorRT
optimisation profile and buffers, the build smoke tests, the graph check and the static checker all
read this one description from the manifest (``OnnxManifest.graph_inputs``) instead of naming the
inputs themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["GraphInput", "INPUT_DTYPES"]

INPUT_DTYPES: tuple[str, ...] = ("float32", "int64")
"""The dtypes a graph input of ours may have (numpy names)."""


@dataclass(frozen=True)
class GraphInput:
    """One graph input: ``name``, numpy ``dtype`` name, and ``dims`` after the dynamic batch axis."""

    name: str
    dtype: str
    dims: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.dtype not in INPUT_DTYPES:
            raise ValueError(f"graph input {self.name!r}: dtype {self.dtype!r} is not one of {', '.join(INPUT_DTYPES)}")
        object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def per_sample(self) -> int:
        """Elements per batch row (buffer sizes)."""
        return math.prod(self.dims)

    def shape(self, batch: int) -> tuple[int, ...]:
        """The full shape for ``batch`` rows."""
        return (int(batch), *self.dims)

    def shape_text(self, batch: object = "batch") -> str:
        """``[batch, 3, 32, 32]``: the shape in messages."""
        return "[" + ", ".join(str(d) for d in (batch, *self.dims)) + "]"
