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
- to come: prompt or class embeddings fed as ``encoder_hidden_states`` float32 [batch, tokens, width]
  (the cross-attention kind): one more :class:`ConditioningSpec` subclass with its
  :class:`SampleConditions`, and one registry entry.

The manifest entry (``conditioning`` in the ONNX manifest and in engine.json) is the spec's
:meth:`~ConditioningSpec.to_dict`, e.g. ``{"kind": "class", "num_classes": 10, "null_class": 10,
"guidance_scale": 2.0}``: ``guidance_scale`` is the scale the student was calibrated / distilled at,
and ``sample``'s default. An unconditional model has no entry.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .errors import ConfigError, ManifestError
from .graph_inputs import GraphInput
from .guidance import Guidance

__all__ = ["CONDITIONING_KINDS", "SAMPLE_OPTION_FLAGS", "ClassConditioningSpec", "ClassSampleConditions",
           "ConditioningSpec", "SampleConditions", "conditioning_from_dict", "sample_conditions"]

SAMPLE_OPTION_FLAGS: dict[str, str] = {"class_labels": "--class", "guidance_scale": "--guidance-scale"}
"""The keyword arguments of :func:`sample_conditions` and the ``sample`` flags that set them (messages)."""


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
    def sample_conditions(self, **choices: Any) -> SampleConditions:
        """The conditions of a sampling run with the user's choices (None: this manifest's defaults).

        Raises:
            ConfigError: a choice outside what the model takes.
        """

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


def _guidance(scale: float, can_guide: bool, what: str) -> Guidance:
    if not _real(scale) or not math.isfinite(scale) or scale < 1.0:
        raise ConfigError(f"--guidance-scale must be a finite number >= 1 (1 turns guidance off); got {scale!r}.")
    if scale > 1.0 and not can_guide:
        raise ConfigError(f"--guidance-scale {scale:g} needs the model's null class (the unconditional half of "
                          f"guidance), and {what} has none (it was compressed without --null-class): use "
                          "--guidance-scale 1.")
    return Guidance(float(scale))


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

    def sample_conditions(self, class_labels: Sequence[int] | None = None,
                          guidance_scale: float | None = None) -> ClassSampleConditions:
        """Labels cycled over the images (None: image i gets ``i % num_classes``) at ``guidance_scale``
        (None: the manifest's).

        Raises:
            ConfigError: an empty list, a label outside 0 .. num_classes - 1 (the null class included), a
                scale below 1, or a scale above 1 without a null class.
        """
        last = self.num_classes - 1
        if class_labels is None:
            labels = tuple(range(self.num_classes))
        else:
            labels = tuple(class_labels)
            if not labels:
                raise ConfigError(f"--class needs at least one label (0 .. {last}).")
            bad = [v for v in labels if not _label(v) or not 0 <= v <= last]
            if bad:
                null = (f"; {self.null_class} is the null class, which guidance uses itself"
                        if self.null_class in bad else "")
                raise ConfigError(f"--class labels must be classes of this model, 0 .. {last}; got {bad[0]!r}{null}.")
            labels = tuple(int(v) for v in labels)
        guidance = _guidance(self.guidance_scale if guidance_scale is None else guidance_scale, self.can_guide,
                             "this class-conditional engine")
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
        labels = self.labels.tolist()
        which = (f"class i mod {self.spec.num_classes}" if labels == list(range(self.spec.num_classes))
                 else f"class {labels[0]}" if len(labels) == 1 else f"classes {','.join(map(str, labels))} cycled")
        return f"{which}, guidance scale {self.guidance.scale:g}"


CONDITIONING_KINDS: dict[str, type[ConditioningSpec]] = {"class": ClassConditioningSpec}
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


def sample_conditions(spec: ConditioningSpec | None, **choices: Any) -> SampleConditions | None:
    """A sampling run's conditions for an engine's spec and the user's choices (those left None are defaults).

    Returns None for an unconditional engine (nothing to feed).

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
        raise ConfigError(f"{SAMPLE_OPTION_FLAGS[refused[0]]} does not apply to a {spec.kind}-conditional engine; "
                          "drop it.")
    return spec.sample_conditions(**given)
