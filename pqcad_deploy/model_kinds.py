"""What kind of diffusion model a folder holds, read from its JSON configs alone, and which kinds work.

Issue 17 takes pqcad-deploy from unconditional pixel-space UNet2DModels to class- and text-conditional
and latent models. Each kind needs its own loading, export inputs and sampler, so a folder's kind is
decided once, here, before any weights are read: an unsupported model (a Stable Diffusion pipeline, a
ControlNet, SDXL, ...) is refused in milliseconds with one line that says what it is, why it is not
taken and what to do, instead of a confusing failure after its weights have loaded (before this
module, a class-conditional UNet2DModel failed its load-time test forward pass with "class_labels
should be provided", blamed on its config).

Detection reads `model_index.json` (the pipeline's components), the denoiser's `config.json`
(`unet/config.json` in a pipeline, `config.json` in a model folder) and nothing else; no torch, no
diffusers import. :data:`MODEL_KINDS` is checked in order and the first kind whose test matches
wins: the known-unsupported families come first, because an SDXL or inpainting UNet is also a
UNet2DConditionModel with a vae and a text encoder.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pqcad_deploy.errors import ModelLoadError

__all__ = ["ModelConfigs", "ModelKind", "MODEL_KINDS", "SUPPORTED_TODAY", "read_model_configs", "detect_model_kind",
           "read_json_config", "refusal_line", "require_supported_kind"]

SUPPORTED_TODAY = ("pqcad-deploy compresses unconditional and class-conditional (num_class_embeds) pixel-space "
                   "UNet2DModel models (a folder with config.json, weights and scheduler_config.json, or 'builtin'), "
                   "and latent UNet2DConditionModel pipelines conditioned through cross-attention: Stable Diffusion "
                   "1.x / 2.x folders (unet/, vae/, text_encoder/, tokenizer/, scheduler/) and class-embedding "
                   "pipelines (unet/, vae/, class_embeddings/, scheduler/, as scripts/train_latent_reference.py writes them)")
"""The second half of every refusal: what the tool does take today."""


@dataclass(frozen=True)
class ModelConfigs:
    """The JSON a detection reads.

    Attributes:
        root: the folder given.
        index: model_index.json, or None for a model folder (config.json at the root).
        denoiser: the UNet's (or transformer's) config, or None when the folder has none.
        denoiser_path: where `denoiser` was read from.
        components: the pipeline's parts: model_index.json entries with a class (not [null, null]) and
            the subfolders present; empty for a model folder.
    """

    root: Path
    index: dict | None
    denoiser: dict | None
    denoiser_path: Path | None
    components: frozenset[str]

    @property
    def denoiser_class(self) -> str:
        return str((self.denoiser or {}).get("_class_name") or "")

    @property
    def pipeline_class(self) -> str:
        return str((self.index or {}).get("_class_name") or "")

    def denoiser_value(self, key: str):
        return (self.denoiser or {}).get(key)

    @property
    def latent(self) -> bool:
        """A VAE (SD, `vae`) or VQ-VAE (LDMPipeline, `vqvae`) decodes the denoiser's samples."""
        return bool({"vae", "vqvae"} & self.components)

    @property
    def has_text_encoder(self) -> bool:
        return "text_encoder" in self.components

    @property
    def has_class_table(self) -> bool:
        """A learned table of class embeddings fed to the UNet's cross-attention (`class_embeddings/`)."""
        return "class_embeddings" in self.components

    @property
    def class_embedding(self) -> bool:
        """The UNet adds a class (or other label) embedding: it must be called with class_labels."""
        return any(self.denoiser_value(key) is not None for key in ("num_class_embeds", "class_embed_type"))


@dataclass(frozen=True)
class ModelKind:
    """One kind of model (or known family of unsupported pipelines).

    Attributes:
        name: the kind's name (its key in MODEL_KINDS).
        summary: what it is, as "'DIR' holds <summary>" reads.
        supported: whether load_model takes it today.
        refusal: why it is not taken and what to do; None when supported.
        matches: the test on the folder's configs (first match in MODEL_KINDS' order wins).
    """

    name: str
    summary: str
    supported: bool
    refusal: str | None
    matches: Callable[[ModelConfigs], bool] = field(repr=False, compare=False)


def _not_yet(what: str) -> str:
    return f"{what} not supported yet (issue 17 adds them); {SUPPORTED_TODAY}."


def _not_taken(what: str) -> str:
    return f"{what} not supported; {SUPPORTED_TODAY}."


_VIDEO_UNETS = frozenset({"UNet3DConditionModel", "UNetSpatioTemporalConditionModel", "UNetMotionModel",
                          "I2VGenXLUNet"})
_COND_UNET = "UNet2DConditionModel"
_UNET = "UNet2DModel"


def _is_controlnet(c: ModelConfigs) -> bool:
    return "controlnet" in c.components or "ControlNet" in c.pipeline_class or "ControlNet" in c.denoiser_class


def _is_video(c: ModelConfigs) -> bool:
    return (c.denoiser_class in _VIDEO_UNETS or "motion_adapter" in c.components
            or any(mark in c.pipeline_class for mark in ("Video", "AnimateDiff")))


def _is_sdxl(c: ModelConfigs) -> bool:
    return (bool({"text_encoder_2", "tokenizer_2"} & c.components) or c.pipeline_class.startswith("StableDiffusionXL")
            or c.denoiser_value("addition_embed_type") == "text_time")


def _is_transformer(c: ModelConfigs) -> bool:
    return "Transformer" in c.denoiser_class or "DiT" in c.denoiser_class


def _has_added_conditions(c: ModelConfigs) -> bool:
    return c.denoiser_class == _COND_UNET and (
        c.denoiser_value("addition_embed_type") is not None or c.denoiser_value("encoder_hid_dim_type") is not None
        or c.denoiser_value("encoder_hid_dim") is not None or (c.has_text_encoder and c.class_embedding))


def _channels(c: ModelConfigs) -> tuple[object, object]:
    return c.denoiser_value("in_channels"), c.denoiser_value("out_channels")


MODEL_KINDS: dict[str, ModelKind] = {
    # ---- known-unsupported families, checked first
    "controlnet": ModelKind(
        "controlnet", "a ControlNet (model_index.json names a controlnet, or the model is a ControlNetModel)", False,
        _not_taken("ControlNet image conditioning is"), _is_controlnet),
    "video": ModelKind(
        "video", "a video diffusion model (UNet3DConditionModel, UNetMotionModel, UNetSpatioTemporalConditionModel, "
        "I2VGenXLUNet or a motion adapter)", False, _not_taken("video models are"), _is_video),
    "sdxl": ModelKind(
        "sdxl", "an SDXL pipeline (a second text encoder, text_encoder_2, or a UNet with addition_embed_type "
        "'text_time')", False, _not_taken("SDXL's second text encoder and added size and crop conditions are"),
        _is_sdxl),
    "transformer": ModelKind(
        "transformer", "a transformer diffusion model (DiT, PixArt, SD3, Flux), not a UNet", False,
        _not_taken("transformer denoisers are"), _is_transformer),
    "added-conditions": ModelKind(
        "added-conditions", "a UNet2DConditionModel with added conditions (addition_embed_type, encoder_hid_dim, or "
        "a class embedding beside a text encoder, as in Kandinsky, DeepFloyd IF and Stable unCLIP)", False,
        _not_taken("added conditions are"), _has_added_conditions),
    "inpainting": ModelKind(
        "inpainting", "an inpainting UNet (in_channels 9: the latents, the mask and the masked image)", False,
        _not_taken("inpainting UNets are"),
        lambda c: c.denoiser_class == _COND_UNET and _channels(c) == (9, 4)),
    "image-conditioned": ModelKind(
        "image-conditioned", "an image-conditioned UNet (in_channels differs from out_channels: depth, "
        "instruct-pix2pix or upscaler inputs beside the latents)", False,
        _not_taken("extra conditioning input channels are"),
        lambda c: c.denoiser_class == _COND_UNET and _channels(c)[0] != _channels(c)[1]),
    # ---- the model kinds of issue 17
    "unconditional-pixel": ModelKind(
        "unconditional-pixel", "an unconditional pixel-space UNet2DModel", True, None,
        lambda c: c.denoiser_class == _UNET and not c.class_embedding and not c.latent),
    "class-conditional-pixel": ModelKind(
        "class-conditional-pixel", "a class-conditional pixel-space UNet2DModel (num_class_embeds is set)", True,
        None, lambda c: c.denoiser_class == _UNET and c.denoiser_value("num_class_embeds") is not None
        and c.denoiser_value("class_embed_type") is None and not c.latent),
    "other-class-embedding-pixel": ModelKind(
        "other-class-embedding-pixel", "a pixel-space UNet2DModel with a class_embed_type ('timestep', "
        "'identity', ...: labels that are not class indices)", False,
        _not_yet("class embeddings other than num_class_embeds are"),
        lambda c: c.denoiser_class == _UNET and c.class_embedding and not c.latent),
    "unconditional-latent": ModelKind(
        "unconditional-latent", "an unconditional latent UNet2DModel (a vae or vqvae decodes its samples, as in "
        "LDMPipeline)", False, _not_yet("latent models are"),
        lambda c: c.denoiser_class == _UNET and not c.class_embedding and c.latent),
    "class-embedding-latent": ModelKind(
        "class-embedding-latent", "a class-conditional latent pipeline whose UNet2DConditionModel attends to a learned "
        "table of class embeddings (unet/, vae/, class_embeddings/)", True, None,
        lambda c: c.latent and c.denoiser_class == _COND_UNET and c.has_class_table and not c.has_text_encoder),
    "class-conditional-latent": ModelKind(
        "class-conditional-latent", "a class-conditional latent model (a vae, and a UNet2DModel with a class "
        "embedding or a UNet2DConditionModel with neither a text encoder nor a class_embeddings table)", False,
        _not_yet("class-conditional latent models without a class_embeddings table are"),
        lambda c: c.latent and ((c.denoiser_class == _UNET and c.class_embedding)
                                or (c.denoiser_class == _COND_UNET and not c.has_text_encoder))),
    "text-conditional-latent": ModelKind(
        "text-conditional-latent", "a text-conditional latent pipeline of the Stable Diffusion family "
        "(UNet2DConditionModel, vae, text_encoder, tokenizer)", True, None,
        lambda c: c.latent and c.denoiser_class == _COND_UNET and c.has_text_encoder),
    "conditional-unet-without-vae": ModelKind(
        "conditional-unet-without-vae", "a UNet2DConditionModel with no vae beside it, not a UNet2DModel (pass the "
        "pipeline folder that holds unet/ and vae/ once latent models are supported)", False,
        _not_yet("conditional models are"),
        lambda c: c.denoiser_class == _COND_UNET and not c.latent),
}
"""Every kind detect_model_kind can name, in the order it tests them."""


def read_json_config(path: Path, what: str) -> dict:
    """A JSON object from `path`, or ModelLoadError in one sentence naming the file (models.py reads its
    configs with it too)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{what} {path} is not valid JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{what} {path} is not a JSON object.")
    return data


def _pipeline_components(root: Path, index: dict | None) -> frozenset[str]:
    named = {key for key, value in (index or {}).items()
             if not key.startswith("_") and isinstance(value, list) and len(value) == 2 and value[1] is not None}
    present = {entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")}
    return frozenset(named | present)


def read_model_configs(path: Path) -> ModelConfigs:
    """The configs of a model or pipeline folder (layouts as models.resolve_model_dir reads them)."""
    path = Path(path)
    index_path = path / "model_index.json"
    pipeline = index_path.is_file() or (path / "unet" / "config.json").is_file() or \
        (path / "transformer" / "config.json").is_file()
    if not pipeline:
        config_path = path / "config.json"
        denoiser = read_json_config(config_path, "UNet config") if config_path.is_file() else None
        return ModelConfigs(path, None, denoiser, config_path if denoiser is not None else None, frozenset())
    index = read_json_config(index_path, "pipeline index") if index_path.is_file() else None
    for sub in ("unet", "transformer"):
        config_path = path / sub / "config.json"
        if config_path.is_file():
            denoiser = read_json_config(config_path, "UNet config" if sub == "unet" else "transformer config")
            return ModelConfigs(path, index, denoiser, config_path, _pipeline_components(path, index))
    return ModelConfigs(path, index, None, None, _pipeline_components(path, index))


def _first_match(configs: ModelConfigs) -> ModelKind | None:
    return next((kind for kind in MODEL_KINDS.values() if kind.matches(configs)), None)


def _unknown_class(configs: ModelConfigs, shown: str) -> ModelLoadError:
    cls = configs.denoiser_class or "model of unknown class"
    return ModelLoadError(f"{shown!r} holds a {cls}, not a UNet2DModel or UNet2DConditionModel; {SUPPORTED_TODAY}.")


def detect_model_kind(path: Path | str) -> ModelKind:
    """The kind of model in a folder, from its JSON configs only (milliseconds, no weights, no torch).

    Raises:
        ModelLoadError: a config is not valid JSON, the folder holds no model config, or its model class is
            none that MODEL_KINDS knows.
    """
    configs = read_model_configs(Path(path))
    kind = _first_match(configs)
    if kind is not None:
        return kind
    if configs.denoiser is None:
        raise ModelLoadError(f"{str(path)!r} holds no model config (config.json, or unet/config.json in a pipeline).")
    raise _unknown_class(configs, str(path))


def refusal_line(shown: str, kind: ModelKind) -> str:
    """The one line that refuses an unsupported kind: what the folder holds, why not, what to do."""
    return f"{shown!r} holds {kind.summary}; {kind.refusal}"


def require_supported_kind(path: Path, shown: str) -> ModelKind | None:
    """Refuse an unsupported kind before any weights are read; the kind, or None when there is no config.

    None leaves the folder to models.resolve_model_dir, which says which file is missing (a pipeline
    whose model_index.json alone marks it as a ControlNet, SDXL or video pipeline is refused here even
    without a denoiser config).

    Args:
        path: the model or pipeline folder.
        shown: how the user named it (the --model value), quoted in the messages.

    Raises:
        ModelLoadError: the refusal line of the kind, an unknown model class, or a config that is not valid JSON.
    """
    configs = read_model_configs(path)
    kind = _first_match(configs)
    if kind is None:
        if configs.denoiser is None:
            return None
        raise _unknown_class(configs, shown)
    if not kind.supported:
        raise ModelLoadError(refusal_line(shown, kind))
    return kind
