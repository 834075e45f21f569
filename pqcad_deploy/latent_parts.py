"""A latent pipeline's parts beside the UNet, in PyTorch: the VAE, the text encoder and the class table.

A latent model's UNet samples latents, not pixels, and is conditioned through cross-attention on
``encoder_hidden_states`` (issue 17). compress needs the other parts of the pipeline folder for three
things: the condition embeddings the guided trajectories are drawn with (a Stable Diffusion text
encoder on the user's prompts, or a learned table of class embeddings), the VAE that turns the
samples its checks compare into images, and, at export, the same parts again (converters/vae_decoder.py
and converters/text_encoder.py load them from here). Each loader checks its folder's config first and
fails with one ModelLoadError line.

What we followed for the text path: diffusers 0.42.1 ``StableDiffusionPipeline.encode_prompt``: the
prompt is tokenised to the tokenizer's ``model_max_length`` (77) with ``padding="max_length"`` and
``truncation=True``; the embeddings are ``text_encoder(input_ids)[0]`` (the last hidden state), with an
attention mask only where the encoder's config asks for one (``use_attention_mask``; SD 1.x / 2.x do
not); the unconditional half of guidance is the empty prompt ``""`` embedded the same way. For the
decode: ``vae.decode(latents / vae.config.scaling_factor).sample`` in [-1, 1].

The class table (``class_embeddings/``, as scripts/train_latent_reference.py writes it):
``config.json`` (num_classes, null_class, tokens, width, class_names) and ``embeddings.safetensors``
with one float32 tensor ``embeddings`` [rows, tokens, width]: row c is class c's
``encoder_hidden_states``, the null row the unconditional half of guidance. A class-conditional model
thus runs the SD code path (cross-attention on a sequence of embeddings) with a lookup in place of CLIP.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pqcad_deploy.errors import ModelLoadError
from pqcad_deploy.model_kinds import read_json_config

__all__ = ["CLASS_TABLE_FOLDER", "ClassTable", "TextEncoder", "load_class_table", "load_text_encoder",
           "load_text_encoder_model", "load_vae", "part_config", "vae_decode"]

CLASS_TABLE_FOLDER = "class_embeddings"
_VAE_CLASSES = ("AutoencoderKL",)
_TEXT_CLASSES = ("CLIPTextModel",)
# latent normalisations some newer VAEs declare (SD3 / Flux: shift_factor; SDXL-derived: per-channel
# mean/std); StableDiffusionPipeline, whose latents we decode, applies none of them
_UNHANDLED_VAE_KEYS = ("shift_factor", "latents_mean", "latents_std")


def part_config(pipeline_dir: Path | str, subfolder: str, classes: Sequence[str], class_key: str) -> tuple[Path, dict]:
    """(`pipeline_dir/subfolder`, its config.json) after checking the part is one of `classes`.

    Args:
        subfolder: the part's folder in diffusers' pipeline layout ("vae", "text_encoder", ...).
        classes: the model classes we take for this part.
        class_key: where its config names the class: diffusers' "_class_name", or transformers'
            "architectures" (a list).

    Raises:
        ModelLoadError: the folder or its config is missing, unreadable, or names another class.
    """
    root = Path(pipeline_dir)
    folder = root / subfolder
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{root} has no {subfolder}/config.json; pass a diffusers pipeline folder "
                             f"(model_index.json, unet/, {subfolder}/, ...) as StableDiffusionPipeline.save_pretrained "
                             "writes it.")
    config = read_json_config(config_path, f"{subfolder} config")
    named = config.get(class_key)
    names = named if isinstance(named, list) else [named]
    if not any(name in classes for name in names):
        raise ModelLoadError(f"{config_path} describes {named!r}; pqcad-deploy takes a {subfolder}/ of class "
                             f"{' or '.join(classes)} only.")
    return folder, config


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def load_vae(pipeline_dir: Path | str):
    """The pipeline's AutoencoderKL (float32, eval mode) and its config dict.

    Raises:
        ModelLoadError: no vae/ folder, another VAE class, a latent normalisation we do not apply, or
            weights that do not load.
    """
    from diffusers import AutoencoderKL

    folder, config = part_config(pipeline_dir, "vae", _VAE_CLASSES, "_class_name")
    declared = [key for key in _UNHANDLED_VAE_KEYS if config.get(key) is not None]
    if declared:
        raise ModelLoadError(f"{folder / 'config.json'} sets {', '.join(declared)}; pqcad-deploy decodes latents "
                             "the way StableDiffusionPipeline does (divided by scaling_factor only), so this VAE "
                             "is not supported yet.")
    if not isinstance(config.get("scaling_factor"), (int, float)) or config["scaling_factor"] <= 0:
        raise ModelLoadError(f"{folder / 'config.json'} has scaling_factor {config.get('scaling_factor')!r}; "
                             "it must be a positive number (0.18215 in Stable Diffusion 1.x / 2.x).")
    from pqcad_deploy.models import quiet_diffusers

    quiet_diffusers()
    try:  # float32 whatever the file holds: the builtin latent model ships float16 weights
        vae = AutoencoderKL.from_pretrained(str(folder), torch_dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - diffusers raises many types for a broken folder
        raise ModelLoadError(f"cannot load the VAE from {folder}: {_first_line(exc)}") from None
    return vae.eval(), config


@torch.no_grad()
def vae_decode(vae: torch.nn.Module, latents: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """Images in [-1, 1] (float32, the latents' device) from the sampler's final latents, in batches."""
    scale = float(vae.config.scaling_factor)
    parts = [vae.decode(latents[i:i + batch_size] / scale).sample.clamp(-1.0, 1.0)
             for i in range(0, latents.shape[0], batch_size)]
    return torch.cat(parts).float()


def vae_decoder(pipeline_dir: Path | str, device: str = "cpu"):
    """latents -> images in [-1, 1] through the pipeline's VAE on `device` (:func:`vae_decode` with it bound).

    Raises:
        ModelLoadError: as :func:`load_vae`.
    """
    from functools import partial

    return partial(vae_decode, load_vae(pipeline_dir)[0].to(device))


def load_text_encoder_model(pipeline_dir: Path | str):
    """The pipeline's CLIPTextModel (float32, eval mode).

    Raises:
        ModelLoadError: no text_encoder/ folder, another model class, or weights that do not load.
    """
    from transformers import CLIPTextModel
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # no load report or "Loading weights" bar: users cannot act on them
    transformers_logging.disable_progress_bar()
    folder, _ = part_config(pipeline_dir, "text_encoder", _TEXT_CLASSES, "architectures")
    try:
        model = CLIPTextModel.from_pretrained(str(folder), torch_dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for a broken folder
        raise ModelLoadError(f"cannot load the text encoder from {folder}: {_first_line(exc)}") from None
    return model.eval()


@dataclass
class TextEncoder:
    """A Stable Diffusion text encoder with its tokenizer: prompts -> ``encoder_hidden_states``."""

    model: torch.nn.Module
    tokenizer: object = field(repr=False)

    @torch.no_grad()
    def embed(self, prompts: Sequence[str]) -> torch.Tensor:
        """float32 [len(prompts), 77, width] on the CPU, as StableDiffusionPipeline.encode_prompt computes them."""
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        mask = ids.attention_mask.to(device) if getattr(self.model.config, "use_attention_mask", False) else None
        return self.model(ids.input_ids.to(device), attention_mask=mask)[0].float().cpu()


def load_text_encoder(pipeline_dir: Path | str) -> TextEncoder:
    """The pipeline's CLIP text encoder and tokenizer (transformers; the engines tokenise without torch).

    Raises:
        ModelLoadError: a missing or unreadable text_encoder/ or tokenizer/ folder.
    """
    from transformers import CLIPTokenizer

    model = load_text_encoder_model(pipeline_dir)
    folder = Path(pipeline_dir) / "tokenizer"
    try:
        tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the tokenizer from {folder}: {_first_line(exc)}; a Stable Diffusion "
                             "pipeline folder has tokenizer/ with vocab.json and merges.txt.") from None
    return TextEncoder(model=model, tokenizer=tokenizer)


@dataclass(frozen=True, eq=False)
class ClassTable:
    """Learned class embeddings fed to cross-attention: ``embeddings[c]`` is class c's ``encoder_hidden_states``.

    Attributes:
        embeddings: float32 [rows, tokens, width]; rows = num_classes (+ 1 with a null class).
        num_classes: the classes sampled, rows 0 .. num_classes - 1.
        null_class: the row of "no class" (guidance's unconditional half), or None.
        class_names: a name per class, for reports and sample metadata.
    """

    embeddings: torch.Tensor = field(repr=False)
    num_classes: int = 0
    null_class: int | None = None
    class_names: tuple[str, ...] = ()


def load_class_table(pipeline_dir: Path | str) -> ClassTable:
    """The pipeline's ``class_embeddings/`` table (module docstring).

    Raises:
        ModelLoadError: a missing or inconsistent config or weights file.
    """
    from safetensors.torch import load_file

    folder, config = part_config(pipeline_dir, CLASS_TABLE_FOLDER, ("ClassEmbeddingTable",), "_class_name")
    weights = folder / "embeddings.safetensors"
    try:
        embeddings = load_file(str(weights))["embeddings"].float()
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types
        raise ModelLoadError(f"cannot read the class embeddings {weights}: {_first_line(exc)}") from None
    classes, null = config.get("num_classes"), config.get("null_class")
    rows = int(embeddings.shape[0]) if embeddings.dim() == 3 else -1
    ok = (isinstance(classes, int) and classes >= 1 and (null is None or isinstance(null, int))
          and rows == classes + (null is not None) and (null is None or null == classes))
    if not ok:
        raise ModelLoadError(f"{folder}: num_classes {classes!r}, null_class {null!r} and embeddings of shape "
                             f"{list(embeddings.shape)} do not fit together; the table needs [num_classes (+1 null row, "
                             "the last), tokens, width].")
    if not bool(torch.isfinite(embeddings).all()):
        raise ModelLoadError(f"{weights} holds NaN or Inf; restore the table the model was trained with.")
    names = tuple(str(n) for n in config.get("class_names") or ())
    return ClassTable(embeddings=embeddings, num_classes=classes, null_class=null, class_names=names)
