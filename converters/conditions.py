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
that folder's UNet weights are the ones the artifact records; export writes that folder's other parts
beside the UNet as well (converters.export_parts).
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace

import torch

from pqcad_deploy.conditioning import (UNCONDITIONAL, Conditioning, EmbeddingConditioning, conditioning_for,
                                       conditioning_of, read_prompt_file)
from pqcad_deploy.engines.conditioning import (ConditioningSpec, EmbeddingConditioningSpec, SampleConditions,
                                               conditioning_from_dict)
from pqcad_deploy.errors import ConfigError, ExportError

__all__ = ["artifact_conditioning", "condition_spec", "engine_conditions", "source_pipeline",
           "torch_conditions"]

def _is_cross_attention(manifest) -> bool:
    return manifest.unet_config.get("cross_attention_dim") is not None


def artifact_conditioning(manifest, artifact: object = "the artifact", *, report: dict | None = None,
                          pipeline: Path | str | None = None) -> Conditioning:
    """The PyTorch conditioning an artifact was compressed with (UNCONDITIONAL for an unconditional one).

    Artifacts written before conditioning existed have no ``guidance_scale`` / ``null_class`` option:
    they were unconditional, and read as scale 1 without a null class.

    Args:
        report: the artifact's report.json; a text-conditional artifact's prompts are its
            ``conditioning.labels`` (without it: the options' prompt file, read again).
        pipeline: a cross-attention artifact's pipeline folder (default: :func:`source_pipeline`'s).

    Raises:
        ExportError: a cross-attention artifact whose pipeline folder is missing, another one, or of a kind
            export does not take; or whose prompts cannot be found.
    """
    options = manifest.options
    scale, null_class = float(options.get("guidance_scale", 1.0)), options.get("null_class")
    if not _is_cross_attention(manifest):
        return conditioning_of(dict(manifest.unet_config), scale, null_class)
    root = source_pipeline(manifest, artifact, pipeline)
    return _pipeline_conditioning(str(root), scale, null_class, _calibration_prompts(manifest, report, artifact))


def _calibration_prompts(manifest, report: dict | None, artifact: object) -> tuple[str, ...] | None:
    """The prompts a text-conditional artifact was calibrated on (None for other artifacts)."""
    recorded = (report or {}).get("conditioning") or {}
    if recorded.get("source") == "prompts" and recorded.get("labels"):
        return tuple(str(p) for p in recorded["labels"])
    prompt_file = manifest.options.get("prompt_file")
    if prompt_file is None:
        return None
    try:
        return read_prompt_file(prompt_file)
    except ConfigError as exc:
        raise ExportError(f"{artifact} was calibrated on the prompts of {prompt_file}, which its report.json does not "
                          f"list and which cannot be read now ({exc}); restore the file or the artifact's "
                          "report.json.") from None


@functools.lru_cache(maxsize=4)
def _pipeline_conditioning(root: str, guidance_scale: float, null_class: int | None,
                           prompts: tuple[str, ...] | None) -> Conditioning:
    """conditioning_for on a latent pipeline's parts (cached: export, its calibration and parity share it)."""
    from pqcad_deploy.model_kinds import detect_model_kind
    from pqcad_deploy.models import LATENT_PARTS, load_latent_parts

    kind = detect_model_kind(Path(root)).name
    if kind not in LATENT_PARTS:
        raise ExportError(f"{root} is a {kind} model folder, not a latent pipeline with cross-attention "
                          f"conditioning ({', '.join(LATENT_PARTS)}); pass --pipeline with the pipeline "
                          "the artifact was compressed from.")
    # the parts its conditioning reads (export writes the VAE decoder from the folder itself)
    loaded = SimpleNamespace(kind=kind, **load_latent_parts(kind, Path(root), without=("vae",)))
    try:
        return conditioning_for(loaded, guidance_scale, null_class, prompts)
    except ConfigError as exc:
        raise ExportError(f"the artifact's conditioning does not fit {root}: {exc}") from None


def source_pipeline(manifest, artifact: object = "the artifact", pipeline: Path | str | None = None) -> Path:
    """The pipeline folder a cross-attention artifact was compressed from, checked to be that one.

    ``pipeline`` (export's ``--pipeline``) or the artifact's ``provenance.source_model``; its
    ``unet/`` weights and the files of its VAE, text encoder, tokenizer or class table must have the sha256
    the provenance records (``source_weights_sha256``, ``source_parts_sha256``), so the parts written beside
    the UNet are the ones it was compressed with.

    Raises:
        ExportError: the folder is not there, or its UNet weights differ from the artifact's record.
    """
    from pqcad_deploy.models import BUILTIN_MODELS, is_builtin

    source = manifest.provenance.get("source_model") if pipeline is None else str(pipeline)
    root = BUILTIN_MODELS.get(str(source)) if source is not None and is_builtin(str(source)) else (
        None if source is None else Path(source).expanduser())
    what = "its VAE decoder and the text encoder or class table its conditioning reads"
    if root is None or not root.is_dir():
        where = "the pipeline folder it was compressed from" if pipeline is None else "--pipeline"
        raise ExportError(f"{artifact} is a latent model, and export writes {what} beside the UNet, from "
                          f"{where}: {source} is not a folder here; pass --pipeline DIR (the pipeline folder the "
                          "artifact was compressed from).")
    unet_files = sorted((f"unet/{name}", sha) for name, sha in
                        (manifest.provenance.get("source_weights_sha256") or {}).items())
    part_files = sorted((manifest.provenance.get("source_parts_sha256") or {}).items())  # absent in older artifacts
    for name, recorded in unet_files + part_files:  # the UNet first: a different model is named by it
        path = root / name
        if not path.is_file() or _cached_sha256(str(path), path.stat().st_mtime_ns) != recorded:
            raise ExportError(f"{root} is not the pipeline {artifact} was compressed from: its {name} "
                              f"{'is missing' if not path.is_file() else 'differs'} (the artifact records sha256 "
                              f"{recorded[:12]}...); pass --pipeline with the pipeline folder it was compressed from.")
    return root


@functools.lru_cache(maxsize=8)
def _cached_sha256(path: str, mtime_ns: int) -> str:
    """sha256 of a pipeline file (gigabytes for SD's UNet), once per file version per process."""
    from pqcad_deploy.provenance import file_sha256

    return file_sha256(Path(path))


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
