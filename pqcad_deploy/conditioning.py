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

from dataclasses import dataclass

import torch

from pqcad_deploy.errors import ConfigError

__all__ = ["ClassConditioning", "Conditioning", "UNCONDITIONAL", "class_labels_for", "conditioning_of",
           "conditional_artifact_refusal", "conditions_on", "dry_run_conditions", "guided_eps", "select_rows", "concat_rows"]


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


def dry_run_conditions(unet_config, n: int, device: torch.device | str) -> dict[str, torch.Tensor]:
    """Conditioning for a forward pass that only has to run (a load check, MAC counts, shapes): class 0."""
    if unet_config.get("num_class_embeds") is None:
        return {}
    return {"class_labels": torch.zeros((n,), dtype=torch.long, device=device)}


def conditional_artifact_refusal(unet_config: dict, artifact: object, verb: str) -> str | None:
    """The one line refusing `verb` on a conditional artifact until issue 17 wires it, else None."""
    if unet_config.get("num_class_embeds") is None:
        return None
    return (f"{artifact} is a class-conditional artifact; {verb} of class-conditional artifacts is not built yet "
            "(issue 17): compress takes them; export, analyze and sample do not yet.")


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
