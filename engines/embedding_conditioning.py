"""The ``embedding`` conditioning kind: a cross-attention UNet fed ``encoder_hidden_states`` (issue 17).

A latent pipeline's UNet2DConditionModel (the Stable Diffusion code path) takes ``encoder_hidden_states``
float32 [batch, tokens, width]. Where its rows come from is the manifest entry's ``source``:

- "prompts": the CLIP text encoder part on the tokenised prompts (engines.latent_parts: each distinct
  prompt once); image i gets prompt ``i % count``, and there is no default (the user names the prompts).
  The unconditional half of guidance is the empty prompt's embedding, embedded alone, as
  StableDiffusionPipeline.encode_prompt does.
- "class_embeddings": rows of the class table part (a learned [classes + null row, tokens, width] table,
  scripts/train_latent_reference.py's layout); image i gets class ``i % num_classes`` unless the user names labels,
  and the null row is the unconditional half.

These are the PyTorch stage's rules (pqcad_deploy.conditioning.EmbeddingConditioning), so the same seeds
give the same images there and here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import numpy as np

from .conditioning_base import (ConditioningSpec, EmbeddingSource, SampleConditions, _class_labels, _guidance,
                                _label, _labels_text, _real)
from .errors import ConfigError, ManifestError
from .graph_inputs import GraphInput
from .guidance import Guidance

__all__ = ["EMBEDDING_SOURCES", "EmbeddingConditioningSpec", "EmbeddingSampleConditions"]

EmbeddingSourceName = Literal["prompts", "class_embeddings"]
EMBEDDING_SOURCES: tuple[str, ...] = get_args(EmbeddingSourceName)
"""Where an embedding-conditioned model's rows come from: a text encoder on prompts, or a class table."""

_EMBEDDING_PARTS: dict[str, tuple[str, ...]] = {"prompts": ("text_encoder", "tokenizer"),
                                                "class_embeddings": ("class_table",)}
"""The parts each embedding source reads its rows from (engines.parts.PART_ROLES)."""
_TEXT_ENCODER_BATCH = 16
"""Prompts per text-encoder call (an SD prompt list of thousands stays within memory)."""


@dataclass(frozen=True)
class EmbeddingConditioningSpec(ConditioningSpec):
    """A cross-attention UNet: ``encoder_hidden_states`` float32 [batch, tokens, width] beside (sample, timestep).

    Attributes:
        source: "prompts" (a text encoder on the user's prompts; the empty prompt is the unconditional
            half) or "class_embeddings" (rows of a learned class table; its null row is the unconditional
            half).
        tokens, width: the embedding's shape after the batch (77 x 768 in SD 1.5).
        guidance_scale: the scale the student was calibrated / distilled at; ``sample``'s default.
        has_null: whether the model has an unconditional embedding (always, for prompts).
        num_classes: the class table's classes (rows 0 .. num_classes - 1), for source class_embeddings;
            None for prompts.

    Raises:
        ManifestError: values that do not fit together.
    """

    source: EmbeddingSourceName
    tokens: int
    width: int
    guidance_scale: float
    has_null: bool
    num_classes: int | None
    kind: ClassVar[str] = "embedding"

    def __post_init__(self) -> None:
        field = "Manifest field conditioning"
        if self.source not in EMBEDDING_SOURCES:
            raise ManifestError(f"{field}.source {self.source!r} is not one of {', '.join(EMBEDDING_SOURCES)}.")
        for name in ("tokens", "width"):
            value = getattr(self, name)
            if not _label(value) or value < 1:
                raise ManifestError(f"{field}.{name} must be a positive integer, got {value!r}.")
        if not isinstance(self.has_null, bool):
            raise ManifestError(f"{field}.has_null must be true or false, got {self.has_null!r}.")
        classes = self.num_classes
        if self.source == "class_embeddings" and (not _label(classes) or classes < 1):
            raise ManifestError(f"{field}.num_classes must be a positive integer for class embeddings, got "
                                f"{classes!r}.")
        if self.source == "prompts" and (classes is not None or not self.has_null):
            raise ManifestError(f"{field}: a prompt-conditioned model has no num_classes and always has a null "
                                f"(the empty prompt), got num_classes {classes!r}, has_null {self.has_null!r}.")
        scale = self.guidance_scale
        if not _real(scale) or not math.isfinite(scale) or scale < 1.0:
            raise ManifestError(f"{field}.guidance_scale must be a finite number >= 1, got {scale!r}.")
        if scale > 1.0 and not self.has_null:
            raise ManifestError(f"{field}.guidance_scale {scale:g} needs has_null true (the unconditional half of "
                                "guidance); got false.")
        object.__setattr__(self, "guidance_scale", float(scale))

    @property
    def sample_options(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("prompts" if self.source == "prompts" else "class_labels", "guidance_scale")

    @property
    def required_parts(self) -> tuple[str, ...]:  # type: ignore[override]
        return _EMBEDDING_PARTS[self.source]

    @property
    def input(self) -> GraphInput:
        return GraphInput("encoder_hidden_states", "float32", (self.tokens, self.width))

    @property
    def can_guide(self) -> bool:
        return self.has_null

    @property
    def engine_noun(self) -> str:
        return "text-conditional engine" if self.source == "prompts" else "class-embedding engine"

    def option_refusal(self, flag: str) -> str:
        if self.source == "prompts":
            return (f"{flag} does not apply to a text-conditional engine (its images are conditioned on prompts: "
                    "pass --prompt or --prompt-file); drop it.")
        return (f"{flag} does not apply to a class-embedding engine (its images are conditioned on its "
                f"{self.num_classes} classes: pass --class); drop it.")

    def describe(self) -> str:
        shape = f"{self.tokens} x {self.width}"
        if self.source == "prompts":
            return f"text-conditional: prompt embeddings {shape}, guidance scale {self.guidance_scale:g}"
        null = "a null row" if self.has_null else "no null row"
        return (f"class-embedding: {self.num_classes} classes of {shape} embeddings, {null}, guidance scale "
                f"{self.guidance_scale:g}")

    def sample_conditions(self, parts: EmbeddingSource | None = None, prompts: Sequence[str] | None = None,
                          class_labels: Sequence[int] | None = None,
                          guidance_scale: float | None = None) -> EmbeddingSampleConditions:
        """Rows cycled over the images at ``guidance_scale`` (None: the manifest's): the embeddings of
        ``prompts`` (one text-encoder run per distinct prompt, and the empty prompt's when guiding), or
        the class table's rows ``class_labels`` (None: image i gets class ``i % num_classes``).

        Raises:
            ConfigError: no prompts for a text-conditional engine, a prompt that is not text, a label outside
                the classes, a scale below 1, or a scale above 1 without a null row.
        """
        if parts is None:
            raise ConfigError(f"this {self.engine_noun} reads its conditions from the engine's parts; pass parts "
                              "(engines.latent_parts.EngineParts).")
        guidance = _guidance(self.guidance_scale if guidance_scale is None else guidance_scale, self.can_guide,
                             "the model's unconditional embedding (the null row of its class table, the "
                             "unconditional half of guidance), and this class-embedding engine has none")
        if self.source == "prompts":
            return self._prompt_conditions(parts, prompts, guidance)
        labels = _class_labels(class_labels, int(self.num_classes), self.num_classes if self.has_null else None)
        table = self._checked(parts.class_table(), int(self.num_classes) + self.has_null, "the class table")
        null = table[int(self.num_classes)] if self.has_null else None
        return EmbeddingSampleConditions(
            self, table[np.asarray(labels, dtype=np.int64)], null, guidance,
            record={"class_labels": list(labels)}, description=_labels_text(labels, int(self.num_classes)))

    def table_conditions(self, rows: np.ndarray, null: np.ndarray | None,
                         guidance_scale: float | None = None) -> EmbeddingSampleConditions:
        """Conditions from embeddings already computed (image i gets ``rows[i % len(rows)]``): what the
        converters' calibration uses with the rows PyTorch embedded for the artifact."""
        guidance = _guidance(self.guidance_scale if guidance_scale is None else guidance_scale,
                             self.can_guide and null is not None, "an unconditional embedding")
        rows = self._checked(rows, len(rows), "the rows")
        null_row = None if null is None else self._checked(np.asarray(null)[None], 1, "the null row")[0]
        return EmbeddingSampleConditions(self, rows, null_row, guidance, record={"rows": int(len(rows))},
                                         description=f"row i mod {len(rows)}")

    def _prompt_conditions(self, parts: EmbeddingSource, prompts: Sequence[str] | None,
                           guidance: Guidance) -> EmbeddingSampleConditions:
        if not prompts:
            raise ConfigError("this text-conditional engine samples from prompts: pass --prompt TEXT (repeatable) "
                              "or --prompt-file FILE (one prompt per line); image i gets prompt i mod count.")
        prompts = tuple(prompts)
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ConfigError(f"prompt {i} is a {type(prompt).__name__}, not text; pass prompts as strings.")
        distinct = list(dict.fromkeys(prompts))
        embedded = np.concatenate([self._checked(parts.embed_prompts(distinct[i:i + _TEXT_ENCODER_BATCH]),
                                                 len(distinct[i:i + _TEXT_ENCODER_BATCH]), "the text encoder's output")
                                   for i in range(0, len(distinct), _TEXT_ENCODER_BATCH)])
        rows = embedded[[distinct.index(p) for p in prompts]]
        # the empty prompt alone, as StableDiffusionPipeline (and the PyTorch stage) embed it
        null = self._checked(parts.embed_prompts([""]), 1, "the text encoder's output")[0] if guidance.enabled else None
        which = f"prompt {prompts[0]!r}" if len(prompts) == 1 else f"prompt i mod {len(prompts)}"
        return EmbeddingSampleConditions(self, rows, null, guidance, record={"prompts": list(prompts)},
                                         description=which)

    def _checked(self, rows: np.ndarray, count: int, what: str) -> np.ndarray:
        rows = np.asarray(rows)
        expected = (count, self.tokens, self.width)
        if rows.dtype != np.float32 or rows.shape != expected:
            raise ConfigError(f"{what} is {rows.dtype} {list(rows.shape)}, but this {self.engine_noun} takes "
                              f"float32 {list(expected)}; rebuild the engine from a fresh export.")
        if not np.isfinite(rows).all():
            raise ConfigError(f"{what} holds NaN or Inf; rebuild the engine from a fresh export.")
        return rows


class EmbeddingSampleConditions(SampleConditions):
    """Image i gets ``rows[i % len(rows)]`` (float32 [tokens, width]); the unconditional half is ``null``."""

    def __init__(self, spec: EmbeddingConditioningSpec, rows: np.ndarray, null: np.ndarray | None,
                 guidance: Guidance, record: dict[str, Any], description: str) -> None:
        self.spec = spec
        self.rows = np.ascontiguousarray(rows, dtype=np.float32)
        self.null_row = None if null is None else np.ascontiguousarray(null, dtype=np.float32)
        self.input = spec.input
        self.guidance = guidance
        self._record = record
        self._description = description

    def conditions(self, indices: np.ndarray) -> np.ndarray:
        return self.rows[np.asarray(indices, dtype=np.int64) % len(self.rows)]

    def null(self, n: int) -> np.ndarray:
        if self.null_row is None:  # _guidance refused guiding without it
            raise ConfigError(f"this {self.spec.engine_noun} has no unconditional embedding, so it cannot guide.")
        return np.broadcast_to(self.null_row, (int(n), *self.null_row.shape))

    def to_record(self) -> dict[str, Any]:
        return {"kind": self.spec.kind, "source": self.spec.source, **self._record,
                "guidance_scale": self.guidance.scale}

    def describe(self) -> str:
        return f"{self._description}, guidance scale {self.guidance.scale:g}"
