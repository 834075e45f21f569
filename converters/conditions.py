"""A compressed artifact's conditioning, in the two forms the converters need.

compress records what a conditional model was calibrated with in the artifact (the UNet config's
``num_class_embeds``; the options' ``guidance_scale`` and ``null_class``). Export needs it twice: in
PyTorch (pqcad_deploy.conditioning: which keyword the UNet is called with, the labels of image i, the
guided noise prediction), for the traced wrapper, the parity inputs and the ort-qlinear calibration;
and as the engines' manifest entry (engines.conditioning: the graph input, the default guidance scale),
for the ONNX manifest and the tensorrt target's calibration, which runs the graph itself. Both come
from here, so they cannot disagree.
"""

from __future__ import annotations

import torch

from pqcad_deploy.conditioning import UNCONDITIONAL, Conditioning, conditioning_of
from pqcad_deploy.engines.conditioning import ConditioningSpec, conditioning_from_dict
from pqcad_deploy.errors import ExportError

__all__ = ["artifact_conditioning", "condition_spec", "torch_conditions"]


def artifact_conditioning(manifest, artifact: object = "the artifact") -> Conditioning:
    """The PyTorch conditioning an artifact was compressed with (UNCONDITIONAL for an unconditional one).

    Artifacts written before conditioning existed have no ``guidance_scale`` / ``null_class`` option:
    they were unconditional, and read as scale 1 without a null class.

    Raises:
        ExportError: a cross-attention UNet (``encoder_hidden_states``), which the converters do not
            write yet (the engines' registry has no such kind yet either).
    """
    if manifest.unet_config.get("cross_attention_dim") is not None:
        raise ExportError(f"{artifact} holds a cross-attention UNet (it takes encoder_hidden_states); export "
                          "takes unconditional and class-conditional (num_class_embeds) artifacts so far (issue 17).")
    options = manifest.options
    return conditioning_of(dict(manifest.unet_config), float(options.get("guidance_scale", 1.0)),
                           options.get("null_class"))


def condition_spec(conditioning: Conditioning) -> ConditioningSpec | None:
    """The engines' manifest entry of a PyTorch conditioning; None for an unconditional model."""
    if conditioning is UNCONDITIONAL:
        return None
    return conditioning_from_dict(conditioning.to_dict())


def torch_conditions(conditioning: Conditioning, n: int) -> dict[str, torch.Tensor]:
    """The keyword arguments of images 0 .. n-1 (``class_labels``: image i's class ``i % classes``)."""
    return conditioning.draw(torch.arange(n))
