"""A compressed artifact's conditioning, in the forms the converters need.

compress records what a conditional model was calibrated with in the artifact (the UNet config's
``num_class_embeds`` or ``cross_attention_dim``; the options' ``guidance_scale``, ``null_class`` and
``prompt_file``; report.json's ``conditioning``). Export needs it three times: in PyTorch
(pqcad_deploy.conditioning: which keyword the UNet is called with, the condition of image i, the guided
noise prediction), for the traced wrapper, the parity inputs and the ort-qlinear calibration; as the
engines' manifest entry (engines.conditioning: the graph input, the default guidance scale); and as the
engines' sampling conditions, for the tensorrt target's calibration, which runs the graph itself. All
three come from here, so they cannot disagree.

A cross-attention artifact (a latent pipeline's UNet2DConditionModel) is conditioned on embeddings the
artifact does not hold: a Stable Diffusion pipeline's text encoder on the prompts it was calibrated with
(report.json's ``conditioning.labels``), or a class-embedding pipeline's class table. They are read from
the pipeline folder it was compressed from (``provenance.source_model``, or ``--pipeline``), after checking
that folder's UNet weights are the ones the artifact records (pqcad_deploy.artifact_pipeline, which analyze and
eval fid share; here with export's errors); export writes that folder's other parts beside the UNet as well
(converters.export_parts).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pqcad_deploy import artifact_pipeline
from pqcad_deploy.conditioning import UNCONDITIONAL, Conditioning, EmbeddingConditioning
from pqcad_deploy.engines.conditioning import (ConditioningSpec, EmbeddingConditioningSpec, SampleConditions,
                                               conditioning_from_dict)
from pqcad_deploy.errors import ExportError

__all__ = ["artifact_conditioning", "condition_spec", "engine_conditions", "source_pipeline",
           "torch_conditions"]

_EXPORT_READS = (
    "export writes its VAE decoder and the text encoder or class table its conditioning reads beside the UNet")


def artifact_conditioning(manifest, artifact: object = "the artifact", *, report: dict | None = None,
                          pipeline: Path | str | None = None) -> Conditioning:
    """The PyTorch conditioning an artifact was compressed with (pqcad_deploy.artifact_pipeline), export's errors.

    Raises:
        ExportError: a cross-attention artifact whose pipeline folder is missing, another one, or of a kind
            export does not take; or whose prompts cannot be found.
    """
    return artifact_pipeline.artifact_conditioning(manifest, artifact, report=report, pipeline=pipeline,
                                                   error=ExportError, reads=_EXPORT_READS)


def source_pipeline(manifest, artifact: object = "the artifact", pipeline: Path | str | None = None) -> Path:
    """The pipeline folder a cross-attention artifact was compressed from, checked to be that one
    (pqcad_deploy.artifact_pipeline.source_pipeline), so the parts written beside the UNet are the ones it was
    compressed with.

    Raises:
        ExportError: the folder is not there, or its UNet weights or parts differ from the artifact's record.
    """
    return artifact_pipeline.source_pipeline(manifest, artifact, pipeline, reads=_EXPORT_READS, error=ExportError)


def _embedding_spec(conditioning: EmbeddingConditioning) -> EmbeddingConditioningSpec:
    table = conditioning.table
    return EmbeddingConditioningSpec(
        source=conditioning.source, tokens=int(table.shape[1]), width=int(table.shape[2]),
        guidance_scale=conditioning.guidance_scale, has_null=conditioning.null_embedding is not None,
        num_classes=conditioning.rows if conditioning.source == "class_embeddings" else None)


_SPECS = {"class": lambda c: conditioning_from_dict(c.to_dict()), "embedding": _embedding_spec}
"""PyTorch conditioning kind -> its engines manifest entry."""


def condition_spec(conditioning: Conditioning) -> ConditioningSpec | None:
    """The engines' manifest entry of a PyTorch conditioning; None for an unconditional model."""
    if conditioning is UNCONDITIONAL:
        return None
    return _SPECS[conditioning.kind](conditioning)


def _embedding_conditions(conditioning: EmbeddingConditioning, spec: EmbeddingConditioningSpec) -> SampleConditions:
    null = None if conditioning.null_embedding is None else conditioning.null_embedding.numpy()
    return spec.table_conditions(conditioning.table.numpy(), null)


_ENGINE_CONDITIONS = {"class": lambda c, spec: spec.sample_conditions(), "embedding": _embedding_conditions}
"""PyTorch conditioning kind -> the engines' sampling conditions with the artifact's rows (image i: row i % rows)."""


def engine_conditions(conditioning: Conditioning) -> SampleConditions | None:
    """What the engines' sampler feeds for image i, from the PyTorch conditioning (None: unconditional):
    image i's class ``i % classes``, or row ``i % rows`` of the artifact's embeddings, at its scale."""
    spec = condition_spec(conditioning)
    return None if spec is None else _ENGINE_CONDITIONS[conditioning.kind](conditioning, spec)


def torch_conditions(conditioning: Conditioning, n: int) -> dict[str, torch.Tensor]:
    """The keyword arguments of images 0 .. n-1 (``class_labels``: image i's class ``i % classes``;
    ``encoder_hidden_states``: row ``i % rows``)."""
    return conditioning.draw(torch.arange(n))
