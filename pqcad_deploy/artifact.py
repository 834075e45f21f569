"""The compressed artifact: the single source for export (format in docs/CONTRACTS.md, section 1).

It holds the student's integer weight codes, per-channel weight scales, per-tensor activation
scales, bits per layer and every unquantized parameter (`student.safetensors`), the untouched FP
teacher (`teacher.safetensors`), the configs (the compress options among them: method, teacher
steps, distill), the student's exact timestep list, calibration settings and provenance
(`artifact.json`), and a report.

Same seed, same inputs: the same bytes in every file. So nothing time-dependent is stored: no
creation time in the provenance, and no wall-clock durations in the report (`seconds` entries of
the methods' and the distillation's reports are dropped on save; compress prints its time).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from pqcad_deploy.errors import ArtifactError
from pqcad_deploy.fsutil import atomic_output_dir
from pqcad_deploy.quant.replace import LayerBits, quant_layers, swap_in_quant_layers
from pqcad_deploy.quant.rewrites import restore_rewrites

__all__ = [
    "ARTIFACT_FORMAT",
    "ARTIFACT_VERSION",
    "DERIVED_FIELDS",
    "LayerRecord",
    "ArtifactManifest",
    "CompressedArtifact",
    "LayerTensors",
    "save_artifact",
    "load_artifact",
    "student_state_from_model",
    "artifact_digest",
]

ARTIFACT_FORMAT = "pqcad-artifact"
ARTIFACT_VERSION = 3
"""3: no field repeats a fact artifact.json already holds (`DERIVED_FIELDS`: method, teacher_steps,
distilled, prediction_type, student_steps are properties of the manifest now). 2: artifact.json
records the sha256 of every other file (`files`), and loading verifies them; no creation time in the
provenance (same seed, same inputs: the same bytes). Versions 1 and 2 are still read: their copies
are checked against what they copy once at load, then dropped; version 1 (no `files`) without the
per-file check."""
DERIVED_FIELDS: dict[str, str] = {
    "method": "options.method",
    "teacher_steps": "options.teacher_steps",
    "distilled": "options.distill",
    "prediction_type": "scheduler_config.prediction_type",
    "student_steps": "the length of student_timesteps",
}
"""Fields of artifact.json up to version 2 that copied another entry (named here, for the messages)."""
MANIFEST_FILE = "artifact.json"
STUDENT_FILE = "student.safetensors"
TEACHER_FILE = "teacher.safetensors"
REPORT_FILE = "report.json"
REPORT_PLOT_FILE = "report.png"  # loss curves and bit transitions (brecq / pqcad)


@dataclass(frozen=True)
class LayerRecord:
    """One quantized layer: its kind, bits and weight shape."""

    kind: str  # "conv2d" | "linear"
    weight_bits: int
    act_bits: int | None  # None: the input stays in floating point (no Q/DQ in the ONNX)
    weight_shape: list[int]


@dataclass(frozen=True)
class ArtifactManifest:
    """Everything in artifact.json; see docs/CONTRACTS.md.

    Each fact is stored once; the derived ones (:data:`DERIVED_FIELDS`) are properties, so a reader
    never meets two copies that disagree.
    """

    options: dict
    unet_class: str
    unet_config: dict
    scheduler_config: dict
    image_shape: list[int]
    student_timesteps: list[int]
    layers: dict[str, LayerRecord]
    calibration: dict
    provenance: dict
    files: dict[str, str] = field(default_factory=dict)  # file name -> sha256, every file but artifact.json
    format: str = ARTIFACT_FORMAT
    version: int = ARTIFACT_VERSION

    @property
    def method(self) -> str:
        """The compression method (the CompressConfig's, in `options`)."""
        return self.options["method"]

    @property
    def teacher_steps(self) -> int:
        """DDIM steps of the FP teacher (the CompressConfig's, in `options`)."""
        return self.options["teacher_steps"]

    @property
    def distilled(self) -> bool:
        """Whether compress ran CAD (`options.distill`; the guard may still have kept the PQ student)."""
        return self.options["distill"]

    @property
    def prediction_type(self) -> str:
        """What the UNet predicts: the scheduler config's, epsilon where it names none (diffusers' default)."""
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def student_steps(self) -> int:
        """The student's sampling steps: one per entry of `student_timesteps`."""
        return len(self.student_timesteps)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, indent=1)

    @classmethod
    def from_dict(cls, data: dict, where: Path) -> "ArtifactManifest":
        if data.get("format") != ARTIFACT_FORMAT:
            raise ArtifactError(f"{where} is not a pqcad-deploy artifact (format {data.get('format')!r}).")
        version = data.get("version")
        if not isinstance(version, int) or version > ARTIFACT_VERSION:
            raise ArtifactError(
                f"{where} has artifact version {version!r}; this pqcad-deploy reads up to "
                f"{ARTIFACT_VERSION}: upgrade pqcad-deploy."
            )
        if version >= 2:
            files = data.get("files")
            if (not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) and len(v) == 64
                                                       for k, v in files.items())
                    or not {STUDENT_FILE, TEACHER_FILE} <= files.keys()
                    or any(k != Path(k).name or k == MANIFEST_FILE for k in files)):
                raise ArtifactError(f"{where} has a malformed {MANIFEST_FILE}: its 'files' entry must map every file "
                                    f"of the artifact (at least {STUDENT_FILE} and {TEACHER_FILE}) to its sha256; "
                                    "recompress it.")
        elif "files" in data:
            raise ArtifactError(f"{where} has a malformed {MANIFEST_FILE} (version 1 has no 'files' entry).")
        data = dict(data)
        copies = {name: data.pop(name) for name in DERIVED_FIELDS if name in data} if version < 3 else {}
        try:
            layers = {k: LayerRecord(**v) for k, v in data["layers"].items()}
            manifest = cls(**{**data, "layers": layers})
            derived = {name: getattr(manifest, name) for name in DERIVED_FIELDS}
        except (KeyError, TypeError, AttributeError) as exc:
            raise ArtifactError(f"{where} has a malformed {MANIFEST_FILE} ({exc}).") from None
        _check_copies(where, version, copies, derived)
        return manifest


def _check_copies(where: Path, version: int, copies: dict, derived: dict) -> None:
    """The copies a version 1 or 2 artifact.json holds must equal what they copy.

    compress always wrote them equal, so a difference means the file was edited and which value
    the student was made with is unknown: refused rather than guessed.
    """
    for name, stored in copies.items():
        if stored != derived[name]:
            raise ArtifactError(f"{where} has an inconsistent {MANIFEST_FILE} (version {version}): {name} is "
                                f"{stored!r} but {DERIVED_FIELDS[name]} is {derived[name]!r}; the file was "
                                "edited after compress: recompress the artifact.")


def student_state_from_model(student: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The student.safetensors tensors of a quantized model: codes + scales, other params as they are."""
    qlayers = quant_layers(student)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in qlayers.items():
        stored = LayerTensors(weight_codes=layer.weight_codes().cpu().contiguous(),
                              weight_scale=layer.weight_quantizer.scale.detach().float().cpu().contiguous(),
                              act_scale=layer.input_quantizer.scale.detach().float().cpu().contiguous())
        tensors.update(stored.as_state(name))
    state = student.state_dict()
    for key in _plain_state_keys(student, qlayers):
        tensors[key] = state[key].detach().cpu().contiguous()
    return tensors


def _plain_state_keys(unet: torch.nn.Module, layers: dict) -> set[str]:
    """State-dict keys stored under their own name (all but quantized weights and quantizer state)."""
    keys = set()
    for key in unet.state_dict():
        owner, _, leaf = key.rpartition(".")
        if owner in layers and leaf == "weight":
            continue
        if owner.endswith((".weight_quantizer", ".input_quantizer")):
            continue
        keys.add(key)
    return keys


def _digest_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _recorded_files(path: Path) -> list[str]:
    """The files artifact.json records (version 2 on), sorted; [] for version 1 or an unreadable manifest."""
    try:
        data = json.loads((path / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return []
    files = data.get("files") if isinstance(data, dict) else None
    return sorted(files) if isinstance(files, dict) else []


def artifact_digest(path: Path) -> str:
    """sha256 identifying what an export was made from: artifact.json, then every file it records
    (version 2 on: student, teacher, report, plot; sorted by name). Version 1: artifact.json and
    student.safetensors, as it always was."""
    path = Path(path)
    files = _recorded_files(path) or [STUDENT_FILE]
    return _digest_files([path / MANIFEST_FILE, *(path / name for name in files)])


def _verify_files(path: Path, manifest: "ArtifactManifest") -> None:
    """Every file recorded in artifact.json exists and has its recorded sha256 (version 2 on)."""
    for name, expected in sorted(manifest.files.items()):
        f = path / name
        if not f.is_file():
            raise ArtifactError(f"{path} is incomplete: {name} is missing.")
        try:
            actual = _digest_files([f])
        except OSError as exc:
            raise ArtifactError(f"{f} cannot be read ({exc.strerror}); the artifact is corrupt.") from None
        if actual != expected:
            raise ArtifactError(
                f"{f} does not match the sha256 recorded in {MANIFEST_FILE} ({actual[:12]}... != {expected[:12]}...): "
                "the file was changed or replaced after compress; restore it or recompress the artifact.")


def _check_student_values(path: Path, manifest: "ArtifactManifest", tensors: dict[str, torch.Tensor]) -> None:
    """Scales finite and > 0, codes integers inside their layer's range, no NaN/Inf anywhere.

    Missing or unexpected tensors are left to build_student, which names them.
    """
    where = path / STUDENT_FILE
    for name, rec in sorted(manifest.layers.items()):
        for key in (f"{name}.weight_scale", f"{name}.act_scale"):
            scale = tensors.get(key)
            if scale is None:
                continue
            if not scale.is_floating_point() or scale.numel() == 0:
                raise ArtifactError(f"{where}: {key} must be a non-empty float tensor, got {scale.dtype}; "
                                    "the artifact is corrupt, recompress it.")
            bad = ~torch.isfinite(scale) | (scale <= 0)
            if bool(bad.any()):
                first = float(scale.flatten()[bad.flatten()][0])
                raise ArtifactError(f"{where}: {key} has {int(bad.sum())} scale(s) that are not finite and > 0 "
                                    f"(first: {first!r}); the artifact is corrupt, recompress it.")
        codes = tensors.get(f"{name}.weight_codes")
        if codes is None:
            continue
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ArtifactError(f"{where}: {name}.weight_codes must hold integers, got {codes.dtype}; "
                                "the artifact is corrupt, recompress it.")
        if not isinstance(rec.weight_bits, int) or rec.weight_bits not in (4, 6, 8):
            raise ArtifactError(f"{path / MANIFEST_FILE}: layer {name} has weight_bits {rec.weight_bits!r}, "
                                "not 8, 6 or 4; recompress the artifact.")
        qmax = 2 ** (rec.weight_bits - 1) - 1
        if codes.numel() and (int(codes.min()) < -qmax - 1 or int(codes.max()) > qmax):
            raise ArtifactError(f"{where}: {name}.weight_codes lie in [{int(codes.min())}, {int(codes.max())}], "
                                f"outside the {rec.weight_bits}-bit range [{-qmax - 1}, {qmax}]; the artifact is "
                                "corrupt, recompress it.")
    non_finite = sorted(k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if non_finite:
        raise ArtifactError(f"{where} holds NaN or Inf in {len(non_finite)} tensor(s) (first: {non_finite[0]}); "
                            "the artifact is corrupt, recompress it.")


TIMING_KEYS = frozenset({"seconds"})
"""Report keys holding wall-clock durations: not written (they would make two identical runs differ)."""


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def save_artifact(
    out: Path,
    manifest: ArtifactManifest,
    student_tensors: dict[str, torch.Tensor],
    teacher_state: dict[str, torch.Tensor],
    report: dict,
    overwrite: bool = False,
) -> Path:
    """Write the artifact directory atomically."""
    from safetensors.torch import save_file

    out = Path(out)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        save_file(student_tensors, str(tmp / STUDENT_FILE), metadata={"format": ARTIFACT_FORMAT})
        teacher = {k: v.detach().cpu().contiguous() for k, v in teacher_state.items()}
        save_file(teacher, str(tmp / TEACHER_FILE), metadata={"format": ARTIFACT_FORMAT})
        report = _without_timings(report)
        (tmp / REPORT_FILE).write_text(json.dumps(report, sort_keys=True, indent=1))
        from pqcad_deploy.report_plot import has_curves, plot_reconstruction_report

        written = [STUDENT_FILE, TEACHER_FILE, REPORT_FILE]
        if has_curves(report):
            plot_reconstruction_report(report, tmp / REPORT_PLOT_FILE)
            written.append(REPORT_PLOT_FILE)
        files = {name: _digest_files([tmp / name]) for name in sorted(written)}
        manifest = dataclasses.replace(manifest, files=files, version=ARTIFACT_VERSION)
        (tmp / MANIFEST_FILE).write_text(manifest.to_json())
    return out


@dataclass(frozen=True)
class LayerTensors:
    """One quantized layer's tensors as student.safetensors stores them (what export writes as is)."""

    weight_codes: torch.Tensor  # int8 container, the weight's shape
    weight_scale: torch.Tensor  # float32 [out_channels]
    act_scale: torch.Tensor  # float32 per-tensor scale; a placeholder 1.0 for a float input

    @staticmethod
    def keys(name: str) -> tuple[str, ...]:
        """The student.safetensors keys of layer `name`'s tensors, in field order."""
        return tuple(f"{name}.{f.name}" for f in fields(LayerTensors))

    def as_state(self, name: str) -> dict[str, torch.Tensor]:
        """These tensors under layer `name`'s student.safetensors keys."""
        return dict(zip(self.keys(name), (self.weight_codes, self.weight_scale, self.act_scale)))


ARTIFACT_UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
"""The diffusers UNets an artifact may hold (pixel-space, and a latent pipeline's cross-attention UNet)."""


@dataclass
class CompressedArtifact:
    """A loaded artifact: its manifest and tensors, and builders for the teacher and the student."""

    path: Path
    manifest: ArtifactManifest
    student_tensors: dict[str, torch.Tensor] = field(repr=False)
    report: dict = field(repr=False)

    def _empty_unet(self) -> torch.nn.Module:
        import diffusers

        if self.manifest.unet_class not in ARTIFACT_UNET_CLASSES:
            raise ArtifactError(f"{self.path} holds a {self.manifest.unet_class}; pqcad-deploy artifacts hold a "
                                f"{' or a '.join(ARTIFACT_UNET_CLASSES)}.")
        return getattr(diffusers, self.manifest.unet_class).from_config(self.manifest.unet_config).eval()

    def layer_tensors(self, name: str) -> LayerTensors:
        """The stored codes and scales of quantized layer `name` (validated when the artifact loaded)."""
        try:
            return LayerTensors(*(self.student_tensors[key] for key in LayerTensors.keys(name)))
        except KeyError as exc:
            raise ArtifactError(f"{self.path} lacks tensor {exc.args[0]}; the artifact is incomplete.") from None

    def build_teacher(self, like_student: bool = False) -> torch.nn.Module:
        """The untouched FP UNet the artifact was made from.

        `like_student`: with the student's float-equivalent rewrites (quant.rewrites) applied, so that
        its layers pair with the student's by name (analyze).
        """
        from safetensors.torch import load_file

        unet = self._empty_unet()
        try:
            state = load_file(str(self.path / TEACHER_FILE))
            unet.load_state_dict(state, strict=True)
        except Exception as exc:
            raise ArtifactError(f"cannot load the teacher weights of {self.path}: {exc}") from None
        if like_student:
            with torch.no_grad():
                restore_rewrites(unet, self.manifest.layers, multipliers=self.student_tensors)
        return unet

    def build_student(self) -> torch.nn.Module:
        """The fake-quant student, exactly as compressed: latent weights = dequantized codes."""
        unet = self._empty_unet()
        plan = {name: LayerBits(rec.weight_bits, rec.act_bits) for name, rec in self.manifest.layers.items()}
        try:
            restore_rewrites(unet, self.manifest.layers)
            swap_in_quant_layers(unet, plan)
        except (AttributeError, ValueError, IndexError) as exc:
            raise ArtifactError(f"{self.path}: the layer list does not match the UNet config ({exc}).") from None
        tensors = dict(self.student_tensors)
        with torch.no_grad():
            for name, layer in quant_layers(unet).items():
                stored = self.layer_tensors(name)
                for key in LayerTensors.keys(name):
                    del tensors[key]
                codes, scale, act_scale = stored.weight_codes, stored.weight_scale, stored.act_scale
                if tuple(codes.shape) != tuple(layer.weight.shape):
                    raise ArtifactError(f"{self.path}: {name} codes have shape {tuple(codes.shape)}, "
                                        f"the UNet expects {tuple(layer.weight.shape)}.")
                layer.weight_quantizer.set_scale(scale)
                layer.input_quantizer.set_scale(act_scale)
                layer.weight.copy_(codes.float() * scale.reshape((-1,) + (1,) * (codes.dim() - 1)))
            expected = _plain_state_keys(unet, self.manifest.layers)
            missing = sorted(expected - tensors.keys())
            unexpected = sorted(tensors.keys() - expected)
            if missing:
                raise ArtifactError(f"{self.path} lacks {len(missing)} parameters (first: {missing[0]}).")
            if unexpected:
                raise ArtifactError(f"{self.path} has unexpected tensors (first: {unexpected[0]}).")
            unet.load_state_dict(tensors, strict=False)
        return unet.eval()


def load_artifact(path: Path | str) -> CompressedArtifact:
    """Read and validate an artifact directory; every problem is one ArtifactError sentence."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"artifact {path} does not exist or is not a directory.")
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ArtifactError(f"{path} is not a pqcad-deploy artifact: {MANIFEST_FILE} is missing.")
    try:
        data = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{manifest_path} is not valid JSON ({exc}).") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{manifest_path} is not a JSON object.")
    manifest = ArtifactManifest.from_dict(data, path)
    for name in (STUDENT_FILE, TEACHER_FILE):
        if not (path / name).is_file():
            raise ArtifactError(f"{path} is incomplete: {name} is missing.")
    _verify_files(path, manifest)  # version 2 on: every file as compress wrote it
    try:
        tensors = load_file(str(path / STUDENT_FILE))
    except Exception as exc:
        raise ArtifactError(f"{path / STUDENT_FILE} cannot be read ({exc}); the artifact is corrupt.") from None
    _check_student_values(path, manifest, tensors)
    report = {}
    if (path / REPORT_FILE).is_file():
        try:
            report = json.loads((path / REPORT_FILE).read_text())
        except ValueError:
            report = {}
    return CompressedArtifact(path=path, manifest=manifest, student_tensors=tensors, report=report)
