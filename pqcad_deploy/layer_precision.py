"""Precision of the first and last convolution (conv_in, conv_out), the UNet's most sensitive layers.

Three policies (``--first-last``):

- ``w8-fp-input`` (default of brecq and pqcad): 8-bit weights, input kept in floating point (no
  Q/DQ on it; TensorRT runs the layer in FP16 with the int8 weights dequantized).
- ``w8a8``: 8-bit weights and 8-bit input (the method's "first and last conv at 8 bits").
- ``target``: the same bits as every other layer (the plain fixed-bit baseline; minmax's default).

Why the float input is the default: measured on the embedded model (docs/RESULTS.md section 5,
5,000-sample FID, DDIM-100, H100), min-max W8A8 scores 35.6; with conv_in's input in float 31.8,
with conv_in's and conv_out's inputs in float 21.1, and with no activation quantization at all 14.6
(FP 13.6). conv_in's input is x_t itself: one per-tensor 8-bit grid spans the +-4 of pure noise at
large t, which is coarser than the noise level of the last steps; conv_out's output is the noise
prediction, whose quantization error the sampler integrates over every step. Both layers are a
negligible share of the compute (1 input or 1 output channel), so keeping their inputs in float costs
no speed. NVIDIA's ModelOpt diffusers recipe leaves the same layers unquantized.
"""

from __future__ import annotations

from pqcad_deploy.choices import FIRST_LAST_DEFAULTS, FIRST_LAST_POLICIES, FirstLastPolicy, check_choice
from pqcad_deploy.quant.replace import LayerBits

__all__ = ["FIRST_LAYER", "LAST_LAYER", "apply_first_last", "default_first_last"]

FIRST_LAYER = "conv_in"
LAST_LAYER = "conv_out"


def default_first_last(method: str) -> FirstLastPolicy:
    """minmax stays the plain baseline (``target``); the reconstruction methods keep float inputs."""
    return FIRST_LAST_DEFAULTS[method]


def apply_first_last(plan: dict[str, LayerBits], policy: FirstLastPolicy,
                     layers: tuple[str, ...] = (FIRST_LAYER, LAST_LAYER)) -> dict[str, LayerBits]:
    """The plan with `layers` (those present) set by `policy`; other layers are unchanged."""
    check_choice("--first-last", policy, FIRST_LAST_POLICIES)
    out = dict(plan)
    for name in layers:
        if name not in out or policy == "target":
            continue
        out[name] = LayerBits(8, None if policy == "w8-fp-input" else 8)
    return out
