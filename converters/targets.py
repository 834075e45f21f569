"""The export targets, one entry each: what export_onnx does differently per target.

export_onnx runs the same steps for every target (trace, tidy, store weights, stamp the manifest,
check parity) and asks the target's :class:`ExportTarget` for the rest: what it refuses, what it
calibrates on the fake-quant student before tracing, how it rewrites the tidied graph, which weight
storage it can hold and at which ONNX Runtime level its parity is judged. Adding a target (the
TensorRT one of issue 16) is one entry here plus its rewrite module. ``onnxruntime`` is not a target
but a choice resolved to one (export_onnx.resolve_target).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["ExportTarget", "EXPORT_TARGETS", "export_target"]

LayerActBits = dict[str, "int | None"]


@dataclass(frozen=True)
class ExportTarget:
    """One export target.

    Args:
        int4_refusal: None when the target can hold INT4 weight initializers; else why it cannot
            (the --weight-storage int4 error).
        parity_level: the ONNX Runtime optimisation level at which the graph's parity is judged:
            "disabled" (as written) or "extended" (as an engine runs it).
        check: refuses an artifact the target cannot express: check(layer_act_bits, output_statistic).
        calibrate: measures what the rewrite needs on the fake-quant student before it is traced:
            calibrate(student, artifact_manifest, output_statistic) -> state.
        rewrite: rewrites the tidied graph in place: rewrite(model, layer_act_bits, state).
    """

    int4_refusal: str | None
    parity_level: str
    check: Callable[[LayerActBits, str], None] | None = None
    calibrate: Callable[[Any, Any, str], Any] | None = None
    rewrite: Callable[[Any, LayerActBits, Any], Any] | None = None


def _check_ort_x86(layer_act_bits: LayerActBits, output_statistic: str) -> None:
    from pqcad_deploy.converters.ort_x86 import check_ort_x86

    check_ort_x86(layer_act_bits)


def _rewrite_ort_x86(model, layer_act_bits: LayerActBits, state: Any) -> None:
    from pqcad_deploy.converters.ort_x86 import to_ort_x86

    to_ort_x86(model, layer_act_bits)


def _check_ort_qlinear(layer_act_bits: LayerActBits, output_statistic: str) -> None:
    from pqcad_deploy.converters.ort_qlinear import check_ort_qlinear, check_output_statistic

    check_ort_qlinear(layer_act_bits)
    check_output_statistic(output_statistic)


def _calibrate_ort_qlinear(student, manifest, output_statistic: str) -> dict[str, float]:
    from pqcad_deploy.converters.ort_qlinear import calibrate_output_ranges, output_scales

    return output_scales(calibrate_output_ranges(student, manifest, output_statistic))


def _rewrite_ort_qlinear(model, layer_act_bits: LayerActBits, conv_output_scales: dict[str, float]) -> None:
    from pqcad_deploy.converters.ort_qlinear import to_ort_qlinear

    to_ort_qlinear(model, layer_act_bits, conv_output_scales)


EXPORT_TARGETS: dict[str, ExportTarget] = {
    # int8 symmetric Q/DQ around every quantized layer: TensorRT's form, and any QDQ reader
    "qdq": ExportTarget(int4_refusal=None, parity_level="disabled"),
    # the same values laid out for ONNX Runtime's x86 CPU integer kernels (converters.ort_x86)
    "ort-x86": ExportTarget(int4_refusal="--target ort-x86 stores weights as uint8 (ConvInteger); use "
                                         "--weight-storage int8 or auto.",
                            parity_level="extended", check=_check_ort_x86, rewrite=_rewrite_ort_x86),
    # plus an int8 rounding of every quantized Conv output, so ONNX Runtime fuses QLinearConv
    # (converters.ort_qlinear)
    "ort-qlinear": ExportTarget(int4_refusal="--target ort-qlinear stores weights as int8 (QLinearConv); use "
                                             "--weight-storage int8 or auto.",
                                parity_level="extended", check=_check_ort_qlinear, calibrate=_calibrate_ort_qlinear,
                                rewrite=_rewrite_ort_qlinear),
}


def export_target(name: str) -> ExportTarget:
    """The registry entry of a concrete target (after resolve_target)."""
    return EXPORT_TARGETS[name]
