"""What every conditioning kind of engines.conditioning shares: the spec and conditions templates, the checks.

A conditioning kind (engines.conditioning.CONDITIONING_KINDS) is a :class:`ConditioningSpec`, the manifest
entry that says which graph input the model takes and how ``sample`` fills it, and a
:class:`SampleConditions`, what one sampling run feeds image i. The kinds themselves live in
engines.conditioning (``class``) and engines.embedding_conditioning (``embedding``); this module holds
what they share, so neither imports the other.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

import numpy as np

from .errors import ConfigError, ManifestError
from .graph_inputs import GraphInput
from .guidance import Guidance

__all__ = ["ConditioningSpec", "EmbeddingSource", "SampleConditions"]


class EmbeddingSource(Protocol):
    """What an ``embedding`` kind reads its rows from: an engine's parts (engines.latent_parts.EngineParts)."""

    def embed_prompts(self, prompts: Sequence[str]) -> np.ndarray:
        """float32 [len(prompts), tokens, width]: the text encoder on the tokenised prompts."""

    def class_table(self) -> np.ndarray:
        """float32 [num_classes (+ 1 null row, the last), tokens, width]."""


def _real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _label(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


class SampleConditions(ABC):
    """What one sampling run feeds besides the noise: image i's condition, the unconditional one, the guidance.

    Attributes:
        input: the graph input the conditions go to.
        guidance: the scale of this run (1: one conditional call per step, no doubled batch).
    """

    input: GraphInput
    guidance: Guidance

    @abstractmethod
    def conditions(self, indices: np.ndarray) -> np.ndarray:
        """The conditions of the images with these indices (image i of a seeded run), batch first."""

    @abstractmethod
    def null(self, n: int) -> np.ndarray:
        """The unconditional conditions of ``n`` images (the other half of a guided batch)."""

    @abstractmethod
    def to_record(self) -> dict[str, Any]:
        """What ``sample`` writes into samples.json (and compares on --resume)."""

    @abstractmethod
    def describe(self) -> str:
        """A few words for ``sample``'s summary line, e.g. ``class i mod 10, guidance scale 2``."""

    def halves(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``(cond, uncond)`` of images ``indices``, what :meth:`Guidance.model_batch` takes each step;
        ``uncond`` is None at scale 1 (the model then runs on the conditional batch alone)."""
        return self.conditions(indices), self.null(len(indices)) if self.guidance.enabled else None


class ConditioningSpec(ABC):
    """A manifest's ``conditioning`` entry: the kind, its graph input, its default guidance scale.

    Subclasses are frozen dataclasses registered in :data:`CONDITIONING_KINDS` under :attr:`kind`.
    """

    kind: ClassVar[str]
    sample_options: ClassVar[tuple[str, ...]]
    """The :func:`sample_conditions` keywords this kind takes (the others are refused, naming their flag)."""
    required_parts: ClassVar[tuple[str, ...]] = ()
    """The part roles (engines.parts.PART_ROLES) a manifest with this conditioning must list."""
    guidance_scale: float

    @property
    @abstractmethod
    def input(self) -> GraphInput:
        """The graph input this kind adds after ``sample`` and ``timestep``."""

    @property
    @abstractmethod
    def can_guide(self) -> bool:
        """Whether the model has an unconditional branch, so sampling may double its batch to guide."""

    @abstractmethod
    def sample_conditions(self, parts: EmbeddingSource | None = None, **choices: Any) -> SampleConditions:
        """The conditions of a sampling run with the user's choices (None: this manifest's defaults).

        Args:
            parts: where the rows come from, for a kind that reads the engine's parts (``embedding``).

        Raises:
            ConfigError: a choice outside what the model takes.
        """

    def option_refusal(self, flag: str) -> str:
        """The line refusing a ``sample`` flag this kind does not take."""
        return f"{flag} does not apply to a {self.kind}-conditional engine; drop it."

    @abstractmethod
    def describe(self) -> str:
        """A few words for export's and build-engine's summary lines."""

    def to_dict(self) -> dict[str, Any]:
        """The manifest entry: ``{"kind": ..., <the dataclass fields>}``."""
        return {"kind": self.kind, **dataclasses.asdict(self)}  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConditioningSpec:
        """Build from a manifest entry (without ``kind``), refusing unknown and missing keys.

        Raises:
            ManifestError: one sentence (the manifest reader adds which file).
        """
        fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown, missing = sorted(set(data) - fields), sorted(fields - set(data))
        if unknown or missing:
            what = f"has unknown keys {unknown}" if unknown else f"lacks keys {missing}"
            raise ManifestError(f"the manifest's {cls.kind} conditioning {what}; it was written by a different "
                                "pqcad-deploy version: re-export the ONNX.")
        return cls(**data)


def _guidance(scale: float, can_guide: bool, missing_null: str) -> Guidance:
    """``Guidance(scale)`` after the user's checks; ``missing_null`` says what the model lacks (scale > 1)."""
    if not _real(scale) or not math.isfinite(scale) or scale < 1.0:
        raise ConfigError(f"--guidance-scale must be a finite number >= 1 (1 turns guidance off); got {scale!r}.")
    if scale > 1.0 and not can_guide:
        raise ConfigError(f"--guidance-scale {scale:g} needs {missing_null}: use --guidance-scale 1.")
    return Guidance(float(scale))


def _class_labels(class_labels: Sequence[int] | None, num_classes: int, null_class: int | None) -> tuple[int, ...]:
    """``--class``'s labels checked against classes 0 .. num_classes - 1 (None: every class in order).

    Raises:
        ConfigError: an empty list, or a label outside the classes (the null class included).
    """
    last = num_classes - 1
    if class_labels is None:
        return tuple(range(num_classes))
    labels = tuple(class_labels)
    if not labels:
        raise ConfigError(f"--class needs at least one label (0 .. {last}).")
    bad = [v for v in labels if not _label(v) or not 0 <= v <= last]
    if bad:
        null = f"; {null_class} is the null class, which guidance uses itself" if null_class in bad else ""
        raise ConfigError(f"--class labels must be classes of this model, 0 .. {last}; got {bad[0]!r}{null}.")
    return tuple(int(v) for v in labels)


def _labels_text(labels: Sequence[int], num_classes: int) -> str:
    """``class i mod 10``, ``class 3`` or ``classes 4,9 cycled`` (summary lines)."""
    labels = list(labels)
    if labels == list(range(num_classes)):
        return f"class i mod {num_classes}"
    return f"class {labels[0]}" if len(labels) == 1 else f"classes {','.join(map(str, labels))} cycled"
