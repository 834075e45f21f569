"""The conditioning kinds an engine's UNet takes beside (sample, timestep): one registry entry each.

Issue 17's conditional models carry their condition into the ONNX as one more graph input, batch
first like ``sample``, so classifier-free guidance runs the unconditional and conditional halves in one
call (engines/guidance.py). What that input is called, its dtype and shape, what the ONNX manifest
records, and what ``sample`` feeds image i are properties of the kind, so they live here, in
:data:`CONDITIONING_KINDS`, rather than as ``if kind ==`` branches in export, the manifests, the runners,
the checker, the TensorRT profile and the sampler: each of those asks the manifest's
:class:`ConditioningSpec`.

Kinds:

- ``class``: a class-conditional UNet2DModel (diffusers' ``num_class_embeds``), input ``class_labels``
  int64 [batch]. Image i gets class ``i % num_classes`` unless the user names labels (cycled over the
  images): the PyTorch stage's rule (pqcad_deploy.conditioning.class_labels_for), so the same seeds give
  the same images there and here. The unconditional half of guidance is the model's null class.
- ``embedding`` (engines.embedding_conditioning): a cross-attention UNet2DConditionModel (the Stable
  Diffusion code path), input ``encoder_hidden_states`` float32 [batch, tokens, width]. Its rows come
  from the engine's parts (engines.parts): for ``source`` "prompts" the CLIP text encoder ONNX on the
  tokenised prompts (image i gets prompt ``i % count``; no default: the user names the prompts), the
  empty prompt's embedding being the unconditional half; for ``source`` "class_embeddings" a lookup in
  the class table (image i gets class ``i % num_classes`` unless the user names labels), its null row
  the unconditional half. The PyTorch stage's rules (pqcad_deploy.conditioning.EmbeddingConditioning), so
  the same seeds give the same images there and here.

What the kinds share (the :class:`ConditioningSpec` and :class:`SampleConditions` templates, the label and
guidance checks) is engines.conditioning_base. The manifest entry (``conditioning`` in the ONNX manifest
and in engine.json) is the spec's :meth:`~ConditioningSpec.to_dict`, e.g. ``{"kind": "class", "num_classes": 10, "null_class": 10,
"guidance_scale": 2.0}`` or ``{"kind": "embedding", "source": "prompts", "tokens": 77, "width": 768,
"guidance_scale": 7.5, "has_null": true, "num_classes": null}``: ``guidance_scale`` is the scale the
student was calibrated / distilled at, and ``sample``'s default. An unconditional model has no entry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .conditioning_base import (ConditioningSpec, EmbeddingSource, SampleConditions, _class_labels, _guidance,
                                _label, _labels_text, _real)
from .embedding_conditioning import EMBEDDING_SOURCES, EmbeddingConditioningSpec, EmbeddingSampleConditions
from .errors import ConfigError, ManifestError
from .graph_inputs import GraphInput
from .guidance import Guidance

__all__ = ["CONDITIONING_KINDS", "EMBEDDING_SOURCES", "SAMPLE_OPTION_FLAGS", "ClassConditioningSpec",
           "ClassSampleConditions", "ConditioningSpec", "EmbeddingConditioningSpec", "EmbeddingSampleConditions",
           "EmbeddingSource", "SampleConditions", "conditioning_from_dict", "read_prompt_file", "sample_conditions"]

SAMPLE_OPTION_FLAGS: dict[str, str] = {"class_labels": "--class", "prompts": "--prompt",
                                       "guidance_scale": "--guidance-scale"}
"""The keyword arguments of :func:`sample_conditions` and the ``sample`` flags that set them (messages)."""


@dataclass(frozen=True)
class ClassConditioningSpec(ConditioningSpec):
    """A class-conditional UNet: ``class_labels`` int64 [batch] beside (sample, timestep).

    Attributes:
        num_classes: the classes sampled, labels 0 .. num_classes - 1.
        null_class: the label of "no class" (guidance's unconditional half; pqcad-deploy's convention is
            the last embedding row, num_classes), or None when the model has none (scale 1 only).
        guidance_scale: the scale the student was calibrated / distilled at; ``sample``'s default.

    Raises:
        ManifestError: values that do not fit together.
    """

    num_classes: int
    null_class: int | None
    guidance_scale: float
    kind: ClassVar[str] = "class"
    sample_options: ClassVar[tuple[str, ...]] = ("class_labels", "guidance_scale")

    def __post_init__(self) -> None:
        field = "Manifest field conditioning"
        if not _label(self.num_classes) or self.num_classes < 1:
            raise ManifestError(f"{field}.num_classes must be a positive integer, got {self.num_classes!r}.")
        null = self.null_class
        if null is not None and (not _label(null) or null < 0 or null < self.num_classes):
            raise ManifestError(f"{field}.null_class must be null or a label after the classes 0 .. "
                                f"{self.num_classes - 1}, got {null!r}.")
        scale = self.guidance_scale
        if not _real(scale) or not math.isfinite(scale) or scale < 1.0:
            raise ManifestError(f"{field}.guidance_scale must be a finite number >= 1, got {scale!r}.")
        if scale > 1.0 and self.null_class is None:
            raise ManifestError(f"{field}.guidance_scale {scale:g} needs a null_class (the "
                                "unconditional half of guidance); got null.")
        object.__setattr__(self, "guidance_scale", float(scale))

    @property
    def input(self) -> GraphInput:
        return GraphInput("class_labels", "int64")

    @property
    def can_guide(self) -> bool:
        return self.null_class is not None

    def describe(self) -> str:
        null = "no null class" if self.null_class is None else f"null class {self.null_class}"
        return f"class-conditional: {self.num_classes} classes, {null}, guidance scale {self.guidance_scale:g}"

    def sample_conditions(self, parts: EmbeddingSource | None = None, class_labels: Sequence[int] | None = None,
                          guidance_scale: float | None = None) -> ClassSampleConditions:
        """Labels cycled over the images (None: image i gets ``i % num_classes``) at ``guidance_scale``
        (None: the manifest's). ``parts`` is not read (the labels are the graph's input).

        Raises:
            ConfigError: an empty list, a label outside 0 .. num_classes - 1 (the null class included), a
                scale below 1, or a scale above 1 without a null class.
        """
        labels = _class_labels(class_labels, self.num_classes, self.null_class)
        guidance = _guidance(self.guidance_scale if guidance_scale is None else guidance_scale, self.can_guide,
                             "the model's null class (the unconditional half of guidance), and this "
                             "class-conditional engine has none (it was compressed without --null-class)")
        return ClassSampleConditions(self, labels, guidance)


class ClassSampleConditions(SampleConditions):
    """Image i gets ``labels[i % len(labels)]``; the unconditional half is the null class."""

    def __init__(self, spec: ClassConditioningSpec, labels: tuple[int, ...], guidance: Guidance) -> None:
        self.spec = spec
        self.labels = np.asarray(labels, dtype=np.int64)
        self.input = spec.input
        self.guidance = guidance

    def conditions(self, indices: np.ndarray) -> np.ndarray:
        return self.labels[np.asarray(indices, dtype=np.int64) % len(self.labels)]

    def null(self, n: int) -> np.ndarray:
        if self.spec.null_class is None:  # _guidance refused guiding without it
            raise ConfigError("this class-conditional engine has no null class, so it cannot guide.")
        return np.full((int(n),), self.spec.null_class, dtype=np.int64)

    def to_record(self) -> dict[str, Any]:
        return {"kind": self.spec.kind, "class_labels": self.labels.tolist(),
                "guidance_scale": self.guidance.scale, "null_class": self.spec.null_class}

    def describe(self) -> str:
        return f"{_labels_text(self.labels.tolist(), self.spec.num_classes)}, guidance scale {self.guidance.scale:g}"


CONDITIONING_KINDS: dict[str, type[ConditioningSpec]] = {"class": ClassConditioningSpec,
                                                         "embedding": EmbeddingConditioningSpec}
"""kind -> its spec class; the manifest's ``conditioning.kind`` must be one of these."""


def conditioning_from_dict(data: object) -> ConditioningSpec:
    """The spec of a manifest's ``conditioning`` entry.

    Raises:
        ManifestError: not an object, an unknown kind, or keys / values its kind refuses (one sentence;
            the manifest reader adds which file).
    """
    if not isinstance(data, dict):
        raise ManifestError(f"the manifest's conditioning must be a JSON object, got {data!r}.")
    kind = data.get("kind")
    if kind not in CONDITIONING_KINDS:
        raise ManifestError(f"the manifest's conditioning kind {kind!r} is not one this runtime reads "
                            f"({', '.join(CONDITIONING_KINDS)}); upgrade pqcad-deploy or re-export the ONNX.")
    return CONDITIONING_KINDS[kind].from_dict({k: v for k, v in data.items() if k != "kind"})


def sample_conditions(spec: ConditioningSpec | None, parts: EmbeddingSource | None = None,
                      **choices: Any) -> SampleConditions | None:
    """A sampling run's conditions for an engine's spec and the user's choices (those left None are defaults).

    ``parts``: the engine's parts (engines.latent_parts.EngineParts), which an ``embedding`` kind reads its
    rows from. Returns None for an unconditional engine (nothing to feed).

    Raises:
        ConfigError: a choice given for an unconditional engine, or one this kind does not take (one
            sentence naming the flag), or one its kind refuses.
    """
    given = {k: v for k, v in choices.items() if v is not None}
    unknown = sorted(set(given) - set(SAMPLE_OPTION_FLAGS))
    if unknown:
        raise TypeError(f"sample_conditions() got unexpected choices {unknown}")
    if spec is None:
        if given:
            flags = " and ".join(SAMPLE_OPTION_FLAGS[k] for k in given)
            verb, pronoun = ("apply", "them") if len(given) > 1 else ("applies", "it")
            raise ConfigError(f"{flags} {verb} to conditional engines; this engine's model is unconditional: drop "
                              f"{pronoun}.")
        return None
    refused = [k for k in given if k not in spec.sample_options]
    if refused:
        raise ConfigError(spec.option_refusal(SAMPLE_OPTION_FLAGS[refused[0]]))
    return spec.sample_conditions(parts, **given)


def read_prompt_file(path: str | Path) -> tuple[str, ...]:
    """``sample --prompt-file``: one prompt per line, blank lines and surrounding spaces dropped (the rule of
    compress's --prompt-file, pqcad_deploy.conditioning.read_prompt_file, without torch).

    Raises:
        ConfigError: a file that cannot be read as UTF-8 text, or holds no prompt.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the prompt file {path}: {exc}; pass a UTF-8 text file with one prompt "
                          "per line.") from None
    prompts = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not prompts:
        raise ConfigError(f"the prompt file {path} holds no prompt; write one prompt per line.")
    return prompts
