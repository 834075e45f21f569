"""The export targets, one entry each: what export_onnx does differently per target.

export_onnx runs the same steps for every target (trace, tidy, store weights, stamp the manifest,
check parity) and asks the target's :class:`ExportTarget` for the rest: what it refuses, what it
calibrates on the fake-quant student before tracing, how it rewrites the tidied graph, which weight
storage it can hold, which opsets it takes and how its parity is judged. Adding a target is one
entry here plus its rewrite module. ``onnxruntime`` is not a target
but a choice resolved to one (export_onnx.resolve_target).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["ExportTarget", "EXPORT_TARGETS", "RewriteContext", "TENSORRT_OUTPUT_TOLERANCE", "export_target"]

TENSORRT_OUTPUT_TOLERANCE = 5e-2
"""The tensorrt target's parity bound: relative L2 error of its output against the PyTorch student (see
converters.tensorrt: FP16 arithmetic, and roundings the student does not have)."""

LayerActBits = dict[str, "int | None"]


@dataclass(frozen=True)
class RewriteContext:
    """What a rewrite may need besides the graph: the export's opset, whether 4-bit weights go into
    INT4 initializers (the resolved --weight-storage), and every quantized layer's weight bits."""

    opset: int
    int4: bool
    layer_weight_bits: dict[str, int]


@dataclass(frozen=True)
class ExportTarget:
    """One export target.

    Args:
        int4_refusal: None when the target can hold INT4 weight initializers; else why it cannot
            (the --weight-storage int4 error).
        parity_level: the ONNX Runtime optimisation level at which the graph's parity is judged:
            "disabled" (as written) or "extended" (as an engine runs it).
        parity_output_tolerance: None: parity is judged by converters.parity.parity_verdict (integer
            codes and 1e-5 outputs); a number: by the outputs' relative L2 error alone, at most this
            (a graph whose arithmetic differs from the student's on purpose, e.g. FP16).
        default_opset, min_opset: the opset --opset defaults to, and the lowest it accepts.
        check: refuses an artifact the target cannot express: check(layer_act_bits, output_statistic).
        calibrate: measures what the rewrite needs on the fake-quant student before it is traced:
            calibrate(student, artifact_manifest, output_statistic, conditioning) -> state, where conditioning
            is the artifact's PyTorch conditioning (converters.conditions.artifact_conditioning).
        rewrite: rewrites the tidied graph in place: rewrite(model, layer_act_bits, state, context)
            -> a summary (or None).
        fp_rewrite: rewrites the tidied graph of an --fp export in place: fp_rewrite(model).
    """

    int4_refusal: str | None
    parity_level: str
    check: Callable[[LayerActBits, str], None] | None = None
    calibrate: Callable[[Any, Any, str, Any], Any] | None = None
    rewrite: Callable[[Any, LayerActBits, Any, RewriteContext], Any] | None = None
    fp_rewrite: Callable[[Any], Any] | None = None
    parity_output_tolerance: float | None = None
    default_opset: int = 17
    min_opset: int = 13


def _check_ort_x86(layer_act_bits: LayerActBits, output_statistic: str) -> None:
    from pqcad_deploy.converters.ort_x86 import check_ort_x86

    check_ort_x86(layer_act_bits)


def _rewrite_ort_x86(model, layer_act_bits: LayerActBits, state: Any, context: RewriteContext) -> None:
    from pqcad_deploy.converters.ort_x86 import to_ort_x86

    to_ort_x86(model, layer_act_bits)


def _check_ort_qlinear(layer_act_bits: LayerActBits, output_statistic: str) -> None:
    from pqcad_deploy.converters.ort_qlinear import check_ort_qlinear, check_output_statistic

    check_ort_qlinear(layer_act_bits)
    check_output_statistic(output_statistic)


def _calibrate_ort_qlinear(student, manifest, output_statistic: str, conditioning) -> dict[str, float]:
    from pqcad_deploy.converters.ort_qlinear import calibrate_output_ranges, output_scales

    return output_scales(calibrate_output_ranges(student, manifest, output_statistic, conditioning=conditioning))


def _rewrite_ort_qlinear(model, layer_act_bits: LayerActBits, conv_output_scales: dict[str, float],
                         context: RewriteContext) -> None:
    from pqcad_deploy.converters.ort_qlinear import to_ort_qlinear

    to_ort_qlinear(model, layer_act_bits, conv_output_scales)


def _check_tensorrt(layer_act_bits: LayerActBits, output_statistic: str) -> None:
    from pqcad_deploy.converters.tensorrt import check_tensorrt

    check_tensorrt(layer_act_bits)


def _calibrate_tensorrt(student, manifest, output_statistic: str, conditioning):
    from pqcad_deploy.converters.conditions import engine_conditions
    from pqcad_deploy.converters.tensorrt import TensorRTCalibration

    return TensorRTCalibration(scheduler_config=dict(manifest.scheduler_config),
                               prediction_type=manifest.prediction_type,
                               timesteps=tuple(manifest.student_timesteps), image_shape=tuple(manifest.image_shape),
                               conditions=engine_conditions(conditioning))


def _rewrite_tensorrt(model, layer_act_bits: LayerActBits, calibration: Any, context: RewriteContext):
    from pqcad_deploy.converters.tensorrt import to_tensorrt

    return to_tensorrt(model, layer_act_bits, context.layer_weight_bits, calibration, context.opset, context.int4)


def _fp_rewrite_tensorrt(model) -> None:
    from pqcad_deploy.converters.tensorrt import to_float16

    to_float16(model)


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
    # an FP16 graph (FP32 I/O) with one shared int8 Q/DQ per tensor, Q/DQ'd residual Adds, 4-bit convs in
    # INT8 containers, blocked INT4 MatMul weights at opset 21: what TensorRT builds strongly typed
    # (converters.tensorrt); build-engine --backend tensorrt expects it
    "tensorrt": ExportTarget(int4_refusal=None, parity_level="disabled", check=_check_tensorrt,
                             calibrate=_calibrate_tensorrt, rewrite=_rewrite_tensorrt, fp_rewrite=_fp_rewrite_tensorrt,
                             parity_output_tolerance=TENSORRT_OUTPUT_TOLERANCE, default_opset=19, min_opset=19),
}


def export_target(name: str) -> ExportTarget:
    """The registry entry of a concrete target (after resolve_target)."""
    return EXPORT_TARGETS[name]
