"""What a conditional UNet is called with besides (x, t), and classifier-free guidance in torch.

Issue 17's first conditional kind is the class-conditional pixel-space UNet2DModel (diffusers'
``num_class_embeds``: a label embedding added to the time embedding). Everything in the PyTorch stage
that runs the model (calibration trajectories, the reconstruction's captures, the checks that sample)
passes the conditioning as keyword arguments, ``unet(x, t, **cond)``, where ``cond`` holds per-sample
tensors with the batch first (``class_labels`` here; ``encoder_hidden_states`` for the text kind to come).
An unconditional model's ``cond`` is ``{}``, so its calls, and the weights of its artifacts, are what they
were (the artifact's options record ``guidance_scale`` 1 and ``null_class`` null beside the others).

Guidance is diffusers' (engines/guidance.py follows it line for line for the torch-free sampler): at a
scale w > 1 the model runs once on the unconditional copy of the batch and once on the conditional
copy, batched as [unconditional, conditional], and eps = eps_u + w (eps_c - eps_u); at w = 1 it runs on
the conditional batch alone. The unconditional label is the model's *null class*: the label it was
trained with for "no class" (DiT's convention: one embedding row more than there are classes, the last
one null). A model has one only if it was trained with label dropout, so guidance > 1 needs it named.

Which class image i gets is ``i % num_classes`` (every class equally often, as the issue's FID at
1,000 samples per class asks); the torch-free sampler is to use the same rule when `sample` takes these
models, so that the same seeds give the same images in PyTorch and in ONNX Runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pqcad_deploy.errors import ConfigError

__all__ = ["ClassConditioning", "Conditioning", "EmbeddingConditioning", "UNCONDITIONAL", "CONDITIONING_BUILDERS",
           "conditioning_for", "read_prompt_file", "class_labels_for", "conditioning_of",
           "conditions_on", "dry_run_conditions", "guided_eps", "select_rows", "concat_rows"]


@dataclass(frozen=True)
class Conditioning:
    """An unconditional model: nothing beside (x, t), no guidance."""

    kind = "unconditional"

    @property
    def guides(self) -> bool:
        return False

    def draw(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """The conditioning of samples with these indices (sample i of a seeded set: :func:`class_labels_for`)."""
        return {}

    def null(self, n: int) -> dict[str, torch.Tensor]:
        """The unconditional half of a guided batch of `n`."""
        return {}

    def to_dict(self) -> dict:
        return {"kind": self.kind}


UNCONDITIONAL = Conditioning()


@dataclass(frozen=True)
class ClassConditioning(Conditioning):
    """A class-conditional model: ``class_labels`` (int64 [batch]) beside (x, t).

    Attributes:
        num_classes: the labels sampled, 0 .. num_classes - 1.
        null_class: the label of "no class" (the unconditional half of guidance), or None when the
            model has none (then only guidance_scale 1 works).
        guidance_scale: w of eps_u + w (eps_c - eps_u); 1 is no guidance.
    """

    num_classes: int = 0
    null_class: int | None = None
    guidance_scale: float = 1.0
    kind = "class"

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ConfigError(f"a class-conditional model needs at least one class; got {self.num_classes}.")
        if self.guidance_scale > 1.0 and self.null_class is None:
            raise ConfigError(f"--guidance-scale {self.guidance_scale:g} needs the model's null class (the label it "
                              "was trained with for 'no class'): pass --null-class LABEL, or --guidance-scale 1.")

    @property
    def guides(self) -> bool:
        return self.guidance_scale > 1.0

    def draw(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"class_labels": class_labels_for(indices, self.num_classes)}

    def null(self, n: int) -> dict[str, torch.Tensor]:
        if self.null_class is None:
            raise ConfigError("this model has no null class, so it cannot run unconditionally: pass --null-class.")
        return {"class_labels": torch.full((n,), self.null_class, dtype=torch.int64)}

    def to_dict(self) -> dict:
        return {"kind": self.kind, "num_classes": self.num_classes, "null_class": self.null_class,
                "guidance_scale": self.guidance_scale}


@dataclass(frozen=True, eq=False)
class EmbeddingConditioning(Conditioning):
    """A cross-attention model: ``encoder_hidden_states`` (float32 [batch, tokens, width]) beside (x, t).

    The SD code path. Sample i is conditioned on row ``i % rows`` of `table`: the embedded prompts of a
    Stable Diffusion pipeline (one row per line of the user's prompt file), or a class-embedding table's
    class rows (row c = class c, so the class rule is :func:`class_labels_for`'s).

    Attributes:
        table: float32 [rows, tokens, width], on the CPU.
        null_embedding: float32 [tokens, width]: the empty prompt's embedding, or the table's null row;
            None when the model has none (then only guidance_scale 1 works).
        guidance_scale: w of eps_u + w (eps_c - eps_u); 1 is no guidance.
        source: where the rows come from: "prompts" or "class_embeddings".
        labels: a name per row (the prompts, or the class names), for reports.
    """

    table: torch.Tensor = None  # type: ignore[assignment]
    null_embedding: torch.Tensor | None = None
    guidance_scale: float = 1.0
    source: str = "prompts"
    labels: tuple[str, ...] = ()
    kind = "embedding"

    def __post_init__(self) -> None:
        if self.table is None or self.table.dim() != 3 or self.table.shape[0] < 1:
            raise ConfigError("a cross-attention model needs at least one condition embedding [tokens, width].")
        if self.guidance_scale > 1.0 and self.null_embedding is None:
            raise ConfigError(f"--guidance-scale {self.guidance_scale:g} needs the model's unconditional embedding "
                              "(a null class row): this model has none, so use --guidance-scale 1.")

    @property
    def guides(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def rows(self) -> int:
        return int(self.table.shape[0])

    def draw(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"encoder_hidden_states": self.table[indices.to(torch.int64) % self.rows].contiguous()}

    def null(self, n: int) -> dict[str, torch.Tensor]:
        if self.null_embedding is None:
            raise ConfigError("this model has no unconditional embedding, so it cannot run unconditionally.")
        return {"encoder_hidden_states": self.null_embedding.expand(n, *self.null_embedding.shape).contiguous()}

    def to_dict(self) -> dict:
        return {"kind": self.kind, "source": self.source, "rows": self.rows, "tokens": int(self.table.shape[1]),
                "width": int(self.table.shape[2]), "guidance_scale": self.guidance_scale,
                "has_null": self.null_embedding is not None, "labels": list(self.labels)}


def class_labels_for(indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Sample i's class: ``i % num_classes`` (int64), every class equally often over a run of samples."""
    return (indices.to(torch.int64) % num_classes).contiguous()


def conditioning_of(unet_config: dict, guidance_scale: float = 1.0, null_class: int | None = None) -> Conditioning:
    """The conditioning a UNet's config asks for, with the user's guidance settings.

    A UNet2DModel with ``num_class_embeds = E`` takes labels 0 .. E-1. With a null class given, the
    classes sampled are the other labels; the null class must be one of the E (the last, by DiT's
    convention). Without ``num_class_embeds`` the model is unconditional, and guidance options are
    an error rather than silently ignored.
    """
    embeds = unet_config.get("num_class_embeds")
    if embeds is None:
        if guidance_scale != 1.0 or null_class is not None:
            raise ConfigError("--guidance-scale and --null-class apply to conditional models; this model is "
                              "unconditional: drop them.")
        return UNCONDITIONAL
    embeds = int(embeds)
    if null_class is not None and not 0 <= null_class < embeds:
        raise ConfigError(f"--null-class must be one of the model's {embeds} labels (0 .. {embeds - 1}); "
                          f"got {null_class}.")
    if null_class is not None and null_class != embeds - 1:
        raise ConfigError(f"--null-class {null_class}: pqcad-deploy samples labels 0 .. N-1 and takes the null class "
                          f"to be the last label ({embeds - 1}, DiT's convention); a null class elsewhere is not "
                          "supported yet.")
    classes = embeds - 1 if null_class is not None else embeds
    return ClassConditioning(num_classes=classes, null_class=null_class, guidance_scale=float(guidance_scale))


def _pixel_conditioning(loaded, guidance_scale: float, null_class: int | None,
                        prompts: Sequence[str] | None) -> Conditioning:
    if prompts is not None:
        raise ConfigError("--prompt-file applies to text-conditional pipelines (Stable Diffusion); this model takes "
                          "no prompts: drop it.")
    return conditioning_of(dict(loaded.unet.config), guidance_scale, null_class)


def _class_table_conditioning(loaded, guidance_scale: float, null_class: int | None,
                              prompts: Sequence[str] | None) -> Conditioning:
    table = loaded.class_table
    if prompts is not None:
        raise ConfigError("--prompt-file applies to text-conditional pipelines; this model is conditioned on its "
                          f"{table.num_classes} classes (class_embeddings/): drop it.")
    if null_class is not None and null_class != table.null_class:
        raise ConfigError(f"--null-class {null_class}: this model's null class is {table.null_class} "
                          "(class_embeddings/config.json); drop --null-class.")
    null = None if table.null_class is None else table.embeddings[table.null_class]
    return EmbeddingConditioning(table=table.embeddings[:table.num_classes], null_embedding=null,
                                 guidance_scale=float(guidance_scale), source="class_embeddings",
                                 labels=table.class_names)


def _text_conditioning(loaded, guidance_scale: float, null_class: int | None,
                       prompts: Sequence[str] | None) -> Conditioning:
    if null_class is not None:
        raise ConfigError("--null-class applies to class-conditional models; a text-conditional pipeline's "
                          "unconditional half is the empty prompt: drop it.")
    if not prompts:
        raise ConfigError("a text-conditional pipeline is calibrated and distilled on prompts: pass --prompt-file "
                          "FILE (one prompt per line, the kind of prompts it will be sampled with).")
    encoder = loaded.text_encoder
    return EmbeddingConditioning(table=encoder.embed(prompts), null_embedding=encoder.embed([""])[0],
                                 guidance_scale=float(guidance_scale), source="prompts", labels=tuple(prompts))


CONDITIONING_BUILDERS: dict[str, Callable[..., Conditioning]] = {
    "unconditional-pixel": _pixel_conditioning,
    "class-conditional-pixel": _pixel_conditioning,
    "class-embedding-latent": _class_table_conditioning,
    "text-conditional-latent": _text_conditioning,
}
"""How each supported model kind (pqcad_deploy.model_kinds) is conditioned: (loaded model, guidance scale,
null class, prompts) -> Conditioning."""


def conditioning_for(loaded, guidance_scale: float = 1.0, null_class: int | None = None,
                     prompts: Sequence[str] | None = None) -> Conditioning:
    """The conditioning of a loaded model (pqcad_deploy.models.LoadedModel) with the user's settings.

    Raises:
        ConfigError: settings that do not apply to the model's kind (a prompt file for a class model, a
            null class for a text model, guidance without an unconditional half).
    """
    return CONDITIONING_BUILDERS[loaded.kind](loaded, guidance_scale, null_class, prompts)


def read_prompt_file(path: str | Path) -> tuple[str, ...]:
    """The prompts of a prompt file: one per line, blank lines and surrounding spaces dropped.

    The rule is the engines' (``sample --prompt-file`` reads the same files without torch); here its error
    is the PyTorch stage's.

    Raises:
        ConfigError: a file that cannot be read as UTF-8 text, or holds no prompt.
    """
    from pqcad_deploy.engines.conditioning import read_prompt_file as read_prompts
    from pqcad_deploy.engines.errors import ConfigError as EngineConfigError

    try:
        return read_prompts(path)
    except EngineConfigError as exc:
        raise ConfigError(str(exc)) from None


def dry_run_conditions(unet_config, n: int, device: torch.device | str) -> dict[str, torch.Tensor]:
    """Conditioning for a forward pass that only has to run (a load check, MAC counts, shapes): class 0, or
    one zero token of ``cross_attention_dim`` for a cross-attention UNet."""
    if unet_config.get("cross_attention_dim") is not None:
        width = unet_config["cross_attention_dim"]
        width = int(width[0] if isinstance(width, (list, tuple)) else width)
        return {"encoder_hidden_states": torch.zeros((n, 1, width), device=device)}
    if unet_config.get("num_class_embeds") is None:
        return {}
    return {"class_labels": torch.zeros((n,), dtype=torch.long, device=device)}


def conditions_on(cond: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """`cond` with every tensor on `device` (the model's keyword arguments for one batch)."""
    return {k: v.to(device) for k, v in cond.items()}


def select_rows(cond: dict[str, torch.Tensor], index: torch.Tensor | slice) -> dict[str, torch.Tensor]:
    """The rows `index` of every conditioning tensor (a batch of a calibration set)."""
    return {k: v[index] for k, v in cond.items()}


def concat_rows(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Rows of several conditioning dicts (same keys) one after another."""
    if not parts or not parts[0]:
        return {}
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def guided_eps(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
               conditioning: Conditioning) -> torch.Tensor:
    """The (guided) noise prediction diffusers' pipelines would use: one call at scale 1, else one call on
    [unconditional, conditional] and eps_u + w (eps_c - eps_u) (engines/guidance.py's arithmetic)."""
    device = x.device
    cond = conditions_on(cond, device)
    if not conditioning.guides:
        return unet(x, t, **cond).sample
    null = conditions_on(conditioning.null(x.shape[0]), device)
    both = {k: torch.cat([null[k], cond[k]]) for k in cond}
    eps_u, eps_c = unet(torch.cat([x, x]), torch.cat([t, t]), **both).sample.chunk(2)
    scale = conditioning.guidance_scale  # type: ignore[attr-defined]
    return eps_u + scale * (eps_c - eps_u)
