"""compress --resume: per-block checkpoints give the same artifact as an uninterrupted run.

The `fast` presets are shrunk for this module (2 trajectories x 3 timesteps, a few iterations per
block), so one brecq or pqcad run on the small UNet takes about 2 s on one thread. An interruption is
a KeyboardInterrupt raised inside the n-th `reconstruct_block` call of a stage, i.e. in the middle of
a block as Ctrl-C would be (for pqcad in the middle of a block's bit ladder).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from _cli_runner import run_cli

from pqcad_deploy import reconstruct as R
from pqcad_deploy.checkpoint import (
    CHECKPOINT_FORMAT, Checkpoint, ResumePoint, check_checkpoint_dir, checkpoint_dir,
)
from pqcad_deploy.compress import compress
from pqcad_deploy.config import CalibrationConfig, CompressConfig
from pqcad_deploy.errors import CheckpointError, ConfigError, OutputPathError
from pqcad_deploy.methods import pqcad as PQ
from pqcad_deploy.presets import PRESETS
from pqcad_deploy.progressive import TransitionRule

STEPS = 4


@pytest.fixture(scope="module")
def tiny_presets():
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PRESETS, "fast", dataclasses.replace(
            PRESETS["fast"], calibration=CalibrationConfig(num_trajectories=2, timesteps_kept=3, batch_size=2),
            reconstruction=R.ReconstructionConfig(iters=6, act_iters=3, batch_size=4),
            pq_rule=TransitionRule(min_iters=2, max_iters=5)))
        yield


@pytest.fixture(autouse=True)
def _tiny(tiny_presets):
    yield


def _config(model_dir: Path, method: str, seed: int = 0) -> CompressConfig:
    return CompressConfig(model=str(model_dir), method=method, weight_bits=4, act_bits=8, teacher_steps=STEPS,
                          preset="fast", seed=seed, distill=False)


@contextlib.contextmanager
def interrupt_at(stage: str, call: int, after: bool = False):
    """Raise KeyboardInterrupt in the `call`-th (1-based) reconstruct_block call of `stage`.

    `after`: let that call finish (the student is changed) and interrupt before anything records it.
    """
    count = [0]
    original = R.reconstruct_block

    def wrapper(*args, **kwargs):
        if kwargs.get("stage", "weights") != stage:
            return original(*args, **kwargs)
        count[0] += 1
        if count[0] == call and not after:
            raise KeyboardInterrupt
        result = original(*args, **kwargs)
        if count[0] == call:
            raise KeyboardInterrupt
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(R, "reconstruct_block", wrapper)
        mp.setattr(PQ, "reconstruct_block", wrapper)
        yield


def _checkpoint_state(out: Path) -> dict:
    return json.loads((checkpoint_dir(out) / "checkpoint.json").read_text())


def _without_timings(value):
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def assert_same_artifact(expected: Path, actual: Path, report_edited: bool = False) -> None:
    """Same weights, same report; artifact.json identical (but for report.json's digest if the test edited it)."""
    for name in ("student.safetensors", "teacher.safetensors"):
        assert (expected / name).read_bytes() == (actual / name).read_bytes(), name
    a, b = (json.loads((p / "report.json").read_text()) for p in (expected, actual))
    assert _without_timings(a) == _without_timings(b)
    a, b = (json.loads((p / "artifact.json").read_text()) for p in (expected, actual))
    if report_edited:
        del a["files"]["report.json"], b["files"]["report.json"]
    assert a == b  # no timestamps or timings: byte-identical runs (issue 12)


def assert_no_artifact(out: Path) -> None:
    """Neither the artifact nor a temporary directory of it exists (only the checkpoint may)."""
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == []


@pytest.fixture(scope="module")
def reference(small_unet_dir, tmp_path_factory, tiny_presets):
    """method -> the artifact of an uninterrupted run (made on first use)."""
    root = tmp_path_factory.mktemp("reference")
    made: dict[str, Path] = {}

    def get(method: str) -> Path:
        if method not in made:
            made[method] = compress(_config(small_unet_dir, method), root / method, progress=False).artifact
            assert not checkpoint_dir(made[method]).exists()
        return made[method]
    return get


@pytest.fixture(scope="module")
def interrupted_pq(small_unet_dir, tmp_path_factory, tiny_presets) -> Path:
    """The checkpoint directory of a pqcad run interrupted in its third weight block (2 blocks done)."""
    out = tmp_path_factory.mktemp("interrupted") / "art"
    with interrupt_at("weights", 6), pytest.raises(KeyboardInterrupt):
        compress(_config(small_unet_dir, "pqcad"), out, progress=False)
    return checkpoint_dir(out)


@pytest.fixture
def pq_copy(interrupted_pq, tmp_path) -> Path:
    """A fresh copy of `interrupted_pq` next to tmp_path/art; returns the artifact path tmp_path/art."""
    shutil.copytree(interrupted_pq, tmp_path / interrupted_pq.name)
    return tmp_path / "art"


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- resume == one run
@pytest.mark.parametrize("method, weights_call, after, blocks_done", [
    # time_embedding (8 -> 6 -> 4: 3 calls), conv_in (8 bits: 1 call), then the first resnet's second level
    ("pqcad", 6, False, 2),
    ("brecq", 3, True, 2),   # block 3 finishes reconstructing, interrupted before its checkpoint
])
def test_resume_equals_an_uninterrupted_run(method, weights_call, after, blocks_done, reference, small_unet_dir,
                                            tmp_path):
    config, out, logs = _config(small_unet_dir, method), tmp_path / "art", []
    ckpt = checkpoint_dir(out)
    with interrupt_at("weights", weights_call, after), pytest.raises(KeyboardInterrupt) as info:
        compress(config, out, progress=False)
    assert str(info.value).startswith(f"interrupted; weights stage, {blocks_done} of ")
    assert f"saved in {ckpt}: rerun the same command with --resume" in str(info.value)
    assert_no_artifact(out)
    state = _checkpoint_state(out)
    total = state["blocks_total"]
    assert (state["format"], state["stage"], state["blocks_done"]) == (CHECKPOINT_FORMAT, "weights", blocks_done)
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "calibration.safetensors", "checkpoint.json", f"student-weights-{blocks_done:04d}.safetensors"]

    # resumed, and interrupted again in the activation stage
    with interrupt_at("activations", 3), pytest.raises(KeyboardInterrupt, match="activations stage, 2 of"):
        compress(config, out, progress=False, resume=True, log=logs.append)
    assert logs == [f"resuming from {ckpt}: weights stage, {blocks_done} of {total} blocks done"]
    assert_no_artifact(out)
    assert (_checkpoint_state(out)["stage"], _checkpoint_state(out)["blocks_done"]) == ("activations", 2)

    # resumed to the end: the same artifact as one uninterrupted run, and the checkpoint is gone
    compress(config, out, progress=False, resume=True, log=logs.append)
    assert logs[1:] == [f"resuming from {ckpt}: activations stage, 2 of {total} blocks done"]
    assert not ckpt.exists()
    assert_same_artifact(reference(method), out)
    report = json.loads((out / "report.json").read_text())
    stages = report["pq" if method == "pqcad" else "reconstruction"]
    assert len(stages["activations"]) == total and "seconds" not in stages


def test_interrupt_before_the_first_block_leaves_nothing(small_unet_dir, tmp_path):
    out, logs = tmp_path / "art", []
    with interrupt_at("weights", 1), pytest.raises(KeyboardInterrupt) as info:
        compress(_config(small_unet_dir, "pqcad"), out, progress=False, resume=True, log=logs.append)
    assert str(info.value) == ""  # nothing to resume, a plain interrupt
    assert logs == [f"--resume: no checkpoint at {checkpoint_dir(out)}; starting from scratch"]
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("change, message", [
    (dict(seed=1), "belongs to another run (it differs in --seed (0 there, 1 here)); rerun with what it was made"),
    (dict(method="brecq"), "--method ('pqcad' there, 'brecq' here)"),
    (dict(method="minmax"), "--method ('pqcad' there, 'minmax' here)"),
])
def test_resume_refuses_a_checkpoint_of_another_run(pq_copy, small_unet_dir, change, message):
    config = dataclasses.replace(_config(small_unet_dir, "pqcad"), **change)
    before = _tree(pq_copy.parent)
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        compress(config, pq_copy, progress=False, resume=True, log=print)
    assert str(info.value).endswith("or pass --overwrite without --resume to discard it and start over.")
    assert _tree(pq_copy.parent) == before


def test_resume_refuses_a_checkpoint_made_under_other_preset_settings(pq_copy, small_unet_dir):
    """The preset's resolved settings are in the fingerprint: editing presets.PRESETS between an
    interrupted run and its --resume is refused, where the preset's name alone would have matched."""
    config = _config(small_unet_dir, "pqcad")
    before = _tree(pq_copy.parent)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PRESETS, "fast", dataclasses.replace(
            PRESETS["fast"], pq_rule=dataclasses.replace(PRESETS["fast"].pq_rule, max_iters=4)))
        with pytest.raises(ConfigError, match=re.escape(
                "(it differs in the settings of --preset fast (presets.PRESETS was edited between the runs))")):
            compress(config, pq_copy, progress=False, resume=True, log=print)
    assert _tree(pq_copy.parent) == before


def test_the_report_records_the_resolved_preset_settings(small_unet_dir, tmp_path):
    out = tmp_path / "minmax"
    compress(_config(small_unet_dir, "minmax"), out, progress=False)
    recorded = json.loads((out / "report.json").read_text())["preset_settings"]
    assert recorded["pq_rule"] == {"beta": 0.9, "threshold": 1e-3, "min_iters": 2, "max_iters": 5}  # tiny_presets
    assert recorded["calibration"]["num_trajectories"] == 2 and recorded["distill"]["iters"] == PRESETS["fast"].distill.iters


def test_resume_refuses_other_model_weights(pq_copy, small_unet_dir, tmp_path):
    import torch
    from diffusers import UNet2DModel

    model = tmp_path / "model"
    shutil.copytree(small_unet_dir, model)
    unet = UNet2DModel.from_pretrained(str(model))
    with torch.no_grad():
        unet.conv_in.bias.add_(1.0)
    unet.save_pretrained(str(model))
    config = dataclasses.replace(_config(small_unet_dir, "pqcad"), model=str(model))
    with pytest.raises(ConfigError, match=r"differs in --model \(.*\), model weights\); rerun"):
        compress(config, pq_copy, progress=False, resume=True)


def test_existing_checkpoint_is_refused_unless_resume_or_overwrite(pq_copy, small_unet_dir, reference):
    config = _config(small_unet_dir, "pqcad")
    before = _tree(pq_copy.parent)
    with pytest.raises(OutputPathError, match="holds the checkpoint of an interrupted compress; pass --resume "
                                              "to continue it, or --overwrite to discard it and start over."):
        compress(config, pq_copy, progress=False)
    assert _tree(pq_copy.parent) == before
    logs = []
    compress(config, pq_copy, progress=False, overwrite=True, log=logs.append)
    assert logs == [f"--overwrite: discarding the checkpoint at {checkpoint_dir(pq_copy)}"]
    assert not checkpoint_dir(pq_copy).exists()
    assert_same_artifact(reference("pqcad"), pq_copy)


def test_corrupt_checkpoint_is_refused(pq_copy, small_unet_dir):
    ckpt = checkpoint_dir(pq_copy)
    student = next(ckpt.glob("student-*.safetensors"))
    data = bytearray(student.read_bytes())
    data[-1] ^= 0xFF
    student.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{student.name} does not match its checksum"):
        compress(_config(small_unet_dir, "pqcad"), pq_copy, progress=False, resume=True, log=lambda _: None)
    (ckpt / "checkpoint.json").write_text('{"format": "pqcad-checkpoint", "version": 99}')
    with pytest.raises(CheckpointError, match="checkpoint version 99; this pqcad-deploy reads up to 1"):
        compress(_config(small_unet_dir, "pqcad"), pq_copy, progress=False, resume=True, log=lambda _: None)


def test_checkpoint_path_that_is_not_a_checkpoint(tmp_path):
    ckpt = checkpoint_dir(tmp_path / "art")
    ckpt.mkdir()
    (ckpt / "notes.txt").write_text("mine")
    with pytest.raises(OutputPathError, match="holds files that are not a compress checkpoint .first: notes.txt"):
        check_checkpoint_dir(ckpt, resume=True, overwrite=True)
    ckpt.rename(tmp_path / "moved")
    ckpt.write_text("a file")
    with pytest.raises(OutputPathError, match="exists and is not a directory"):
        check_checkpoint_dir(ckpt, resume=False, overwrite=False)


def test_minmax_resume_runs_from_the_start(small_unet_dir, tmp_path):
    logs = []
    compress(_config(small_unet_dir, "minmax"), tmp_path / "art", progress=False, resume=True, log=logs.append)
    assert logs == ["--resume: minmax has no blocks to resume; running it from the start"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_resume_point_stages():
    point = ResumePoint(stage="activations", blocks_done=3, blocks_total=7, entries={}, seconds=1.0)
    assert (point.blocks_done_in("weights"), point.blocks_done_in("activations")) == (7, 3)
    point = ResumePoint(stage="weights", blocks_done=3, blocks_total=7, entries={}, seconds=1.0)
    assert (point.blocks_done_in("weights"), point.blocks_done_in("activations")) == (3, 0)
    assert point.describe() == "weights stage, 3 of 7 blocks done"
    assert Checkpoint(Path("nowhere"), {}).load() is None


# ----------------------------------------------------------------------------- CLI
def _run_cli(*args: object) -> tuple[int, str, str]:
    outcome = run_cli(*args)
    return outcome.code, outcome.out, outcome.err


def test_cli_resume(small_unet_dir, reference, tmp_path):
    out = tmp_path / "art"
    args = ["compress", "--model", small_unet_dir, "--method", "pqcad", "--weight-bits", 4, "--preset", "fast",
            "--teacher-steps", STEPS, "--no-distill", "--quiet", "--out", out]
    with interrupt_at("weights", 6):
        code, stdout, stderr = _run_cli(*args)
    assert code == 130 and stdout == ""
    assert stderr.strip().splitlines() == [
        f"error: interrupted; weights stage, 2 of {_checkpoint_state(out)['blocks_total']} blocks done, saved in "
        f"{checkpoint_dir(out)}: rerun the same command with --resume to continue."]
    code, stdout, stderr = _run_cli(*args)
    assert code == 1 and "pass --resume to continue it" in stderr
    code, stdout, stderr = _run_cli(*args, "--resume")
    assert code == 0, stderr
    assert stdout.splitlines()[0].startswith(f"resuming from {checkpoint_dir(out)}: weights stage, 2 of ")
    assert stdout.splitlines()[1].startswith(f"wrote {out} (pqcad W4A8, ")
    assert not checkpoint_dir(out).exists()
    assert_same_artifact(reference("pqcad"), out)


# ----------------------------------------------------------------------------- CAD resume == one run
@contextlib.contextmanager
def _tiny_distill_presets():
    """CAD at 10 iterations of batch 2 on 8 C_DC pairs, checkpointed every 3 iterations."""
    from pqcad_deploy.presets import DCConfig, DistillConfig

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PRESETS, "fast", dataclasses.replace(
            PRESETS["fast"], distill=DistillConfig(iters=10, batch_size=2), dc=DCConfig(size=8, batch_size=4),
            distill_checkpoint_every=3))
        yield


@pytest.fixture
def tiny_distill():
    with _tiny_distill_presets():
        yield


@contextlib.contextmanager
def interrupt_distillation_at(call: int):
    """Raise KeyboardInterrupt in the `call`-th (1-based) CAD loss evaluation (mid-iteration)."""
    from pqcad_deploy.distill import cad

    count, original = [0], cad.distill_loss

    def wrapper(*args, **kwargs):
        count[0] += 1
        if count[0] == call:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cad, "distill_loss", wrapper)
        yield


@pytest.mark.parametrize("method", ["pqcad", "minmax"])
def test_distillation_resume_equals_an_uninterrupted_run(method, small_unet_dir, tmp_path, tiny_distill):
    config = dataclasses.replace(_config(small_unet_dir, method), distill=True)
    reference_art = compress(config, tmp_path / "reference", progress=False).artifact
    out, logs = tmp_path / "art", []
    ckpt = checkpoint_dir(out)
    with interrupt_distillation_at(8), pytest.raises(KeyboardInterrupt) as info:
        compress(config, out, progress=False)
    assert str(info.value) == (f"interrupted; distillation saved at iteration 6 in {ckpt}: rerun the same command "
                               f"with --resume to continue.")
    assert_no_artifact(out)
    names = sorted(p.name for p in ckpt.iterdir())
    assert "distill.json" in names and "distill-000006.safetensors" in names
    assert not [n for n in names if n.startswith("distill-") and n != "distill-000006.safetensors"]
    # without --resume or --overwrite the interrupted distillation is not silently thrown away
    with pytest.raises(OutputPathError, match="--resume to continue it"):
        compress(config, out, progress=False)

    compress(config, out, progress=False, resume=True, log=logs.append)
    assert logs[-1] == "resuming the distillation from iteration 6 of 10"
    assert not ckpt.exists()
    report = json.loads((out / "report.json").read_text())
    assert len(report["distillation"]["losses"]) == 10 and report["distillation"]["resumed_from"] == 6
    # the one honest difference: the resumed report says where it resumed from
    report["distillation"]["resumed_from"] = None
    (out / "report.json").write_text(json.dumps(report))
    assert_same_artifact(reference_art, out, report_edited=True)


def test_distillation_checkpoint_of_another_run_is_refused(small_unet_dir, tmp_path, tiny_distill):
    config = dataclasses.replace(_config(small_unet_dir, "minmax"), distill=True)
    out = tmp_path / "art"
    with interrupt_distillation_at(5), pytest.raises(KeyboardInterrupt):
        compress(config, out, progress=False)
    with pytest.raises(ConfigError, match=r"^the distillation checkpoint at .* belongs to another run \(it differs in "
                                          r"--seed \(0 there, 1 here\)\); rerun with what it was made with"):
        compress(dataclasses.replace(config, seed=1), out, progress=False, resume=True)


@pytest.fixture(scope="module")
def two_round_reference(small_unet_dir, tmp_path_factory, tiny_presets):
    """(config, artifact) of an uninterrupted --rounds 2 run, made once for the module."""
    from pqcad_deploy.distill import cad
    from pqcad_deploy.quant.replace import quant_layers

    config = dataclasses.replace(_config(small_unet_dir, "minmax"), distill=True, rounds=2)
    teachers: list[bool] = []  # per targets computation: is the teacher a quantized student?
    original = cad.compute_targets

    def recording(teacher, *args, **kwargs):
        teachers.append(bool(quant_layers(teacher)))
        return original(teacher, *args, **kwargs)

    with _tiny_distill_presets(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(cad, "compute_targets", recording)
        art = compress(config, tmp_path_factory.mktemp("rounds") / "reference", progress=False).artifact
    # round 1 learns from the FP model, round 2 from round 1's student (training pairs, then held-out pairs)
    assert teachers == [False, False, True, True]
    return config, art


@pytest.mark.parametrize("call, note", [
    (11, "resuming the distillation at round 2 of 2"),  # round 1 finished: its end was checkpointed
    (18, "resuming the distillation from iteration 6 of 10 in round 2 of 2"),
])
def test_two_rounds_resume_across_rounds_equals_an_uninterrupted_run(call, note, small_unet_dir, tmp_path,
                                                                     tiny_distill, two_round_reference):
    """--rounds 2 halves 4 -> 2 -> 1 steps; an interruption in round 2 resumes to the same artifact."""
    from pqcad_deploy.models import load_model
    from pqcad_deploy.schedule import ddim_timesteps

    config, reference_art = two_round_reference
    scheduler_config = load_model(str(small_unet_dir)).scheduler_config
    manifest = json.loads((reference_art / "artifact.json").read_text())
    assert manifest["options"]["teacher_steps"] == 4 and len(manifest["student_timesteps"]) == 1
    assert manifest["student_timesteps"] == ddim_timesteps(scheduler_config, 1)
    report = json.loads((reference_art / "report.json").read_text())["distillation"]
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [0, 1] and report["round"] == 1
    assert rounds[0]["grid"]["teacher"] == ddim_timesteps(scheduler_config, 4)
    assert rounds[1]["grid"]["teacher"] == ddim_timesteps(scheduler_config, 2)
    assert [r["guard"]["reference_steps"] for r in rounds] == [4, 4]  # every round against FP at the original steps
    assert "also_against" not in rounds[0]["guard"] and rounds[1]["guard"]["also_against"]["reference_steps"] == 2
    assert all(r["guard"]["kept"] in ("distilled", "undistilled") for r in rounds)

    out, logs = tmp_path / "art", []
    with interrupt_distillation_at(call), pytest.raises(KeyboardInterrupt):
        compress(config, out, progress=False)
    assert_no_artifact(out)
    compress(config, out, progress=False, resume=True, log=logs.append)
    assert logs[-1] == note
    resumed = json.loads((out / "report.json").read_text())
    for entry in (resumed["distillation"], resumed["distillation"]["rounds"][1]):
        entry["resumed_from"] = None  # the one honest difference
    (out / "report.json").write_text(json.dumps(resumed))
    assert_same_artifact(reference_art, out, report_edited=True)


@pytest.mark.slow  # two pqcad compressions and four CAD rounds: about a minute on two cores
def test_distilling_a_pq_artifacts_student_round_by_round_equals_compress_distill(small_unet_dir, tmp_path,
                                                                                  tiny_distill):
    """The GPU table's path (compress --no-distill once, then distill.rounds on the artifact's student,
    seeing each round through on_round) makes the same student as compress --distill --rounds 2, for
    a method whose student keeps latent weights on the grid (pqcad hardens AdaRound: latent = codes x
    scale, which is what the artifact stores; minmax keeps the FP weights as latents, so it would not)."""
    from safetensors.torch import load_file

    from pqcad_deploy.artifact import load_artifact, student_state_from_model
    from pqcad_deploy.checkpoint import Checkpoint
    from pqcad_deploy.distill.rounds import distill_rounds
    from pqcad_deploy.models import load_model
    from pqcad_deploy.schedule import ddim_timesteps

    config = dataclasses.replace(_config(small_unet_dir, "pqcad"), distill=True, rounds=2)
    reference_art = compress(config, tmp_path / "reference", progress=False).artifact
    pq = compress(dataclasses.replace(config, distill=False, rounds=1), tmp_path / "pq", progress=False).artifact
    artifact = load_artifact(pq)
    loaded = load_model(str(small_unet_dir))
    seen: list[tuple[int, list[int], str]] = []

    def on_round(r, student, report, timesteps):
        seen.append((r, timesteps, report["guard"]["kept"]))

    student, report, timesteps = distill_rounds(config, artifact.build_student(), loaded.unet.eval(),
                                                loaded.scheduler_config, tuple(artifact.manifest.image_shape), "cpu",
                                                False, Checkpoint(tmp_path / "checkpoint", "test"), on_round=on_round)
    reference = json.loads((reference_art / "report.json").read_text())["distillation"]["rounds"]
    assert seen == [(r, ddim_timesteps(loaded.scheduler_config, 4 // 2 ** (r + 1)), reference[r]["guard"]["kept"])
                    for r in (0, 1)]
    assert timesteps == ddim_timesteps(loaded.scheduler_config, 1)
    expected = load_file(str(reference_art / "student.safetensors"))
    actual = student_state_from_model(student)
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, actual[name]), name
