"""One naming helper for every tensor and node the converter adds, so names never drift.

Names derive from the PyTorch module path of the quantized layer (`down_blocks.0.resnets.0.conv1`),
so a user can map any Q/DQ node in Netron or a TensorRT log back to the layer it belongs to.
"""

from __future__ import annotations

__all__ = ["QdqNames", "qdq_names"]

from dataclasses import dataclass


@dataclass(frozen=True)
class QdqNames:
    """Names of the nodes and initializers of one quantized layer."""

    layer: str

    @property
    def input_quantize(self) -> str:
        return f"{self.layer}/input_quantize"

    @property
    def input_dequantize(self) -> str:
        return f"{self.layer}/input_dequantize"

    @property
    def weight_dequantize(self) -> str:
        return f"{self.layer}/weight_dequantize"

    @property
    def weight_codes(self) -> str:
        return f"{self.layer}.weight_codes"

    @property
    def weight_scale(self) -> str:
        return f"{self.layer}.weight_scale"

    @property
    def weight_zero_point(self) -> str:
        return f"{self.layer}.weight_zero_point"

    @property
    def act_scale(self) -> str:
        return f"{self.layer}.act_scale"

    @property
    def act_zero_point(self) -> str:
        return f"{self.layer}.act_zero_point"

    # ort-x86 target (converters.ort_x86): a quantized Conv as ConvInteger + rescale.
    @property
    def conv_integer(self) -> str:
        return f"{self.layer}/conv_integer"

    @property
    def output_scale(self) -> str:
        """act_scale * weight_scale per output channel, [out]: int32 accumulator -> float."""
        return f"{self.layer}.output_scale"

    # ort-qlinear target (converters.ort_qlinear): int32 bias and a rounded Conv output.
    @property
    def bias_codes(self) -> str:
        return f"{self.layer}.bias_codes"

    @property
    def bias_scale(self) -> str:
        """act_scale * weight_scale per output channel, [out]: the int32 bias's scale."""
        return f"{self.layer}.bias_scale"

    @property
    def bias_zero_point(self) -> str:
        return f"{self.layer}.bias_zero_point"

    @property
    def bias_dequantize(self) -> str:
        return f"{self.layer}/bias_dequantize"

    @property
    def output_quantize(self) -> str:
        return f"{self.layer}/output_quantize"

    @property
    def output_dequantize(self) -> str:
        return f"{self.layer}/output_dequantize"

    @property
    def output_act_scale(self) -> str:
        """The calibrated per-tensor scale of the Conv output (amax / 127)."""
        return f"{self.layer}.output_act_scale"

    @property
    def output_zero_point(self) -> str:
        return f"{self.layer}.output_zero_point"


def qdq_names(layer: str) -> QdqNames:
    return QdqNames(layer)
