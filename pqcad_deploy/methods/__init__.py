"""Compression methods. Each takes the FP UNet and a calibration set and returns a quantized student."""
