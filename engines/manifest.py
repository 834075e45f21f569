"""The two manifests ``engines`` owns: our ONNX's metadata and the engine directory's ``engine.json``.

This module is the only contract between ``converters/`` (which writes the ONNX manifest) and
``engines/`` (which reads it), see docs/CONTRACTS.md sections 2 and 3. Both manifests are frozen
dataclasses serialised as sorted JSON with a ``format`` and a ``version``; readers refuse foreign
files, unknown formats, newer versions and unknown keys with one sentence, because a silently
misread manifest produces wrong images rather than an error.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from ._atomic import atomic_file
from .conditioning import ConditioningSpec, conditioning_from_dict
from .errors import EngineDirectoryError, ManifestError
from .graph_inputs import GraphInput
from .parts import PART_ROLES, PartFile, parts_from_json

__all__ = [
    "ONNX_FORMAT",
    "ONNX_VERSION",
    "V1_COPIES",
    "ENGINE_FORMAT",
    "ENGINE_VERSION",
    "ONNX_VERSION_IN_ENGINE",
    "METADATA_KEY",
    "ENGINE_MANIFEST_FILE",
    "INPUT_NAMES",
    "Precision",
    "PRECISIONS",
    "PredictionType",
    "PREDICTION_TYPES",
    "OUTPUT_NAMES",
    "Backend",
    "BACKENDS",
    "OrtProvider",
    "ORT_PROVIDERS",
    "output_name_for",
    "OnnxManifest",
    "TensorRTBuildInfo",
    "EngineManifest",
    "sha256_file",
    "read_onnx_manifest",
    "write_onnx_manifest",
    "read_engine_manifest",
    "write_engine_manifest",
    "verify_engine",
    "verify_parts",
    "QUANTIZED_OP_TYPES",
    "check_graph",
    "check_graph_file",
]

ONNX_FORMAT = "pqcad-onnx"
ONNX_VERSION = 2
"""2: no ``student_steps``, ``input_names``, ``output_name``: they copied ``len(student_timesteps)``,
:data:`INPUT_NAMES` and ``OUTPUT_NAMES[prediction_type]`` and are properties now (:data:`V1_COPIES`).
Version 1 is still read: its copies are checked once, then dropped."""
V1_COPIES: tuple[str, ...] = ("student_steps", "input_names", "output_name")
ENGINE_FORMAT = "pqcad-engine"
ENGINE_VERSION = 3
"""engine.json flattens the ONNX manifest, so it changes with it: 2 holds ONNX manifest version 2's
keys, 1 version 1's (still read). 3 holds version 2's keys plus, for a tensorrt engine, the required
``tensorrt`` object (:class:`TensorRTBuildInfo`: the TensorRT version and GPU that built the plan);
a tensorrt engine of version 1 or 2 has none and is still read (its plan cannot be checked before
TensorRT loads it)."""
ONNX_VERSION_IN_ENGINE: dict[int, int] = {1: 1, 2: 2, 3: 2}
METADATA_KEY = "pqcad.manifest"
ENGINE_MANIFEST_FILE = "engine.json"
INPUT_NAMES: tuple[str, str] = ("sample", "timestep")
"""The inputs every UNet ONNX of ours has; a conditional model's input follows them
(:attr:`OnnxManifest.input_names`, engines.conditioning)."""

Precision = Literal["w8a8", "w4a8", "w4a4", "fp32", "mixed"]
PRECISIONS: tuple[str, ...] = get_args(Precision)

PredictionType = Literal["epsilon", "sample", "v_prediction"]
PREDICTION_TYPES: tuple[str, ...] = get_args(PredictionType)
# The output name tells a reader of the graph what the network predicts, without the manifest.
OUTPUT_NAMES: dict[str, str] = {"epsilon": "noise_pred", "sample": "sample_pred", "v_prediction": "v_pred"}

Backend = Literal["onnxruntime", "tensorrt"]
BACKENDS: tuple[str, ...] = get_args(Backend)
OrtProvider = Literal["cpu", "cuda", "tensorrt"]
ORT_PROVIDERS: tuple[str, ...] = get_args(OrtProvider)
"""The ONNX Runtime execution provider an onnxruntime engine was built for (engine.json ``ort_provider``):
cpu (the CPU provider), cuda (CUDAExecutionProvider), tensorrt (ONNX Runtime's TensorrtExecutionProvider,
not the tensorrt backend). engines/ort_session.py maps them to ONNX Runtime's names."""


def output_name_for(prediction_type: str) -> str:
    """Return the graph output name for ``prediction_type`` (epsilon -> noise_pred, ...).

    Raises:
        ManifestError: unknown prediction type.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ManifestError(f"prediction_type {prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}.")
    return OUTPUT_NAMES[prediction_type]


def _choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ManifestError(f"Manifest field {name}={value!r} is not one of {', '.join(choices)}.")


def _bit_histogram(name: str, value: object) -> dict[str, int]:
    """Bit width ("8", "4"; "fp" for layers whose input stays in floating point) -> layer count."""
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and (k.isdigit() or k == "fp") and isinstance(v, int) and not isinstance(v, bool)
        and v >= 0 for k, v in value.items()
    ):
        raise ManifestError(f"Manifest field {name} must map bit widths like \"8\" (or \"fp\") to layer counts, "
                            f"got {value!r}.")
    return dict(sorted(value.items(), key=lambda kv: (not kv[0].isdigit(), int(kv[0]) if kv[0].isdigit() else 0)))


@dataclass(frozen=True)
class OnnxManifest:
    """What the runtime needs to know about our ONNX, stored in its ``pqcad.manifest`` metadata.

    Attributes:
        precision: the quantization recipe's name, for reports.
        image_shape: ``(C, H, W)`` of one sample; the batch dimension is dynamic.
        scheduler_config: a diffusers ``DDIMScheduler``-compatible config dict (read by ``ddim``).
        prediction_type: what the network predicts; fixes :attr:`output_name`.
        teacher_steps: steps of the FP teacher's sampler, for reports.
        student_timesteps: the descending timestep list the student was calibrated / distilled for.
        artifact_sha256: checksum of the compressed artifact the ONNX came from (provenance).
        weight_bits / act_bits: ``{"8": n_layers, "4": m_layers}`` histograms.
        conditioning: a conditional model's :class:`~engines.conditioning.ConditioningSpec` (its kind, its
            graph input after ``sample`` and ``timestep``, the default guidance scale); None for an
            unconditional model, whose JSON then has no ``conditioning`` key at all (so manifests written
            before conditioning existed read as unconditional, and unconditional ones are unchanged).
        parts: the files a latent model needs beside its UNet (engines.parts: the VAE decoder, and the text
            encoder + tokenizer or the class table its conditioning reads), relative to the ONNX's folder
            (in engine.json: to the engine directory), each with its sha256. Empty (no key) for a pixel model.
        decoded_image_shape: ``(C, H, W)`` of the images the VAE decoder part makes from latents of
            ``image_shape``; None (no key) for a pixel model, whose samples are the images.
    """

    precision: Precision
    image_shape: tuple[int, int, int]
    scheduler_config: dict[str, Any]
    prediction_type: PredictionType
    teacher_steps: int
    student_timesteps: tuple[int, ...]
    artifact_sha256: str
    weight_bits: dict[str, int] = field(default_factory=dict)
    act_bits: dict[str, int] = field(default_factory=dict)
    conditioning: ConditioningSpec | None = None
    parts: tuple[PartFile, ...] = ()
    decoded_image_shape: tuple[int, int, int] | None = None
    format: str = ONNX_FORMAT
    version: int = ONNX_VERSION

    def __post_init__(self) -> None:
        # Normalise JSON lists to tuples so equality and immutability hold after a round trip.
        def set_(name: str, value: object) -> None:
            object.__setattr__(self, name, value)  # the dataclass is frozen

        if self.format != ONNX_FORMAT:
            raise ManifestError(f"Manifest format {self.format!r} is not {ONNX_FORMAT!r}.")
        if self.version != ONNX_VERSION:
            raise ManifestError(f"Manifest version {self.version!r} is not supported (this runtime reads version {ONNX_VERSION}).")
        _choice("precision", self.precision, PRECISIONS)
        _choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        shape = tuple(self.image_shape) if isinstance(self.image_shape, (list, tuple)) else ()
        if len(shape) != 3 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            raise ManifestError(f"Manifest field image_shape must be three positive integers [C, H, W], got {self.image_shape!r}.")
        set_("image_shape", shape)
        if not isinstance(self.scheduler_config, dict):
            raise ManifestError(f"Manifest field scheduler_config must be a JSON object, got {type(self.scheduler_config).__name__}.")
        set_("scheduler_config", dict(self.scheduler_config))
        sched_pt = self.scheduler_config.get("prediction_type", self.prediction_type)
        if sched_pt != self.prediction_type:
            raise ManifestError(
                f"Manifest prediction_type {self.prediction_type!r} disagrees with scheduler_config's {sched_pt!r}; re-export the ONNX."
            )
        v = self.teacher_steps
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ManifestError(f"Manifest field teacher_steps must be a positive integer, got {v!r}.")
        ts = tuple(self.student_timesteps) if isinstance(self.student_timesteps, (list, tuple)) else None
        if not ts or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ts):
            raise ManifestError(f"Manifest field student_timesteps must be a non-empty list of non-negative integers, got {self.student_timesteps!r}.")
        if any(a <= b for a, b in zip(ts, ts[1:])):
            raise ManifestError(f"Manifest field student_timesteps must be strictly descending, got {list(ts)}.")
        n_train = self.scheduler_config.get("num_train_timesteps", 1000)
        if isinstance(n_train, int) and ts[0] >= n_train:
            raise ManifestError(f"Manifest student_timesteps start at {ts[0]}, beyond num_train_timesteps={n_train}.")
        set_("student_timesteps", ts)
        if not isinstance(self.artifact_sha256, str):
            raise ManifestError(f"Manifest field artifact_sha256 must be a string, got {self.artifact_sha256!r}.")
        set_("weight_bits", _bit_histogram("weight_bits", self.weight_bits))
        set_("act_bits", _bit_histogram("act_bits", self.act_bits))
        if self.conditioning is not None and not isinstance(self.conditioning, ConditioningSpec):  # from JSON
            set_("conditioning", conditioning_from_dict(self.conditioning))
        set_("parts", parts_from_json(self.parts))
        if self.decoded_image_shape is not None:
            decoded = tuple(self.decoded_image_shape) if isinstance(self.decoded_image_shape, (list, tuple)) else ()
            if len(decoded) != 3 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in decoded):
                raise ManifestError(f"Manifest field decoded_image_shape must be three positive integers [C, H, W] "
                                    f"or absent, got {self.decoded_image_shape!r}.")
            set_("decoded_image_shape", decoded)
        self._check_parts()

    def _check_parts(self) -> None:
        """The parts listed are exactly those the model needs: the VAE decoder with a decoded image shape,
        and what the conditioning reads (its ``required_parts``), each role with its required files."""
        needed = (("vae_decoder",) if self.decoded_image_shape is not None else ()) + (
            self.conditioning.required_parts if self.conditioning is not None else ())
        listed = {p.role for p in self.parts}
        missing, extra = [r for r in needed if r not in listed], sorted(listed - set(needed))
        if missing:
            why = "decoded_image_shape" if missing[0] == "vae_decoder" else f"its {self.conditioning.kind} conditioning"
            raise ManifestError(f"Manifest field parts lacks {PART_ROLES[missing[0]].what} ({missing[0]}), which "
                                f"{why} needs; re-export the ONNX.")
        if extra:
            raise ManifestError(f"Manifest field parts lists a {extra[0]} part this model does not use; re-export "
                                "the ONNX.")
        names = {p.name for p in self.parts}
        for role in sorted(listed):
            absent = [n for n in PART_ROLES[role].required if n not in names]
            if absent:
                raise ManifestError(f"Manifest field parts lacks {absent[0]} of the {role}; re-export the ONNX.")

    @property
    def student_steps(self) -> int:
        """The student's sampling steps: one per entry of ``student_timesteps``."""
        return len(self.student_timesteps)

    @property
    def output_image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images sampling writes: the decoded shape of a latent model, else image_shape."""
        return self.image_shape if self.decoded_image_shape is None else self.decoded_image_shape

    def part(self, name: str) -> PartFile | None:
        """The listed file whose role name is ``name`` (engines.parts, e.g. ``vae_decoder.onnx``), or None."""
        return next((p for p in self.parts if p.name == name), None)

    @property
    def graph_inputs(self) -> tuple[GraphInput, ...]:
        """The graph's inputs in order: ``sample`` float32 [batch, C, H, W], ``timestep`` float32 [batch],
        then the conditioning's input, if any (e.g. ``class_labels`` int64 [batch])."""
        base = (GraphInput("sample", "float32", self.image_shape), GraphInput("timestep", "float32"))
        return base if self.conditioning is None else (*base, self.conditioning.input)

    @property
    def input_names(self) -> tuple[str, ...]:
        """The graph's input names: :data:`INPUT_NAMES`, then the conditioning's input, if any."""
        return tuple(i.name for i in self.graph_inputs)

    @property
    def output_name(self) -> str:
        """The graph's output, named after what it predicts (:data:`OUTPUT_NAMES`)."""
        return OUTPUT_NAMES[self.prediction_type]

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        for k in ("image_shape", "student_timesteps"):
            d[k] = list(d[k])
        if self.conditioning is None:
            del d["conditioning"]
        else:
            d["conditioning"] = self.conditioning.to_dict()
        if self.parts:  # a pixel model's manifest has neither key (as before parts existed)
            d["parts"] = [p.to_dict() for p in self.parts]
        else:
            del d["parts"]
        if self.decoded_image_shape is None:
            del d["decoded_image_shape"]
        else:
            d["decoded_image_shape"] = list(self.decoded_image_shape)
        return d

    def to_json(self) -> str:
        """Serialise as sorted JSON (stable bytes, so checksums and diffs are meaningful)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: object, *, source: str = "manifest") -> OnnxManifest:
        """Build from a parsed JSON object, refusing other formats, newer versions and unknown keys.

        Raises:
            ManifestError: with ``source`` named in the message.
        """
        if not isinstance(data, dict):
            raise ManifestError(f"{source}: the manifest is not a JSON object.")
        fmt, version = data.get("format"), data.get("version")
        if fmt != ONNX_FORMAT:
            raise ManifestError(f"{source}: unknown manifest format {fmt!r} (expected {ONNX_FORMAT!r}); export it with pqcad-deploy export.")
        if not isinstance(version, int) or version > ONNX_VERSION:
            raise ManifestError(
                f"{source}: manifest version {version!r} is newer than this runtime reads ({ONNX_VERSION}); upgrade pqcad-deploy."
            )
        if version != 1:
            return _construct(cls, data, source)
        rest = {k: v for k, v in data.items() if k not in V1_COPIES}
        manifest = _construct(cls, {**rest, "version": ONNX_VERSION}, source)
        _check_v1_copies(manifest, data, source)
        return manifest

    @classmethod
    def from_json(cls, text: str, *, source: str = "manifest") -> OnnxManifest:
        """Parse :meth:`to_json` output.

        Raises:
            ManifestError: invalid JSON or invalid contents.
        """
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, TypeError) as exc:
            raise ManifestError(f"{source}: the manifest is not valid JSON ({exc}).") from exc
        return cls.from_dict(data, source=source)


def _check_v1_copies(manifest: OnnxManifest, data: dict[str, Any], source: str) -> None:
    """A version 1 manifest's copies (:data:`V1_COPIES`) must equal what they copy.

    export always wrote them equal, so a difference means the manifest was edited: which output
    name or step count the graph really has is then unknown, and it is refused rather than guessed.
    """
    def plain(value: object) -> object:  # JSON lists and our tuples compare alike
        return list(value) if isinstance(value, tuple) else value

    for name in V1_COPIES:
        if name in data and plain(data[name]) != plain(getattr(manifest, name)):
            raise ManifestError(f"{source}: the version 1 manifest's {name} is {data[name]!r}, but its other fields "
                                f"give {plain(getattr(manifest, name))!r}; the manifest was edited: re-export the ONNX "
                                "(or rebuild the engine).")


def _construct(cls: type, data: dict[str, Any], source: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    unknown = sorted(set(data) - names)
    missing = sorted(required - set(data))
    if unknown:
        raise ManifestError(f"{source}: unknown manifest keys {unknown}; it was written by a different pqcad-deploy version.")
    if missing:
        raise ManifestError(f"{source}: the manifest lacks required keys {missing}; re-export or rebuild it.")
    try:
        return cls(**data)
    except ManifestError as exc:
        raise ManifestError(f"{source}: {exc}") from exc


@dataclass(frozen=True)
class TensorRTBuildInfo:
    """Where a TensorRT plan was built: engine.json's ``tensorrt`` object (tensorrt engines, version 3).

    A plan runs only with the TensorRT version and on the GPU model that built it; recording both lets
    the runner refuse a copied plan with one sentence before TensorRT tries to load it.

    Attributes:
        tensorrt_version: ``tensorrt.__version__`` of the build, e.g. "10.3.0".
        gpu_name: the CUDA device name of the build, e.g. "Orin".
        compute_capability: "major.minor" of that device, e.g. "8.7" (Jetson Orin).
        trtexec_command: the trtexec command line that builds the same plan (printed by build-engine).
    """

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    trtexec_command: str

    def __post_init__(self) -> None:
        for name in ("tensorrt_version", "gpu_name", "trtexec_command"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ManifestError(f"Engine manifest field tensorrt.{name} must be a non-empty string, got {value!r}.")
        cc = self.compute_capability
        if not isinstance(cc, str) or not re.fullmatch(r"[0-9]+\.[0-9]+", cc):
            raise ManifestError(f"Engine manifest field tensorrt.compute_capability must be \"major.minor\" like "
                                f"\"8.7\", got {cc!r}.")

    def to_dict(self) -> dict[str, str]:
        """Return the JSON-ready dict (engine.json's ``tensorrt`` object)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: object, *, source: str) -> TensorRTBuildInfo:
        """Build from engine.json's ``tensorrt`` object, refusing unknown and missing keys.

        Raises:
            ManifestError: with ``source`` named in the message.
        """
        if not isinstance(data, dict):
            raise ManifestError(f"{source}: the engine manifest's tensorrt entry is not a JSON object; rebuild the engine.")
        return _construct(cls, data, source)


@dataclass(frozen=True)
class EngineManifest:
    """``engine.json``: which backend, which model file, its checksum, and the ONNX manifest.

    On disk the ONNX manifest's keys are flattened next to the engine keys (docs/CONTRACTS.md 3);
    the ONNX manifest's own ``format``/``version`` are implied by the engine version
    (:data:`ONNX_VERSION_IN_ENGINE`).

    ``ort_provider`` (onnxruntime engines only, one of :data:`ORT_PROVIDERS`) is the execution provider
    the engine was built for, so ``sample`` runs it there; an engine.json written before it existed was
    built for the CPU and reads as "cpu". It is an optional key, not a new engine version, so such old
    files stay readable; it is written only for onnxruntime engines.

    ``tensorrt`` (tensorrt engines only, :class:`TensorRTBuildInfo`) records the TensorRT version and GPU
    that built the plan; required from engine version 3 on, None for a tensorrt engine of version 1 or 2.
    """

    backend: Backend
    model_file: str
    model_sha256: str
    source_onnx_sha256: str
    onnx: OnnxManifest
    ort_provider: OrtProvider | None = None
    tensorrt: TensorRTBuildInfo | None = None
    format: str = ENGINE_FORMAT
    version: int = ENGINE_VERSION

    def __post_init__(self) -> None:
        if self.format != ENGINE_FORMAT:
            raise ManifestError(f"Engine manifest format {self.format!r} is not {ENGINE_FORMAT!r}.")
        if self.version != ENGINE_VERSION:
            raise ManifestError(f"Engine manifest version {self.version!r} is not supported (this runtime reads version {ENGINE_VERSION}).")
        _choice("backend", self.backend, BACKENDS)
        if not isinstance(self.model_file, str) or not self.model_file or Path(self.model_file).name != self.model_file:
            raise ManifestError(f"Engine manifest model_file must be a plain file name inside the engine directory, got {self.model_file!r}.")
        for name in ("model_sha256", "source_onnx_sha256"):
            v = getattr(self, name)
            if not isinstance(v, str) or len(v) != 64:
                raise ManifestError(f"Engine manifest field {name} must be a 64-character sha256 hex digest, got {v!r}.")
        if not isinstance(self.onnx, OnnxManifest):
            raise ManifestError("Engine manifest field onnx must be an OnnxManifest.")
        if self.backend == "onnxruntime":
            if self.ort_provider is None:  # built before build-engine had --provider: the CPU provider
                object.__setattr__(self, "ort_provider", "cpu")
            _choice("ort_provider", self.ort_provider, ORT_PROVIDERS)
        elif self.ort_provider is not None:
            raise ManifestError(f"Engine manifest field ort_provider={self.ort_provider!r} belongs to backend "
                                f"onnxruntime, not {self.backend!r}; rebuild the engine.")
        if self.tensorrt is not None and (self.backend != "tensorrt" or not isinstance(self.tensorrt, TensorRTBuildInfo)):
            raise ManifestError(f"Engine manifest field tensorrt belongs to backend tensorrt (a TensorRTBuildInfo), "
                                f"not {self.backend!r}; rebuild the engine.")

    def to_dict(self) -> dict[str, Any]:
        """Return the flat JSON-ready dict described in docs/CONTRACTS.md section 3."""
        d = self.onnx.to_dict()
        d.update(format=self.format, version=self.version, backend=self.backend, model_file=self.model_file,
                 model_sha256=self.model_sha256, source_onnx_sha256=self.source_onnx_sha256)
        if self.ort_provider is not None:
            d["ort_provider"] = self.ort_provider
        if self.tensorrt is not None:
            d["tensorrt"] = self.tensorrt.to_dict()
        return d

    def to_json(self) -> str:
        """Serialise as sorted, indented JSON (people read engine.json)."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: str = ENGINE_MANIFEST_FILE) -> EngineManifest:
        """Parse :meth:`to_json` output, refusing other formats, newer versions and unknown keys.

        Raises:
            ManifestError: with ``source`` named in the message.
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{source} is not valid JSON ({exc}); rebuild the engine.") from exc
        if not isinstance(data, dict):
            raise ManifestError(f"{source} is not a JSON object; rebuild the engine.")
        fmt, version = data.pop("format", None), data.pop("version", None)
        if fmt != ENGINE_FORMAT:
            raise ManifestError(f"{source}: unknown engine format {fmt!r} (expected {ENGINE_FORMAT!r}); build it with pqcad-deploy build-engine.")
        if not isinstance(version, int) or version > ENGINE_VERSION:
            raise ManifestError(f"{source}: engine version {version!r} is newer than this runtime reads ({ENGINE_VERSION}); upgrade pqcad-deploy.")
        engine_keys = ("backend", "model_file", "model_sha256", "source_onnx_sha256")
        missing = [k for k in engine_keys if k not in data]
        if missing:
            raise ManifestError(f"{source}: the engine manifest lacks required keys {missing}; rebuild the engine.")
        engine = {k: data.pop(k) for k in engine_keys}
        engine.update({k: data.pop(k) for k in ("ort_provider",) if k in data})  # optional engine keys
        if version >= 3 and engine["backend"] == "tensorrt":  # versions 1 and 2 had no tensorrt object
            if "tensorrt" not in data:
                raise ManifestError(f"{source}: the tensorrt engine manifest lacks its tensorrt object (the TensorRT "
                                    "version and GPU that built the plan); rebuild the engine.")
            engine["tensorrt"] = TensorRTBuildInfo.from_dict(data.pop("tensorrt"), source=source)
        onnx_version = ONNX_VERSION_IN_ENGINE.get(version, version)  # one below 1 is refused there
        onnx = OnnxManifest.from_dict({**data, "format": ONNX_FORMAT, "version": onnx_version}, source=source)
        try:
            return cls(onnx=onnx, **engine)
        except ManifestError as exc:
            raise ManifestError(f"{source}: {exc}") from exc


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Return the hex sha256 of a file, streamed so multi-GB models do not fill memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def read_onnx_manifest(path: str | os.PathLike[str]) -> OnnxManifest:
    """Read the ``pqcad.manifest`` metadata of an ONNX file without loading external weights.

    Raises:
        ManifestError: missing or unreadable file, an ONNX not written by ``pqcad-deploy export``,
            an unknown format or a newer version.
    """
    import onnx  # a core dependency; imported here to keep `engines` import light

    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path} does not exist or is not a file; pass the ONNX written by pqcad-deploy export.")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError, OSError, ...
        raise ManifestError(f"{path} is not a readable ONNX file ({type(exc).__name__}: {exc}); re-export it with pqcad-deploy export.") from exc
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise ManifestError(f"{path} is not an ONNX written by pqcad-deploy export (no {METADATA_KEY} metadata).")
    return OnnxManifest.from_json(props[METADATA_KEY], source=str(path))


def write_onnx_manifest(model_proto: Any, manifest: OnnxManifest) -> Any:
    """Attach (or replace) ``manifest`` as the model's ``pqcad.manifest`` metadata; returns the proto."""
    for i, prop in enumerate(model_proto.metadata_props):
        if prop.key == METADATA_KEY:
            del model_proto.metadata_props[i]
            break
    entry = model_proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, manifest.to_json()
    return model_proto


def read_engine_manifest(engine_dir: str | os.PathLike[str]) -> EngineManifest:
    """Read ``engine_dir/engine.json`` (no checksum check; see :func:`verify_engine`).

    Raises:
        EngineDirectoryError: the directory or its engine.json is missing.
        ManifestError: engine.json is invalid, foreign or too new.
    """
    engine_dir = Path(engine_dir)
    if not engine_dir.is_dir():
        raise EngineDirectoryError(f"{engine_dir} is not a directory; pass an engine directory written by pqcad-deploy build-engine.")
    path = engine_dir / ENGINE_MANIFEST_FILE
    if not path.is_file():
        raise EngineDirectoryError(f"{engine_dir} has no {ENGINE_MANIFEST_FILE}; it is not an engine built by pqcad-deploy build-engine (rebuild it).")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path} cannot be read ({exc}); rebuild the engine.") from exc
    return EngineManifest.from_json(text, source=str(path))


def write_engine_manifest(engine_dir: str | os.PathLike[str], manifest: EngineManifest) -> Path:
    """Write ``engine_dir/engine.json`` atomically and return its path.

    Raises:
        OutputError: the directory is not writable.
    """
    path = Path(engine_dir) / ENGINE_MANIFEST_FILE
    with atomic_file(path) as tmp:
        tmp.write_text(manifest.to_json(), encoding="utf-8")
    return path


QUANTIZED_OP_TYPES: frozenset[str] = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger",
    "QLinearConv", "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm", "QLinearAdd",
    "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearConcat", "QLinearAveragePool",
    "QLinearGlobalAveragePool", "QAttention",
})
"""Node types that only a quantized graph holds: export's Q/DQ pairs, its ort-x86 / ort-qlinear
lowerings, and what ONNX Runtime fuses them into when it optimizes an engine's model."""


def _static_dims(value_info: Any) -> list[int | None]:
    """The dims of a graph input/output (None where symbolic or unknown); [] when it has no shape."""
    t = value_info.type
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else None for d in t.tensor_type.shape.dim]


def _elem_dtype(value_info: Any) -> Any:
    """The numpy dtype a graph input declares, or None when it declares no tensor type."""
    from onnx import helper

    t = value_info.type
    if not t.HasField("tensor_type") or not t.tensor_type.elem_type:
        return None
    return helper.tensor_dtype_to_np_dtype(t.tensor_type.elem_type)


def check_graph(model: Any, manifest: OnnxManifest, source: str, *, what: str = "its manifest") -> None:
    """Check what a manifest claims about a graph against the graph itself.

    The input names and dtypes (a conditional model's input included), the static C/H/W of ``sample``
    against ``image_shape``, the output name, and the precision: a quantized precision (w8a8, w4a8,
    w4a4, mixed) needs Q/DQ or integer nodes (:data:`QUANTIZED_OP_TYPES`), fp32 must have none. A manifest that lies would sample with the
    wrong shapes (a traceback deep in the runtime) or report a precision the engine does not have.

    Raises:
        ManifestError: one sentence naming ``source``, the claim and what the graph has.
    """
    graph = model.graph
    initializers = {i.name for i in graph.initializer}
    inputs = {i.name: i for i in graph.input if i.name not in initializers}
    outputs = [o.name for o in graph.output]
    if sorted(inputs) != sorted(manifest.input_names):
        raise ManifestError(f"{source}: the graph's inputs are {sorted(inputs)}, but {what} promises "
                            f"{list(manifest.input_names)}; re-export the ONNX with pqcad-deploy export.")
    if manifest.output_name not in outputs:
        raise ManifestError(f"{source}: the graph's outputs are {outputs}, but {what} promises "
                            f"{manifest.output_name!r}; re-export the ONNX with pqcad-deploy export.")
    for expected in manifest.graph_inputs:  # e.g. class_labels must be int64, as the sampler feeds it
        declared = _elem_dtype(inputs[expected.name])
        if declared is not None and declared != expected.np_dtype:
            raise ManifestError(f"{source}: the graph's {expected.name!r} input is {declared}, but {what} promises "
                                f"{expected.dtype} {expected.shape_text()}; re-export the ONNX with pqcad-deploy export.")
    dims = _static_dims(inputs["sample"])
    if dims:
        claimed = list(manifest.image_shape)
        if len(dims) != 4 or any(d is not None and d != c for d, c in zip(dims[1:], claimed)):
            shown = "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
            raise ManifestError(f"{source}: the graph's 'sample' input has shape {shown}, but {what} claims "
                                f"image_shape {claimed} ([batch, C, H, W] = [?, {', '.join(map(str, claimed))}]); "
                                "the manifest was edited or belongs to another model: rebuild it.")
    quantized = sorted({n.op_type for n in graph.node if n.op_type in QUANTIZED_OP_TYPES})
    if manifest.precision == "fp32" and quantized:
        raise ManifestError(f"{source}: {what} claims precision fp32, but the graph holds quantized nodes "
                            f"({', '.join(quantized)}); the manifest was edited or belongs to another model: "
                            "re-export or rebuild it.")
    if manifest.precision != "fp32" and not quantized:
        raise ManifestError(f"{source}: {what} claims precision {manifest.precision}, but the graph has no "
                            "QuantizeLinear / DequantizeLinear or integer nodes (it is a float graph); the "
                            "manifest was edited or belongs to another model: re-export or rebuild it.")


def check_graph_file(path: str | os.PathLike[str], manifest: OnnxManifest, *, what: str = "its manifest") -> None:
    """:func:`check_graph` on an ONNX file (external weights are not read)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # DecodeError, OSError, ...
        raise ManifestError(f"{path} is not a readable ONNX file ({type(exc).__name__}: {exc}); rebuild it.") from exc
    check_graph(model, manifest, str(path), what=what)


def verify_engine(engine_dir: str | os.PathLike[str]) -> EngineManifest:
    """Check that an engine directory is complete and unmodified; return its manifest.

    Sampling from an edited or half-copied engine would give silently wrong images, so ``sample``
    calls this first.

    The model's checksum is checked first, then (ONNX Runtime engines) what engine.json claims
    about it (:func:`check_graph`): engine.json itself is not checksummed, so an edited image_shape
    or precision is caught here instead of as a shape error inside the runtime. Then every part a
    latent engine lists (engines.parts), against its checksum.

    Raises:
        EngineDirectoryError: missing directory, engine.json or model file, or a checksum mismatch.
        ManifestError: engine.json is invalid, foreign, too new, or disagrees with the model's graph.
    """
    manifest = read_engine_manifest(engine_dir)
    model = Path(engine_dir) / manifest.model_file
    if not model.is_file():
        raise EngineDirectoryError(f"{model} is missing; the engine directory is incomplete, rebuild it with pqcad-deploy build-engine.")
    actual = sha256_file(model)
    if actual != manifest.model_sha256:
        raise EngineDirectoryError(
            f"{model} does not match the checksum in {ENGINE_MANIFEST_FILE} (sha256 {actual[:12]}... != {manifest.model_sha256[:12]}...); "
            "the engine was modified or copied incompletely, rebuild it with pqcad-deploy build-engine."
        )
    if manifest.backend == "onnxruntime":  # a TensorRT plan is not a graph we can read here
        check_graph_file(model, manifest.onnx, what=ENGINE_MANIFEST_FILE)
    verify_parts(engine_dir, manifest.onnx.parts, remedy="rebuild it with pqcad-deploy build-engine")
    return manifest


def verify_parts(folder: str | os.PathLike[str], parts: tuple[PartFile, ...], *, remedy: str) -> None:
    """Check that every listed part is in ``folder`` with its recorded sha256 (engines.parts).

    Raises:
        EngineDirectoryError: a part is missing or differs, with ``remedy`` (what to do) in the message.
    """
    for part in parts:
        path = Path(folder) / part.file
        if not path.is_file():
            raise EngineDirectoryError(f"{path} ({PART_ROLES[part.role].what}) is missing; {remedy}.")
        actual = sha256_file(path)
        if actual != part.sha256:
            raise EngineDirectoryError(f"{path} does not match its recorded checksum (sha256 {actual[:12]}... != "
                                       f"{part.sha256[:12]}...); it was modified or copied incompletely: {remedy}.")

