"""The documents the ONNX checker's rules cite, one constant each, so two rules citing the same
section cannot drift apart and docs/CHECKER.md can name the section once.

Versioned pages are used where the versionless one moved; each was looked up, not guessed.
"""

from __future__ import annotations

__all__ = [
    "TRT_QUANTIZED_TYPES", "TRT_EXPLICIT_QUANTIZATION", "TRT_QUANTIZE_OP", "TRT_DEQUANTIZE_OP",
    "TRT_PRECISION_CONTROL", "TRT_OPTIMIZATION_PROFILE", "ONNX_TRT_OPERATORS", "ONNX_QUANTIZE_LINEAR",
    "ONNX_DEQUANTIZE_LINEAR", "ORT_QUANTIZATION", "ORT_QDQ_CONV_AXES", "ORT_OPERATOR_KERNELS",
]

TRT_QUANTIZED_TYPES = "https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/work-quantized-types.html"
"""TensorRT developer guide, "Working with Quantized Types": symmetric signed quantization, INT4
weight-only, "Q/DQ Layer-Placement Recommendations" and "Q/DQ Limitations"."""
TRT_EXPLICIT_QUANTIZATION = (
    "https://docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/quantized-types-explicit-quantization.html")
"""TensorRT developer guide, "Explicit Quantization": quantized weights, ONNX support, strong typing."""
TRT_QUANTIZE_OP = "https://docs.nvidia.com/deeplearning/tensorrt/operators/docs/Quantize.html"
"""TensorRT operator reference, Quantize: scale a build-time constant, scalar / 1-D / blocked (INT4
only) shapes, zero-point all zeros."""
TRT_DEQUANTIZE_OP = "https://docs.nvidia.com/deeplearning/tensorrt/operators/docs/Dequantize.html"
"""TensorRT operator reference, Dequantize: the same constraints on the dequantizing side."""
TRT_PRECISION_CONTROL = "https://docs.nvidia.com/deeplearning/tensorrt/10.16.1/inference-library/precision-control.html"
"""TensorRT developer guide, "Precision Control": a strongly typed network computes in the types
the graph states (an FP32 weight means FP32 math)."""
TRT_OPTIMIZATION_PROFILE = "https://docs.nvidia.com/deeplearning/tensorrt/api/python_api/infer/Core/OptimizationProfile.html"
"""TensorRT Python API, IOptimizationProfile: every dynamic input needs min/opt/max dimensions."""
ONNX_TRT_OPERATORS = "https://github.com/onnx/onnx-tensorrt/blob/release/10.1-GA/docs/operators.md"
"""onnx-tensorrt's operator matrix as of the 10.1 parser (opsets 9-20; ConvInteger, MatMulInteger,
QLinearConv, QLinearMatMul unsupported; DequantizeLinear of INT8, FP8, INT4; zero-points zero). The
10.2 and 10.3 changelogs add no opset or Q/DQ change."""
ONNX_QUANTIZE_LINEAR = "https://onnx.ai/onnx/operators/onnx__QuantizeLinear.html"
"""ONNX QuantizeLinear: scale type T1 = input type from opset 19, int4 and block_size from opset 21,
default zero-point type uint8."""
ONNX_DEQUANTIZE_LINEAR = "https://onnx.ai/onnx/operators/onnx__DequantizeLinear.html"
"""ONNX DequantizeLinear: the output type is the scale's; int4 and block_size from opset 21."""
ORT_QUANTIZATION = "https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html"
"""ONNX Runtime, "Quantize ONNX models": the QDQ format and its constant scales and zero-points."""
ORT_QDQ_CONV_AXES = (
    "https://github.com/microsoft/onnxruntime/blob/main/onnxruntime/python/tools/quantization/operators/conv.py")
"""ONNX Runtime's QDQ quantizer: per-channel Conv weights on axis 0, ConvTranspose weights on axis 1
(Gemm: 0 with transB else 1, operators/gemm.py; MatMul: 1, operators/matmul.py)."""
ORT_OPERATOR_KERNELS = "https://github.com/microsoft/onnxruntime/blob/main/docs/OperatorKernels.md"
"""ONNX Runtime's kernel list: the ops and domains it can run (no TensorRT ``TRT_*`` custom ops)."""
