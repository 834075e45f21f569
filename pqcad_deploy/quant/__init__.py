"""Quantization: pure maths (`primitives`), stateful quantizers (`quantizer`), quantized layers
(`layers`) and the type registry that swaps them in (`replace`)."""
