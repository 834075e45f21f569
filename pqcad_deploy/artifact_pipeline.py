"""The pipeline folder a latent artifact was compressed from, and the conditioning it was compressed with.

A cross-attention artifact (a latent pipeline's UNet2DConditionModel) holds its UNet only. The VAE that decodes its
latents and the embeddings its conditioning reads (a Stable Diffusion pipeline's text encoder on the prompts it was
calibrated with, report.json's ``conditioning.labels``, or a class-embedding pipeline's class table) stay in the
pipeline folder it was compressed from: ``provenance.source_model``, or a folder the user names (``--pipeline``).
That folder is checked against the sha256 the artifact records for its UNet weights and for those parts, so what
is read is what the artifact was compressed with. export (the parts it writes beside the UNet ONNX) and analyze
(its images, decoded) both come through here; each names its own error class and what it reads the folder for.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from pqcad_deploy.conditioning import Conditioning, conditioning_for, conditioning_of, read_prompt_file
from pqcad_deploy.errors import ArtifactError, ConfigError

__all__ = ["artifact_conditioning", "artifact_sampling", "is_cross_attention", "source_pipeline"]


def is_cross_attention(manifest) -> bool:
    """Whether the artifact's UNet is conditioned through cross-attention (a latent pipeline's)."""
    return manifest.unet_config.get("cross_attention_dim") is not None


def source_pipeline(manifest, artifact: object = "the artifact", pipeline: Path | str | None = None, *,
                    reads: str = "its VAE and the text encoder or class table its conditioning reads are read",
                    error: type[Exception] = ArtifactError) -> Path:
    """The pipeline folder a cross-attention artifact was compressed from, checked to be that one.

    ``pipeline`` (``--pipeline``) or the artifact's ``provenance.source_model``; its ``unet/`` weights and the
    files of its VAE, text encoder, tokenizer or class table must have the sha256 the provenance records
    (``source_weights_sha256``, ``source_parts_sha256``).

    Args:
        reads: what the verb reads from the folder, for the message when there is none (", from FOLDER" follows).
        error: the verb's error class.

    Raises:
        error: the folder is not there, or its UNet weights or parts differ from the artifact's record.
    """
    from pqcad_deploy.models import BUILTIN_MODELS, is_builtin

    source = manifest.provenance.get("source_model") if pipeline is None else str(pipeline)
    root = BUILTIN_MODELS.get(str(source)) if source is not None and is_builtin(str(source)) else (
        None if source is None else Path(source).expanduser())
    if root is None or not root.is_dir():
        where = "the pipeline folder it was compressed from" if pipeline is None else "--pipeline"
        raise error(f"{artifact} is a latent model, and {reads}, from {where}: {source} is not a folder here; pass "
                    "--pipeline DIR (the pipeline folder the artifact was compressed from).")
    unet_files = sorted((f"unet/{name}", sha) for name, sha in
                        (manifest.provenance.get("source_weights_sha256") or {}).items())
    part_files = sorted((manifest.provenance.get("source_parts_sha256") or {}).items())  # absent in older artifacts
    for name, recorded in unet_files + part_files:  # the UNet first: a different model is named by it
        path = root / name
        if not path.is_file() or _cached_sha256(str(path), path.stat().st_mtime_ns) != recorded:
            raise error(f"{root} is not the pipeline {artifact} was compressed from: its {name} "
                        f"{'is missing' if not path.is_file() else 'differs'} (the artifact records sha256 "
                        f"{recorded[:12]}...); pass --pipeline with the pipeline folder it was compressed from.")
    return root


@functools.lru_cache(maxsize=8)
def _cached_sha256(path: str, mtime_ns: int) -> str:
    """sha256 of a pipeline file (gigabytes for SD's UNet), once per file version per process."""
    from pqcad_deploy.provenance import file_sha256

    return file_sha256(Path(path))


def artifact_conditioning(manifest, artifact: object = "the artifact", *, report: dict | None = None,
                          pipeline: Path | str | None = None, error: type[Exception] = ArtifactError,
                          reads: str | None = None) -> Conditioning:
    """The PyTorch conditioning an artifact was compressed with (UNCONDITIONAL for an unconditional one).

    Artifacts written before conditioning existed have no ``guidance_scale`` / ``null_class`` option:
    they were unconditional, and read as scale 1 without a null class.

    Args:
        report: the artifact's report.json; a text-conditional artifact's prompts are its
            ``conditioning.labels`` (without it: the options' prompt file, read again).
        pipeline: a cross-attention artifact's pipeline folder (default: :func:`source_pipeline`'s).
        error, reads: as for :func:`source_pipeline`.

    Raises:
        error: a cross-attention artifact whose pipeline folder is missing, another one, or of a kind that has
            no cross-attention conditioning; or whose prompts cannot be found.
    """
    if not is_cross_attention(manifest):
        return _pixel_conditioning(manifest)
    checked = {} if reads is None else {"reads": reads}
    root = source_pipeline(manifest, artifact, pipeline, error=error, **checked)
    return _embedding_conditioning(manifest, artifact, root, report, error)


def artifact_sampling(art, artifact: object = "the artifact", *, pipeline: Path | str | None = None,
                      device: str = "cpu", error: type[Exception] = ArtifactError,
                      reads: str | None = None) -> tuple[Conditioning, Callable | None]:
    """How the PyTorch stage samples a loaded artifact (pqcad_deploy.artifact.Artifact) as it was calibrated:
    its conditioning and, for a latent one, the VAE decoder (latents -> images in [-1, 1] on `device`) of the
    pipeline folder it was compressed from, that folder checked once; None for a pixel-space one.

    Raises:
        error: as :func:`artifact_conditioning`. ModelLoadError: a VAE that does not load.
    """
    from pqcad_deploy.latent_parts import vae_decoder

    manifest = art.manifest
    if not is_cross_attention(manifest):
        return _pixel_conditioning(manifest), None
    checked = {} if reads is None else {"reads": reads}
    root = source_pipeline(manifest, artifact, pipeline, error=error, **checked)
    return _embedding_conditioning(manifest, artifact, root, art.report, error), vae_decoder(root, device)


def _pixel_conditioning(manifest) -> Conditioning:
    options = manifest.options
    return conditioning_of(dict(manifest.unet_config), float(options.get("guidance_scale", 1.0)),
                           options.get("null_class"))


def _embedding_conditioning(manifest, artifact: object, root: Path, report: dict | None,
                            error: type[Exception]) -> Conditioning:
    """The cross-attention conditioning of an artifact from its checked pipeline folder `root`."""
    options = manifest.options
    prompts = _calibration_prompts(manifest, report, artifact, error)
    try:
        return _pipeline_conditioning(str(root), float(options.get("guidance_scale", 1.0)),
                                      options.get("null_class"), prompts)
    except ConfigError as exc:
        raise error(str(exc)) from None


def _calibration_prompts(manifest, report: dict | None, artifact: object,
                         error: type[Exception]) -> tuple[str, ...] | None:
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
        raise error(f"{artifact} was calibrated on the prompts of {prompt_file}, which its report.json does not "
                    f"list and which cannot be read now ({exc}); restore the file or the artifact's "
                    "report.json.") from None


@functools.lru_cache(maxsize=4)
def _pipeline_conditioning(root: str, guidance_scale: float, null_class: int | None,
                           prompts: tuple[str, ...] | None) -> Conditioning:
    """conditioning_for on a latent pipeline's parts (cached: export, its calibration and parity share it).

    Raises:
        ConfigError: a folder that is not a latent pipeline with cross-attention conditioning, or conditioning
            settings that do not fit it.
    """
    from pqcad_deploy.model_kinds import detect_model_kind
    from pqcad_deploy.models import LATENT_PARTS, load_latent_parts

    kind = detect_model_kind(Path(root)).name
    if kind not in LATENT_PARTS:
        raise ConfigError(f"{root} is a {kind} model folder, not a latent pipeline with cross-attention "
                          f"conditioning ({', '.join(LATENT_PARTS)}); pass --pipeline with the pipeline "
                          "the artifact was compressed from.")
    # the parts its conditioning reads (the VAE is read by whoever decodes)
    loaded = SimpleNamespace(kind=kind, **load_latent_parts(kind, Path(root), without=("vae",)))
    try:
        return conditioning_for(loaded, guidance_scale, null_class, prompts)
    except ConfigError as exc:
        raise ConfigError(f"the artifact's conditioning does not fit {root}: {exc}") from None
