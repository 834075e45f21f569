"""Per-block checkpoints of `compress` (brecq, pqcad), so that `--resume` continues an interrupted run.

A brecq or pqcad run saves a checkpoint after every finished block of every stage (the weight stage,
then the activation stage) in a directory next to the artifact, ``<out>.checkpoint/``:

```
OUT.checkpoint/
  checkpoint.json                      manifest (sorted JSON, written last): format, version, the run's
                                       fingerprint, the stage and blocks done, the method's report
                                       entries so far, per-layer state outside the state dict, and
                                       the names and sha256 of the two tensor files
  calibration.safetensors              the calibration set (x, t) of the run, reused on resume
  student-<stage>-<NNNN>.safetensors   the student's state dict after the last finished block
                                       ("state/<key>") and torch's CPU RNG state ("rng/torch_cpu")
  distill.json                         CAD (pqcad_deploy.distill.cad), written every few hundred
  distill-<NNNNNN>.safetensors         iterations: the fingerprint, the iteration, and one tensor
                                       holding CAD's resumable state (student, Adam, batch generator,
                                       losses; torch.save bytes, loaded with weights_only=True)
```

The distillation files sit beside the quantization checkpoint, which keeps the end of quantization:
a resumed run restores that, redoes the deterministic steps between the two (the activation-scale
check and the report), and continues CAD from its own state.

Why it gives the same artifact as an uninterrupted run: the student's whole state after a finished
block is its state dict (latent weights, weight and activation scales; AdaRound logits exist only
inside a block, which ends hardened) plus each layer's weight bits and whether its input quantizer is
on, which the manifest holds; everything else a block uses is made fresh per block (its captured
data, Adam, the AdaRound beta schedule, the PQ momentum tracker) or seeded by the block's index
(the batch sampling: ``seed + index``), and the calibration set is the checkpoint's own copy.

Every file is written under a temporary name, flushed and renamed; the manifest goes last and names
the tensor files it belongs to (with their sha256), so an interruption at any moment leaves either
the previous checkpoint or the new one. The fingerprint (the CompressConfig as a dict, a sha256 of
the FP weights, the torch / diffusers / pqcad-deploy versions) must match for a resume; anything else
is refused with one sentence that says what differs and what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from pqcad_deploy.engines._atomic import atomic_file
from pqcad_deploy.calibration.trajectories import CalibrationSet
from pqcad_deploy.config import CompressConfig, config_to_dict
from pqcad_deploy.errors import CheckpointError, ConfigError, OutputPathError
from pqcad_deploy.presets import PresetSettings, preset_to_dict
from pqcad_deploy.provenance import package_versions
from pqcad_deploy.quant.replace import quant_layers

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CHECKPOINT_SUFFIX",
    "STAGES",
    "Checkpoint",
    "ResumePoint",
    "checkpoint_dir",
    "check_checkpoint_dir",
    "run_fingerprint",
    "state_sha256",
]

CHECKPOINT_FORMAT = "pqcad-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_SUFFIX = ".checkpoint"
MANIFEST_FILE = "checkpoint.json"
DISTILL_MANIFEST_FILE = "distill.json"
CALIBRATION_FILE = "calibration.safetensors"
_COND_PREFIX = "cond."  # a conditional model's per-pair conditioning beside x and t
STAGES: tuple[str, ...] = ("weights", "activations")  # in the order a run does them
_VERSIONED_PACKAGES = ("pqcad-deploy", "torch", "diffusers")
_STATE_PREFIX = "state/"
_RNG_KEY = "rng/torch_cpu"


def checkpoint_dir(out: Path) -> Path:
    """The checkpoint directory of the artifact `out`: its sibling ``<out>.checkpoint``."""
    out = Path(out)
    return out.with_name(out.name + CHECKPOINT_SUFFIX)


def check_checkpoint_dir(path: Path, resume: bool, overwrite: bool) -> None:
    """Refuse, before the slow part, a checkpoint that would be lost or a path that cannot be one.

    A checkpoint of an interrupted run (its manifest exists) is kept unless the user says what to do
    with it: ``resume`` continues it, ``overwrite`` discards it.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"checkpoint path {path} exists and is not a directory; move it away.")
    foreign = sorted(p.name for p in path.iterdir() if not _is_checkpoint_file(p.name)) if path.is_dir() else []
    if foreign:
        raise OutputPathError(f"checkpoint path {path} exists and holds files that are not a compress checkpoint "
                              f"(first: {foreign[0]}); move it away.")
    interrupted = (path / MANIFEST_FILE).exists() or (path / DISTILL_MANIFEST_FILE).exists()
    if interrupted and not resume and not overwrite:
        raise OutputPathError(
            f"{path} holds the checkpoint of an interrupted compress; pass --resume to continue it, "
            f"or --overwrite to discard it and start over.")


def _is_checkpoint_file(name: str) -> bool:
    """Whether a file name is one a checkpoint writes (so removing the directory loses nothing else)."""
    return (name in (MANIFEST_FILE, CALIBRATION_FILE, DISTILL_MANIFEST_FILE)
            or (name.startswith(".") and ".tmp-" in name)
            or (name.startswith(("student-", "distill-")) and name.endswith(".safetensors")))


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a state dict (identifies the FP weights)."""
    h = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def run_fingerprint(config: CompressConfig, fp_unet: torch.nn.Module, settings: PresetSettings | None = None) -> dict:
    """What must be equal for a resume to give the same artifact: options, the preset's resolved
    settings (an edited presets table must not resume with other sizes), FP weights, versions."""
    versions = package_versions()
    settings = settings if settings is not None else config.settings
    return {
        "config": config_to_dict(config),
        "preset_settings": preset_to_dict(settings),
        "model_sha256": state_sha256(fp_unet.state_dict()),
        "versions": {name: versions[name] for name in _VERSIONED_PACKAGES},
    }


def _fingerprint_differences(saved: dict, now: dict) -> list[str]:
    """Human-readable differences between two fingerprints, e.g. "--seed (0 there, 1 here)"."""
    out = []
    old_cfg, new_cfg = saved.get("config") or {}, now["config"]
    for key in sorted(set(old_cfg) | set(new_cfg)):
        old, new = old_cfg.get(key), new_cfg.get(key)
        if old == new:
            continue
        if key.startswith("_"):
            out.append(f"options format ({key} {old!r} there, {new!r} here)")
        elif isinstance(old, dict) or isinstance(new, dict):
            out.append(f"{key} settings")
        else:
            out.append(f"--{key.replace('_', '-')} ({old!r} there, {new!r} here)")
    if saved.get("preset_settings") != now.get("preset_settings"):
        out.append(f"the settings of --preset {new_cfg.get('preset')} (presets.PRESETS was edited between the runs)")
    if saved.get("model_sha256") != now["model_sha256"]:
        out.append("model weights")
    old_v, new_v = saved.get("versions") or {}, now["versions"]
    for name in sorted(set(old_v) | set(new_v)):
        if old_v.get(name) != new_v.get(name):
            out.append(f"{name} version ({old_v.get(name)} there, {new_v.get(name)} here)")
    return out


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    """Write `data` through engines._atomic.atomic_file (temporary sibling, user modes, rename), flushed
    to disk before the rename: a checkpoint must survive the crash it exists for."""
    with atomic_file(path, error=OutputPathError) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@dataclass(frozen=True)
class ResumePoint:
    """Where a checkpoint left off.

    Args:
        stage: the stage of the last finished block ("weights" or "activations").
        blocks_done: blocks of that stage finished (all blocks of the stages before it are).
        blocks_total: blocks per stage.
        entries: the method's report entries so far (its own JSON: loss curves, transitions, ...).
        seconds: the method's running time up to the checkpoint.
    """

    stage: str
    blocks_done: int
    blocks_total: int
    entries: dict
    seconds: float

    def blocks_done_in(self, stage: str) -> int:
        """How many blocks of `stage` are finished: all for an earlier stage, none for a later one."""
        if STAGES.index(stage) < STAGES.index(self.stage):
            return self.blocks_total
        return self.blocks_done if stage == self.stage else 0

    def describe(self) -> str:
        return f"{self.stage} stage, {self.blocks_done} of {self.blocks_total} blocks done"


class Checkpoint:
    """The checkpoint directory of one compress run: what it resumes from, and where it saves.

    Usage (compress): ``Checkpoint(path, fingerprint)``, then :meth:`load` when resuming (refuses a
    different fingerprint), :meth:`use_calibration` with the run's calibration set; the method calls
    :meth:`restore` on its freshly built student and :meth:`save` after every finished block;
    :meth:`remove` once the artifact is written.
    """

    def __init__(self, path: Path, fingerprint: dict) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.resume: ResumePoint | None = None
        self.last_saved: ResumePoint | None = None
        self._manifest: dict | None = None
        self._calibration: CalibrationSet | None = None
        self._calibration_entry: dict | None = None  # {"file", "sha256", "description"} once on disk
        self.last_distill_iteration: int | None = None

    # ------------------------------------------------------------------ reading
    def exists(self) -> bool:
        return (self.path / MANIFEST_FILE).is_file()

    def _unreadable(self, reason: str) -> CheckpointError:
        return CheckpointError(
            f"the checkpoint at {self.path} cannot be used ({reason}); pass --overwrite without --resume "
            f"to discard it and start over.")

    def _check_fingerprint(self, saved: dict | None, what: str) -> None:
        """Refuse a saved state that another run made (other options, weights or versions)."""
        differences = _fingerprint_differences(saved or {}, self.fingerprint)
        if differences:
            raise ConfigError(
                f"the {what} at {self.path} belongs to another run (it differs in {', '.join(differences)}); "
                f"rerun with what it was made with to resume, or pass --overwrite without --resume to "
                f"discard it and start over.")

    def load(self) -> ResumePoint | None:
        """Read the manifest (None if there is none) and check that it belongs to this run.

        Raises:
            ConfigError: the checkpoint was made with other options, weights or package versions.
            CheckpointError: it is unreadable or of an unknown format or newer version.
        """
        if not self.exists():
            return None
        try:
            manifest = json.loads((self.path / MANIFEST_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise self._unreadable(f"{MANIFEST_FILE} is not valid JSON: {exc}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != CHECKPOINT_FORMAT:
            raise self._unreadable(f"{MANIFEST_FILE} is not a pqcad-deploy checkpoint")
        version = manifest.get("version")
        if not isinstance(version, int) or version > CHECKPOINT_VERSION:
            raise self._unreadable(f"checkpoint version {version!r}; this pqcad-deploy reads up to "
                                   f"{CHECKPOINT_VERSION}")
        self._check_fingerprint(manifest.get("fingerprint"), "checkpoint")
        try:
            point = ResumePoint(stage=manifest["stage"], blocks_done=int(manifest["blocks_done"]),
                                blocks_total=int(manifest["blocks_total"]), entries=dict(manifest["entries"]),
                                seconds=float(manifest["seconds"]))
            calibration = {k: manifest["calibration"][k] for k in ("file", "sha256", "description")}
            _ = [manifest["student"][k] for k in ("file", "sha256")], dict(manifest["layers"])
        except (KeyError, TypeError, ValueError) as exc:
            raise self._unreadable(f"{MANIFEST_FILE} is malformed ({type(exc).__name__}: {exc})") from None
        if point.stage not in STAGES:
            raise self._unreadable(f"unknown stage {point.stage!r}")
        self._calibration_entry = calibration
        self._manifest = manifest
        self.resume = point
        return point

    def _read_tensors(self, entry: dict) -> dict[str, torch.Tensor]:
        from safetensors.torch import load

        path = self.path / entry["file"]
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise self._unreadable(f"{path.name} cannot be read: {exc.strerror}") from None
        if _sha256(data) != entry["sha256"]:
            raise self._unreadable(f"{path.name} does not match its checksum")
        return load(data)

    def calibration(self) -> CalibrationSet:
        """The calibration set the checkpointed run used (after :meth:`load`)."""
        if self._calibration_entry is None:
            raise RuntimeError("no checkpoint loaded")
        tensors = self._read_tensors(self._calibration_entry)
        cond = {k[len(_COND_PREFIX):]: v for k, v in tensors.items() if k.startswith(_COND_PREFIX)}
        self._calibration = CalibrationSet(x=tensors["x"], t=tensors["t"],
                                           description=self._calibration_entry["description"], cond=cond)
        return self._calibration

    def restore(self, student: torch.nn.Module) -> ResumePoint | None:
        """Put the checkpointed state into a freshly built `student` (None: nothing to resume).

        The student must have the checkpoint's quantized layers (the same plan); their weight bits,
        input-quantizer switches and the whole state dict are set, and torch's CPU RNG state too.
        """
        if self.resume is None or self._manifest is None:
            return None
        layers = quant_layers(student)
        saved_layers: dict = self._manifest["layers"]
        if sorted(saved_layers) != sorted(layers) or any(
                saved_layers[n]["act_bits"] != layer.act_bits for n, layer in layers.items()):
            raise self._unreadable("its quantized layers do not match this run's")
        tensors = self._read_tensors(self._manifest["student"])
        state = {k[len(_STATE_PREFIX):]: v for k, v in tensors.items() if k.startswith(_STATE_PREFIX)}
        for name, layer in layers.items():
            layer.weight_quantizer.set_bits(int(saved_layers[name]["weight_bits"]))
            layer.input_quantizer.observing = False
            layer.input_quantizer.enabled = bool(saved_layers[name]["act_enabled"])
        try:
            student.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise self._unreadable(f"its student state does not fit this model: {str(exc).splitlines()[0]}") from None
        if _RNG_KEY in tensors:
            torch.set_rng_state(tensors[_RNG_KEY])
        return self.resume

    # ------------------------------------------------------------------ writing
    def use_calibration(self, calibration: CalibrationSet) -> None:
        """The run's calibration set, written with the first checkpoint (a resumed run keeps its own)."""
        self._calibration = calibration

    def save(self, student: torch.nn.Module, stage: str, blocks_done: int, blocks_total: int, entries: dict,
             seconds: float) -> None:
        """Checkpoint the student after `blocks_done` finished blocks of `stage`.

        Raises:
            RuntimeError: if a layer still holds AdaRound logits (a block must end hardened).
        """
        from safetensors.torch import save

        if stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}; got {stage!r}")
        layers = quant_layers(student)
        soft = [n for n, layer in layers.items() if layer.weight_quantizer.adaround_enabled]
        if soft:
            raise RuntimeError(f"cannot checkpoint while AdaRound is on (first: {soft[0]}); harden the block first")
        self.path.mkdir(parents=True, exist_ok=True)
        if self._calibration_entry is None:
            if self._calibration is None:
                raise RuntimeError("use_calibration() must be called before the first save()")
            data = save({"x": self._calibration.x.contiguous(), "t": self._calibration.t.contiguous(),
                         **{_COND_PREFIX + k: v.contiguous() for k, v in self._calibration.cond.items()}},
                        metadata={"format": CHECKPOINT_FORMAT})
            _atomic_write(self.path / CALIBRATION_FILE, data)
            self._calibration_entry = {"file": CALIBRATION_FILE, "sha256": _sha256(data),
                                       "description": self._calibration.description}
        tensors = {_STATE_PREFIX + k: v.detach().to("cpu", copy=True).contiguous()
                   for k, v in student.state_dict().items()}
        tensors[_RNG_KEY] = torch.get_rng_state()
        data = save(tensors, metadata={"format": CHECKPOINT_FORMAT})
        student_file = f"student-{stage}-{blocks_done:04d}.safetensors"
        _atomic_write(self.path / student_file, data)
        manifest = {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "fingerprint": self.fingerprint,
            "stage": stage, "blocks_done": blocks_done, "blocks_total": blocks_total, "seconds": seconds,
            "entries": entries,
            "layers": {n: {"weight_bits": layer.weight_bits, "act_bits": layer.act_bits,
                           "act_enabled": bool(layer.input_quantizer.enabled)} for n, layer in layers.items()},
            "calibration": self._calibration_entry,
            "student": {"file": student_file, "sha256": _sha256(data)},
        }
        _atomic_write(self.path / MANIFEST_FILE, json.dumps(manifest, sort_keys=True, indent=1).encode())
        for stale in [*self.path.glob("student-*.safetensors"), *self.path.glob(".*.tmp-*")]:
            if stale.name != student_file:  # older states, temporaries of a killed process
                stale.unlink(missing_ok=True)
        self.last_saved = ResumePoint(stage, blocks_done, blocks_total, entries, seconds)

    # ------------------------------------------------------------------ CAD
    def save_distill(self, state: dict) -> None:
        """Checkpoint CAD's resumable state (``pqcad_deploy.distill.cad``: iteration, student, Adam, ...)."""
        import io

        from safetensors.torch import save

        self.path.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(state, buffer)
        blob = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
        data = save({"distill_state": blob}, metadata={"format": CHECKPOINT_FORMAT})
        name = f"distill-{int(state['iteration']):06d}.safetensors"
        _atomic_write(self.path / name, data)
        manifest = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "fingerprint": self.fingerprint,
                    "iteration": int(state["iteration"]), "file": name, "sha256": _sha256(data)}
        _atomic_write(self.path / DISTILL_MANIFEST_FILE, json.dumps(manifest, sort_keys=True, indent=1).encode())
        for stale in self.path.glob("distill-*.safetensors"):
            if stale.name != name:
                stale.unlink(missing_ok=True)
        self.last_distill_iteration = int(state["iteration"])

    def load_distill(self) -> dict | None:
        """CAD's saved state (None if there is none); refused if another run made it."""
        import io

        path = self.path / DISTILL_MANIFEST_FILE
        if not path.is_file():
            return None
        try:
            manifest = json.loads(path.read_text())
            entry = {"file": manifest["file"], "sha256": manifest["sha256"]}
            fingerprint = manifest["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise self._unreadable(f"{DISTILL_MANIFEST_FILE} is malformed ({type(exc).__name__}: {exc})") from None
        self._check_fingerprint(fingerprint, "distillation checkpoint")
        blob = self._read_tensors(entry)["distill_state"]
        return torch.load(io.BytesIO(blob.numpy().tobytes()), map_location="cpu", weights_only=True)

    def remove(self) -> None:
        """Delete the checkpoint directory (after the artifact is written, or to start over)."""
        if self.path.is_dir():
            shutil.rmtree(self.path)
