"""The `pqcad-deploy` command line: help, the whole path end to end, and every user error.

The builtin end-to-end path (compress -> export -> build-engine -> sample) runs once in a
module-scoped fixture and the tests read its outputs. Most error cases call `cli.main` in-process
(the same function the console script runs, so the `error: ...` formatting is exercised); a few run
the real console script in a subprocess for the real exit codes and stderr.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from pqcad_deploy import cli
from pqcad_deploy.engines._atomic import MARKER_FILE
from pqcad_deploy.engines.manifest import METADATA_KEY
from _cli_runner import Outcome, run_cli

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "pqcad-deploy"
DEFAULT_METHOD_FAST = ["--preset", "fast", "--teacher-steps", "10", "--quiet"]
"""The default method (pqcad + CAD) at the fast preset: the end-to-end builtin pipeline runs it."""
FAST = [*DEFAULT_METHOD_FAST, "--method", "minmax", "--no-distill"]
"""The quickest compress, for tests about the commands rather than the method."""
COMMANDS = ("compress", "export", "build-engine", "sample", "analyze")
"""The commands that write an output (the output-safety tests run each)."""
READ_ONLY_COMMANDS = ("check",)
GROUPS = {"eval": ("fid",)}  # sub-groups and their commands


def _leaf_commands(group: click.Group, prefix: str = "") -> dict[str, click.Command]:
    """'eval fid' -> command, for every command of the tree (sub-groups walked, not listed)."""
    leaves: dict[str, click.Command] = {}
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            leaves.update(_leaf_commands(command, f"{prefix}{name} "))
        else:
            leaves[f"{prefix}{name}"] = command
    return leaves


ALL_COMMANDS = COMMANDS + READ_ONLY_COMMANDS + tuple(f"{g} {c}" for g, cs in GROUPS.items() for c in cs)


# ----------------------------------------------------------------------------------------- helpers

# One torch thread: on this 2-core machine, with anything else running, torch's OpenMP threads
# spin against each other and a 5 s compress takes minutes (measured: 4.9 s vs 104.6 s).
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@contextlib.contextmanager
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_main(*args: object) -> Outcome:
    """Run `cli.main` (the console entry point) in-process, one torch thread, and capture its exit code and output."""
    with one_torch_thread():
        return run_cli(*args)


def run_script(*args: object, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run the installed `pqcad-deploy` console script."""
    return subprocess.run([str(SCRIPT), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=180,
                          env=ONE_THREAD_ENV)


def assert_one_error_line(err: str, *fragments: str) -> str:
    """stderr is exactly one line `error: ...` that contains every fragment."""
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{err}"
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def assert_failed(result: Outcome | subprocess.CompletedProcess, *fragments: str, code: int | None = None) -> str:
    rc = result.code if isinstance(result, Outcome) else result.returncode
    err = result.err if isinstance(result, Outcome) else result.stderr
    assert rc != 0, f"expected a failure, got exit 0: {err}"
    if code is not None:
        assert rc == code, (rc, err)
    return assert_one_error_line(err, *fragments)


def assert_nothing_left(parent: Path, name: str) -> None:
    """Neither `parent/name` nor a hidden temporary sibling `.name.*` exists."""
    assert not (parent / name).exists(), f"{parent / name} was created"
    leftovers = [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")] if parent.is_dir() else []
    assert leftovers == [], f"temporary entries left behind in {parent}: {leftovers}"


def onnx_manifest(path: Path) -> dict:
    model = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    assert METADATA_KEY in props, f"{path} has no {METADATA_KEY}"
    return json.loads(props[METADATA_KEY])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_images(npz: Path) -> np.ndarray:
    with np.load(npz) as data:
        assert list(data.keys()) == ["images"]
        return data["images"]


# ----------------------------------------------------------------------------------------- fixtures

@dataclass
class Pipeline:
    root: Path
    artifact: Path
    onnx: Path
    engine: Path
    images: Path
    npz: Path
    outputs: dict[str, str]  # command -> stdout


def fast_preset_at_test_size():
    """The fast preset with every loop cut to a test's size, for the builtin pipeline below.

    The tests read what the commands write (files, manifests, summaries, a sample that looks like
    Fashion-MNIST), not how well the method does, so every stage still runs, only shorter: PQ
    reconstruction (10 + 4 Adam iterations per block instead of 60 + 20) on 8 calibration pairs instead
    of 32, and CAD (10 iterations on 16 pairs, held-out loss and checkpoint every 5, instead of 100 on
    64 pairs) with its guard and the activation-scale check as the preset has them. Measured on the
    2-core machine: compress 106 s -> 29 s; the six sampled images keep std 70 (each >= 47), median 2,
    mean 55, against the > 10, < 64 and 5..160 that test_sampled_images_look_like_the_trained_model asks.
    """
    import dataclasses

    from pqcad_deploy.presets import PRESETS, CalibrationConfig

    fast = PRESETS["fast"]
    return dataclasses.replace(
        fast,
        calibration=CalibrationConfig(num_trajectories=2, timesteps_kept=4, batch_size=2),
        reconstruction=dataclasses.replace(fast.reconstruction, iters=10, act_iters=4),
        dc=dataclasses.replace(fast.dc, size=16),
        heldout=dataclasses.replace(fast.heldout, size=8),
        distill=dataclasses.replace(fast.distill, iters=10, heldout_every=5),
        distill_checkpoint_every=5,
    )


@pytest.fixture(scope="module")
def builtin(tmp_path_factory) -> Pipeline:
    """compress -> export -> build-engine -> sample on the embedded model, once per module: README's main
    job, at the defaults (export's onnxruntime target resolves to ort-qlinear at W8A8), with the fast
    preset's loops at a test's size (fast_preset_at_test_size)."""
    from pqcad_deploy.presets import PRESETS

    root = tmp_path_factory.mktemp("builtin")
    art, model, engine, images, npz = root / "A", root / "M.onnx", root / "E", root / "O", root / "O.npz"
    outputs = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PRESETS, "fast", fast_preset_at_test_size())
        for name, args in [
            ("compress", ["compress", *DEFAULT_METHOD_FAST, "--out", art]),
            ("export", ["export", art, "--onnx", model]),
            ("build-engine", ["build-engine", model, "-o", engine]),
            ("sample", ["sample", engine, "-n", 6, "--seed", 0, "-o", images, "--npz", npz, "--quiet"]),
        ]:
            result = run_main(*args)
            assert result.code == 0, f"{name} failed: {result.err}"
            outputs[name] = result.out
    return Pipeline(root, art, model, engine, images, npz, outputs)


@pytest.fixture(scope="module")
def small(tmp_path_factory, unet_dirs) -> Pipeline:
    """The same path on a small random diffusers UNet at W4A8, through the real console script."""
    model_dir = unet_dirs["c1_32_attn1_default"]
    root = tmp_path_factory.mktemp("small")
    art, model, engine, images, npz = root / "A", root / "M.onnx", root / "E", root / "O", root / "O.npz"
    outputs = {}
    for name, args in [
        ("compress", ["compress", "--model", model_dir, "--weight-bits", 4, "--act-bits", 8, *FAST, "--out", art]),
        ("export", ["export", art, "--onnx", model, "--target", "qdq"]),
        ("build-engine", ["build-engine", model, "-o", engine]),
        ("sample", ["sample", engine, "-n", 3, "--seed", 1, "-o", images, "--npz", npz, "--quiet"]),
    ]:
        proc = run_script(*args, cwd=root)
        assert proc.returncode == 0, f"{name} failed: {proc.stderr}"
        outputs[name] = proc.stdout
    return Pipeline(root, art, model, engine, images, npz, outputs)


# ----------------------------------------------------------------------------------------- --help

def test_group_help_lists_every_command() -> None:
    result = CliRunner().invoke(cli.cli, ["--help"])
    assert result.exit_code == 0, result.output
    for name in (*COMMANDS, *READ_ONLY_COMMANDS, *GROUPS):
        assert name in result.output
    assert set(cli.cli.commands) == set(COMMANDS) | set(READ_ONLY_COMMANDS) | set(GROUPS)
    assert set(_leaf_commands(cli.cli)) == set(ALL_COMMANDS)
    for group, names in GROUPS.items():
        sub = CliRunner().invoke(cli.cli, [group, "--help"])
        assert sub.exit_code == 0, sub.output
        assert all(name in sub.output for name in names)


@pytest.mark.parametrize("name", ALL_COMMANDS)
def test_command_help_documents_every_option(name: str) -> None:
    command = _leaf_commands(cli.cli)[name]
    result = CliRunner().invoke(cli.cli, [*name.split(), "--help"])
    assert result.exit_code == 0, result.output
    assert f"Usage: cli {name}" in result.output or f"Usage: pqcad-deploy {name}" in result.output
    options = [p for p in command.params if isinstance(p, click.Option)]
    assert options, f"{name} has no options"
    for param in options:
        assert param.help and param.help.strip(), f"{name} {param.opts[0]} has no help text"
        for opt in param.opts + param.secondary_opts:
            assert opt in result.output, f"{name} --help does not mention {opt}"
    for param in command.params:
        if isinstance(param, click.Argument):
            assert (param.metavar or param.name.upper()) in result.output


def test_help_through_the_console_script() -> None:
    proc = run_script("sample", "--help")
    assert proc.returncode == 0 and proc.stderr == ""
    assert "Usage: pqcad-deploy sample" in proc.stdout and "--npz" in proc.stdout


# ----------------------------------------------------------------------------------------- end to end

def test_compress_writes_the_artifact(builtin: Pipeline) -> None:
    assert sorted(p.name for p in builtin.artifact.iterdir()) == [
        MARKER_FILE, "artifact.json", "report.json", "report.png", "student.safetensors", "teacher.safetensors"]
    manifest = json.loads((builtin.artifact / "artifact.json").read_text())
    # the defaults: pqcad + CAD, so the student samples half the teacher's steps
    assert manifest["format"] == "pqcad-artifact" and manifest["options"]["method"] == "pqcad"
    assert manifest["options"]["distill"] and manifest["options"]["teacher_steps"] == 10
    assert manifest["student_timesteps"] == [800, 600, 400, 200, 0]
    assert manifest["image_shape"] == [1, 32, 32] and manifest["unet_class"] == "UNet2DModel"
    layers = manifest["layers"]
    assert layers and all(r["weight_bits"] == 8 for r in layers.values())
    # pqcad's first/last policy: conv_in and conv_out keep float inputs, every other layer A8
    assert {n for n, r in layers.items() if r["act_bits"] is None} == {"conv_in", "conv_out"}
    assert all(r["act_bits"] == 8 for n, r in layers.items() if n not in ("conv_in", "conv_out"))
    assert manifest["options"]["preset"] == "fast"
    summary = builtin.outputs["compress"]
    assert summary.startswith(f"wrote {builtin.artifact} (pqcad W8A8, {len(manifest['layers'])} quantized layers, "
                              "distilled to 5 steps (guard kept the ")
    assert " dB before distillation, " in summary
    report = json.loads((builtin.artifact / "report.json").read_text())
    assert report["act_scale_check"]["kept"] in ("learned", "initial") and report["distillation"]["losses"]
    # the report records the settings compress ran with: the fixture's test-size fast preset
    from pqcad_deploy.presets import preset_to_dict

    assert report["preset_settings"] == json.loads(json.dumps(preset_to_dict(fast_preset_at_test_size())))
    assert len(report["distillation"]["losses"]) == 10
    guard = report["distillation"]["guard"]
    assert guard["kept"] in ("distilled", "undistilled") and guard["reference_steps"] == 10
    assert f"guard kept the {guard['kept']} student: PSNR vs FP-10 {guard['psnr_distilled_db']:.2f} dB" in summary
    assert [p.name for p in builtin.root.iterdir() if p.name.startswith(".")] == []


def test_compress_guard_fid_without_weights_stops_before_any_work(tmp_path: Path, monkeypatch) -> None:
    """--guard fid needs the Inception weights at the end of every CAD round: missing ones are one error
    line at the start, and no output (nor its lock) is left behind."""
    monkeypatch.setenv("PQCAD_FID_WEIGHTS", str(tmp_path / "no_weights.pt"))
    out = tmp_path / "art"
    result = run_main("compress", "--out", out, "--preset", "fast", "--teacher-steps", "4", "--guard", "fid")
    assert result.code == 1
    assert_one_error_line(result.err, "PQCAD_FID_WEIGHTS", "no_weights.pt", "not a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_export_writes_our_onnx_and_reports_parity(builtin: Pipeline) -> None:
    manifest = onnx_manifest(builtin.onnx)
    assert manifest["format"] == "pqcad-onnx" and manifest["precision"] == "w8a8"
    assert manifest["image_shape"] == [1, 32, 32] and len(manifest["student_timesteps"]) == 5
    layers = len(json.loads((builtin.artifact / "artifact.json").read_text())["layers"])
    assert manifest["weight_bits"] == {"8": layers}
    lines = builtin.outputs["export"].splitlines()
    assert lines[0].startswith(f"wrote {builtin.onnx} (w8a8, opset 17, {layers} Q/DQ layers, target ort-qlinear, "
                               "Conv output scales calibrated in ")
    assert lines[1] == ("target onnxruntime: ort-qlinear (every quantized layer has 8-bit activations: QLinearConv "
                        "kernels; for --backend tensorrt export with --target tensorrt)")
    assert len(lines) == 3 and lines[2].startswith("parity vs PyTorch: pass (")


def test_export_w4a4_default_target_is_qdq(small_unet_dir: Path, tmp_path: Path) -> None:
    """ONNX Runtime has no 4-bit kernels: the default target falls back to qdq, and says so."""
    art = tmp_path / "A"
    assert run_main("compress", "--model", small_unet_dir, "--weight-bits", 4, "--act-bits", 4, *FAST,
                    "--out", art).code == 0
    result = run_main("export", art, "--onnx", tmp_path / "M.onnx", "--opset", 21)
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[1].startswith("target onnxruntime: qdq (") and "4-bit activations" in lines[1]
    assert lines[2].startswith("parity vs PyTorch: pass (")


def _break_export(monkeypatch) -> None:
    """An export bug: one layer's activation scale is written 1.5x too large."""
    import pqcad_deploy.converters.export_onnx as export_module
    from onnx import numpy_helper

    tidy = export_module._tidy_graph

    def broken(model, layer_bits):
        tidy(model, layer_bits)
        init = next(i for i in model.graph.initializer if i.name.endswith(".act_scale") and "down_blocks" in i.name)
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.5), init.name))
    monkeypatch.setattr(export_module, "_tidy_graph", broken)


def test_export_parity_gate(small: Pipeline, tmp_path: Path, monkeypatch) -> None:
    _break_export(monkeypatch)
    out = tmp_path / "M.onnx"
    refused = run_main("export", small.artifact, "--onnx", out, "--target", "qdq")
    line = assert_failed(refused, "parity vs PyTorch failed: ", "of its codes", "threshold 1e-03",
                         "--no-parity-gate", code=1)
    assert "M.onnx was not written" in line and refused.out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    written = run_main("export", small.artifact, "--onnx", out, "--target", "qdq", "--no-parity-gate")
    assert written.code == 0, written.err
    assert written.out.splitlines()[1].startswith("parity vs PyTorch: fail (")
    assert written.err.startswith("warning: ") and "--no-parity-gate" in written.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["M.onnx"]
    skipped = run_main("export", small.artifact, "--onnx", out, "--target", "qdq", "--no-parity", "--overwrite")
    assert skipped.code == 0 and "parity vs PyTorch" not in skipped.out


def test_export_choices_match_the_converter() -> None:
    """cli.py writes export's choices out (converters imports torch; build-engine must not)."""
    from pqcad_deploy.converters.export_onnx import DEFAULT_TARGET, TARGETS, WEIGHT_STORAGES
    from pqcad_deploy.engines.build import OPTIMIZATION_LEVELS

    assert cli._EXPORT_TARGETS == TARGETS and cli._WEIGHT_STORAGES == WEIGHT_STORAGES
    assert cli.export.params[[p.name for p in cli.export.params].index("target")].default == DEFAULT_TARGET
    assert set(cli._PORTABLE_LEVELS) < set(OPTIMIZATION_LEVELS)


@pytest.mark.parametrize("args, fragments", [
    (["--opset", "12"], ["--opset", "12 is not in the range 13<=x<=21"]),
    (["--opset", "22"], ["--opset", "22"]),
    (["--target", "trt"], ["--target", "'trt'", "'onnxruntime'"]),
    (["--weight-storage", "int2"], ["--weight-storage", "'int2'"]),
])
def test_export_bad_choices_are_usage_errors(small: Pipeline, outdir: Path, args, fragments) -> None:
    result = run_main("export", small.artifact, "--onnx", outdir / "M.onnx", *args)
    assert_failed(result, *fragments, code=2)
    assert_nothing_left(outdir, "M.onnx")


def test_build_engine_writes_a_verified_engine(builtin: Pipeline) -> None:
    assert sorted(p.name for p in builtin.engine.iterdir()) == [MARKER_FILE, "engine.json", "model.onnx"]
    engine = json.loads((builtin.engine / "engine.json").read_text())
    assert engine["format"] == "pqcad-engine" and engine["backend"] == "onnxruntime"
    assert engine["model_file"] == "model.onnx"
    assert engine["model_sha256"] == sha256(builtin.engine / "model.onnx")
    assert engine["source_onnx_sha256"] == sha256(builtin.onnx)
    assert engine["precision"] == "w8a8" and len(engine["student_timesteps"]) == 5
    assert builtin.outputs["build-engine"].startswith(
        f"wrote {builtin.engine} (onnxruntime, w8a8, 5 sampling steps")


def test_sample_writes_pngs_grid_and_npz(builtin: Pipeline) -> None:
    from PIL import Image

    names = sorted(p.name for p in builtin.images.iterdir())
    assert names == [MARKER_FILE] + [f"{i:05d}.png" for i in range(6)] + ["grid.png", "samples.json"]
    images = load_images(builtin.npz)
    assert images.dtype == np.uint8 and images.shape == (6, 32, 32, 1)
    for i in range(6):
        png = np.asarray(Image.open(builtin.images / f"{i:05d}.png"))
        np.testing.assert_array_equal(png.reshape(32, 32, 1), images[i])
    assert builtin.outputs["sample"].startswith(f"wrote 6 images to {builtin.images} (5 DDIM steps, ")
    assert builtin.outputs["sample"].rstrip().endswith(f"and {builtin.npz}")


def test_sampled_images_look_like_the_trained_model(builtin: Pipeline) -> None:
    images = load_images(builtin.npz).astype(np.float64)
    assert images.std() > 10, "images are (nearly) blank"
    for image in images:
        assert image.std() > 10, "an image is (nearly) constant"
    # Fashion-MNIST: a light garment on a dark background
    assert np.median(images) < 64
    assert 5 < images.mean() < 160


def test_sample_is_reproducible_per_seed(builtin: Pipeline, tmp_path: Path) -> None:
    again = run_main("sample", builtin.engine, "-n", 6, "--seed", 0, "-o", tmp_path / "O2",
                     "--npz", tmp_path / "O2.npz", "--quiet")
    assert again.code == 0, again.err
    np.testing.assert_array_equal(load_images(tmp_path / "O2.npz"), load_images(builtin.npz))
    other = run_main("sample", builtin.engine, "-n", 6, "--seed", 1, "-o", tmp_path / "O3",
                     "--npz", tmp_path / "O3.npz", "--quiet")
    assert other.code == 0, other.err
    assert not np.array_equal(load_images(tmp_path / "O3.npz"), load_images(builtin.npz))


def test_sample_steps_option(builtin: Pipeline, tmp_path: Path) -> None:
    result = run_main("sample", builtin.engine, "-n", 2, "--steps", 3, "-o", tmp_path / "O",
                      "--npz", tmp_path / "O.npz", "--quiet")
    assert result.code == 0, result.err
    assert "(3 DDIM steps" in result.out
    images = load_images(tmp_path / "O.npz")
    assert images.shape == (2, 32, 32, 1)
    # fewer steps is a different trajectory from the same noise
    assert not np.array_equal(images, load_images(builtin.npz)[:2])


def test_any_diffusers_directory_works(small: Pipeline) -> None:
    manifest = json.loads((small.artifact / "artifact.json").read_text())
    assert all(r["weight_bits"] == 4 and r["act_bits"] == 8 for r in manifest["layers"].values())
    assert "(minmax W4A8, " in small.outputs["compress"]
    assert onnx_manifest(small.onnx)["precision"] == "w4a8"
    assert "parity vs PyTorch" in small.outputs["export"]
    assert json.loads((small.engine / "engine.json").read_text())["precision"] == "w4a8"
    assert sorted(p.name for p in small.images.iterdir()) == [
        MARKER_FILE, "00000.png", "00001.png", "00002.png", "grid.png", "samples.json"]
    images = load_images(small.npz)
    assert images.shape == (3, 32, 32, 1) and images.dtype == np.uint8
    assert "wrote 3 images" in small.outputs["sample"] and "(10 DDIM steps" in small.outputs["sample"]


# ----------------------------------------------------------------------------------------- compress errors

@pytest.fixture
def outdir(tmp_path: Path) -> Path:
    """An empty directory for outputs that must not appear."""
    path = tmp_path / "out"
    path.mkdir()
    return path


def _not_a_unet2d(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["_class_name"] = "UNet2DConditionModel"
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _corrupt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "config.json").write_text('{"_class_name": "UNet2DModel", ')
    return dst


@pytest.mark.parametrize("make, fragments", [
    (lambda src, tmp: tmp / "nowhere", ("does not exist",)),
    (lambda src, tmp: _corrupt(src, tmp / "corrupt"), ("not valid JSON", "config.json")),
    (lambda src, tmp: _not_a_unet2d(src, tmp / "cond"), ("UNet2DConditionModel", "UNet2DModel")),
], ids=["missing", "corrupt-config", "not-unet2dmodel"])
def test_compress_refuses_bad_models(make, fragments, small_unet_dir: Path, tmp_path: Path, outdir: Path) -> None:
    model = make(small_unet_dir, tmp_path)
    result = run_main("compress", "--model", model, *FAST, "--out", outdir / "art")
    assert_failed(result, *fragments, code=1)
    assert_nothing_left(outdir, "art")


@pytest.mark.parametrize("args, fragments", [
    (["--weight-bits", "0"], ("--weight-bits", "8, 4", "0")),
    (["--weight-bits", "1"], ("--weight-bits", "8, 4", "1")),
    (["--weight-bits", "9"], ("--weight-bits", "8, 4", "9")),
    (["--weight-bits", "16"], ("--weight-bits", "8, 4", "16")),
    (["--act-bits", "9"], ("--act-bits", "8, 4", "9")),
    (["--weight-bits", "eight"], ("--weight-bits", "eight")),
    (["--method", "nope"], ("--method", "minmax", "'nope'")),
    (["--preset", "nope"], ("--preset", "fast, default", "'nope'")),
    (["--device", "nope"], ("--device", "cpu, cuda", "'nope'")),
    (["--distill", "--teacher-steps", "25"], ("halves the teacher's steps", "even", "25", "--no-distill")),
    (["--teacher-steps", "25"], ("distillation (on by default)", "even", "25", "--no-distill")),
    (["--teacher-steps", "1"], ("--teacher-steps", "[2, 1000]")),
    (["--weight-bits", "4", "--avg-weight-bits", "3.5"], ("--avg-weight-bits", "(4, 8]", "3.5")),
    (["--weight-bits", "4", "--avg-weight-bits", "nan"], ("--avg-weight-bits", "(4, 8]", "nan")),
    (["--avg-weight-bits", "4.5"], ("--avg-weight-bits needs --weight-bits 4",)),
    (["--weight-bits", "4", "--avg-weight-bits", "lots"], ("--avg-weight-bits", "lots")),
    (["--calibration-selection", "kcenter"], ("--calibration-selection", "none, density_diversity", "'kcenter'")),
    (["--calibration-selection", "density_diversity", "--calibration-oversample", "1"],
     ("--calibration-oversample", ">= 2", "1")),
    (["--calibration-oversample", "3"], ("--calibration-oversample", "--calibration-selection density_diversity")),
], ids=lambda v: "_".join(v) if isinstance(v, list) else None)
def test_compress_refuses_bad_options(args, fragments, outdir: Path) -> None:
    result = run_main("compress", *args, "--quiet", "--out", outdir / "art")
    assert_failed(result, *fragments)
    assert result.out == ""
    assert_nothing_left(outdir, "art")


def test_compress_refuses_a_budget_below_the_first_and_last_conv(small_unet_dir: Path, outdir: Path) -> None:
    result = run_main("compress", "--model", small_unet_dir, "--weight-bits", 4, "--avg-weight-bits", "4.0001",
                      *FAST, "--out", outdir / "art")
    assert_failed(result, "--avg-weight-bits 4.0001", "conv_in, conv_out", "pass at least", code=1)
    assert_nothing_left(outdir, "art")


def test_compress_mixed_precision_and_calibration_selection(small_unet_dir: Path, tmp_path: Path) -> None:
    art = tmp_path / "art"
    result = run_main("compress", "--model", small_unet_dir, "--weight-bits", 4, "--avg-weight-bits", "4.5",
                      "--calibration-selection", "density_diversity", "--calibration-oversample", 2, *FAST,
                      "--out", art)
    assert result.code == 0, result.err
    assert "W4A8 mixed to <= 4.5 average weight bits" in result.out
    manifest = json.loads((art / "artifact.json").read_text())
    assert manifest["options"]["avg_weight_bits"] == 4.5
    assert {r["weight_bits"] for r in manifest["layers"].values()} == {4, 8}
    assert (manifest["calibration"]["selection"], manifest["calibration"]["selection_oversample"]) == \
        ("density_diversity", 2)
    assert json.loads((art / "report.json").read_text())["mixed_precision"]["budget_avg_weight_bits"] == 4.5


def test_calibration_selection_keeps_the_methods_preset_calibration(monkeypatch, tmp_path: Path) -> None:
    """The flag changes only the selection: pqcad's preset keeps its normally distributed timesteps."""
    import pqcad_deploy.compress
    from pqcad_deploy.presets import PRESETS

    seen = []

    def fake_compress(config, out, **kwargs):
        seen.append(config)
        raise click.Abort()

    monkeypatch.setattr(pqcad_deploy.compress, "compress", fake_compress)
    run_main("compress", "--method", "pqcad", "--calibration-selection", "density_diversity", "--preset", "fast",
             "--out", tmp_path / "art")
    cal = seen[0].calibration
    assert (cal.selection, cal.selection_oversample, cal.timestep_sampling) == ("density_diversity", 4, "normal")
    assert cal.num_trajectories == PRESETS["fast"].calibration.num_trajectories


def test_compress_missing_model_through_the_console_script(outdir: Path) -> None:
    proc = run_script("compress", "--model", outdir / "nowhere", "--quiet", "--out", outdir / "art")
    assert_failed(proc, "does not exist", code=1)
    assert proc.stdout == ""
    assert_nothing_left(outdir, "art")


def test_missing_required_option_is_a_usage_error(outdir: Path) -> None:
    result = run_main("compress", "--preset", "fast")
    assert_failed(result, "--out", code=2)


# ----------------------------------------------------------------------------------------- build-engine errors

def _foreign_onnx(path: Path) -> Path:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "foreign", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_build_engine_refuses_a_foreign_onnx(tmp_path: Path, outdir: Path) -> None:
    result = run_main("build-engine", _foreign_onnx(tmp_path / "foreign.onnx"), "-o", outdir / "E")
    assert_failed(result, "foreign.onnx", "not an ONNX written by pqcad-deploy export", code=1)
    assert_nothing_left(outdir, "E")


def test_build_engine_refuses_a_file_that_is_not_onnx(tmp_path: Path, outdir: Path) -> None:
    path = tmp_path / "notes.onnx"
    path.write_bytes(bytes(range(256)) * 8)
    result = run_main("build-engine", path, "-o", outdir / "E")
    assert_failed(result, "notes.onnx", code=1)
    assert_nothing_left(outdir, "E")


def test_build_engine_refuses_a_missing_onnx(tmp_path: Path, outdir: Path) -> None:
    result = run_main("build-engine", tmp_path / "missing.onnx", "-o", outdir / "E")
    assert_failed(result, "missing.onnx", "does not exist", code=1)
    assert_nothing_left(outdir, "E")


def test_build_engine_tensorrt_not_installed(small: Pipeline, outdir: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here")
    proc = run_script("build-engine", small.onnx, "--backend", "tensorrt", "-o", outdir / "E")
    assert_failed(proc, "TensorRT is not installed", "--backend onnxruntime", code=1)
    assert proc.stdout == ""
    assert_nothing_left(outdir, "E")


def test_build_engine_tensorrt_refuses_an_onnx_runtime_target(builtin: Pipeline, outdir: Path) -> None:
    """README's main job exports for ONNX Runtime (ort-qlinear); TensorRT needs --target tensorrt, said before
    TensorRT is even looked for."""
    result = run_main("build-engine", builtin.onnx, "--backend", "tensorrt", "-o", outdir / "E")
    assert_failed(result, "--target ort-qlinear", "export it again with --target tensorrt", code=1)
    assert_nothing_left(outdir, "E")


def test_build_engine_unknown_backend(builtin: Pipeline, outdir: Path) -> None:
    proc = run_script("build-engine", builtin.onnx, "--backend", "nope", "-o", outdir / "E")
    assert_failed(proc, "--backend", "'onnxruntime', 'tensorrt'", "'nope'", code=2)
    assert_nothing_left(outdir, "E")


@pytest.mark.parametrize("level", ["turbo", "all", "disabled"])
def test_build_engine_unknown_optimization_level(level: str, builtin: Pipeline, outdir: Path) -> None:
    result = run_main("build-engine", builtin.onnx, "--optimization-level", level, "-o", outdir / "E")
    assert_failed(result, "--optimization-level", f"'{level}'", "'basic', 'extended'", code=2)
    assert_nothing_left(outdir, "E")


# ----------------------------------------------------------------------------------------- sample errors

def test_sample_refuses_a_directory_without_engine_json(builtin: Pipeline, outdir: Path) -> None:
    result = run_main("sample", builtin.artifact, "-n", 2, "-o", outdir / "O", "--quiet")
    assert_failed(result, "engine.json", "build-engine", code=1)
    assert_nothing_left(outdir, "O")


def test_sample_refuses_a_modified_engine(builtin: Pipeline, tmp_path: Path, outdir: Path) -> None:
    engine = tmp_path / "E"
    shutil.copytree(builtin.engine, engine)
    with open(engine / "model.onnx", "ab") as f:
        f.write(b"\0")
    proc = run_script("sample", engine, "-n", 2, "-o", outdir / "O", "--npz", outdir / "O.npz", "--quiet")
    assert_failed(proc, "model.onnx", "checksum", code=1)
    assert proc.stdout == ""
    assert_nothing_left(outdir, "O")
    assert_nothing_left(outdir, "O.npz")


@pytest.mark.parametrize("n", ["0", "-3"])
def test_sample_refuses_non_positive_counts(n: str, builtin: Pipeline, outdir: Path) -> None:
    proc = run_script("sample", builtin.engine, "-n", n, "-o", outdir / "O", "--quiet")
    assert_failed(proc, "-n", n, "x>=1", code=2)
    assert_nothing_left(outdir, "O")


def test_sample_unwritable_npz_leaves_no_image_directory(builtin: Pipeline, tmp_path: Path, outdir: Path) -> None:
    (tmp_path / "afile").write_text("x")
    result = run_main("sample", builtin.engine, "-n", 2, "-o", outdir / "O",
                      "--npz", tmp_path / "afile" / "O.npz", "--quiet")
    assert_failed(result, "afile", code=1)
    assert_nothing_left(outdir, "O")


def test_sample_existing_npz_needs_overwrite(builtin: Pipeline, outdir: Path) -> None:
    npz = outdir / "O.npz"
    npz.write_bytes(b"old contents")
    args = ["sample", builtin.engine, "-n", 2, "-o", outdir / "O", "--npz", npz, "--quiet"]
    refused = run_main(*args)
    assert_failed(refused, "O.npz", "--overwrite", code=1)
    assert npz.read_bytes() == b"old contents"
    assert_nothing_left(outdir, "O")
    not_ours = run_main(*args, "--overwrite")  # a file that is not our images npz is never replaced
    assert_failed(not_ours, "O.npz", "not written by pqcad-deploy", code=1)
    assert npz.read_bytes() == b"old contents"
    assert_nothing_left(outdir, "O")
    np.savez(npz, images=np.zeros((1, 32, 32, 1), np.uint8))  # an npz of ours (only 'images')
    replaced = run_main(*args, "--overwrite")
    assert replaced.code == 0, replaced.err
    np.testing.assert_array_equal(load_images(npz), load_images(builtin.npz)[:2])
    assert sorted(p.name for p in outdir.iterdir()) == ["O", "O.npz"]


# ----------------------------------------------------------------------------------------- unwritable outputs

def _unwritable_args(command: str, p: Pipeline, target: Path) -> list[object]:
    return {
        "compress": ["compress", *FAST, "--out", target],
        "export": ["export", p.artifact, "--onnx", target, "--no-parity", "--target", "qdq"],
        "build-engine": ["build-engine", p.onnx, "-o", target],
        "sample": ["sample", p.engine, "-n", 2, "-o", target, "--quiet"],
        "analyze": ["analyze", p.artifact, "--out", target, "-n", 1, "--sensitivity-steps", 1, "--quiet"],
    }[command]


@pytest.mark.parametrize("command", COMMANDS)
def test_unwritable_output_location(command: str, builtin: Pipeline, tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    result = run_main(*_unwritable_args(command, builtin, afile / "out"))
    assert_failed(result, "afile", code=1)
    assert afile.read_text() == "not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


# ----------------------------------------------------------------------------------------- --overwrite

def _existing(kind: str, path: Path) -> None:
    if kind == "file":
        path.write_bytes(b"old contents")
    else:
        path.mkdir()
        (path / "keep.txt").write_text("old contents")


def _untouched(kind: str, path: Path) -> bool:
    if kind == "file":
        return path.read_bytes() == b"old contents"
    return sorted(p.name for p in path.iterdir()) == ["keep.txt"] and (path / "keep.txt").read_text() == "old contents"


@pytest.mark.parametrize("command", COMMANDS)
def test_existing_output_needs_overwrite(command: str, small: Pipeline, small_unet_dir: Path, tmp_path: Path) -> None:
    """A user's own file or folder is never replaced, not even with --overwrite; the tool's own output is."""
    kind = "file" if command == "export" else "dir"
    target = tmp_path / ("M.onnx" if kind == "file" else "out")
    _existing(kind, target)
    args = {
        "compress": ["compress", "--model", small_unet_dir, *FAST, "--out", target],
        "export": ["export", small.artifact, "--onnx", target, "--no-parity", "--target", "qdq"],
        "build-engine": ["build-engine", small.onnx, "-o", target],
        "sample": ["sample", small.engine, "-n", 2, "-o", target, "--quiet"],
        "analyze": ["analyze", small.artifact, "--out", target, "-n", 1, "--sensitivity-steps", 1, "--quiet"],
    }[command]

    refused = run_main(*args)
    assert_failed(refused, "--overwrite", code=1)
    assert _untouched(kind, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]

    not_ours = run_main(*args, "--overwrite")
    assert_failed(not_ours, str(target), "not written by pqcad-deploy", code=1)
    assert _untouched(kind, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]

    if kind == "file":
        target.unlink()
    else:
        shutil.rmtree(target)
    first = run_main(*args)
    assert first.code == 0, first.err
    replaced = run_main(*args, "--overwrite")
    assert replaced.code == 0, replaced.err
    last_line = replaced.out.splitlines()[-1] if command == "analyze" else replaced.out  # analyze: summary first
    assert last_line.startswith(f"wrote {target}" if command != "sample" else "wrote 2 images")
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no temporary or old copies left
    contents = {
        "compress": {"artifact.json", "report.json", "student.safetensors", "teacher.safetensors"},
        "build-engine": {"engine.json", "model.onnx"},
        "sample": {"00000.png", "00001.png", "grid.png"},
        "analyze": {"analysis.json", "analysis.png"},
    }
    if kind == "file":
        assert onnx_manifest(target)["precision"] == "w4a8"
    else:
        assert contents[command] <= {p.name for p in target.iterdir()}
        assert (target / MARKER_FILE).is_file()


# ----------------------------------------------------------------------------------------- no torch at runtime

NO_TORCH = r"""
import json, sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is blocked by the test: {name}")
        return None

sys.meta_path.insert(0, Block())
sys.modules["torch"] = None
from pqcad_deploy.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
else:
    code = 0
sys.path.insert(0, "tests")
from _boundaries import is_pytorch_stage
loaded = sorted(k for k in sys.modules if is_pytorch_stage(k) and sys.modules[k] is not None)
print("LOADED=" + json.dumps(loaded))
sys.exit(code)
"""


def _run_without_torch(*args: object) -> tuple[subprocess.CompletedProcess, list[str]]:
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=ONE_THREAD_ENV)
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert last.startswith("LOADED="), proc.stdout + proc.stderr
    return proc, json.loads(last[len("LOADED="):])


def test_build_engine_and_sample_run_without_torch(builtin: Pipeline, tmp_path: Path) -> None:
    proc, loaded = _run_without_torch("build-engine", builtin.onnx, "-o", tmp_path / "E")
    assert proc.returncode == 0, proc.stderr
    assert loaded == []
    assert proc.stdout.startswith(f"wrote {tmp_path / 'E'} (onnxruntime, w8a8")
    assert sorted(p.name for p in (tmp_path / "E").iterdir()) == [MARKER_FILE, "engine.json", "model.onnx"]

    proc, loaded = _run_without_torch("sample", tmp_path / "E", "-n", 6, "--seed", 0, "-o", tmp_path / "O",
                                      "--npz", tmp_path / "O.npz", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert loaded == []
    assert proc.stdout.startswith(f"wrote 6 images to {tmp_path / 'O'} (5 DDIM steps")
    # the engine rebuilt without torch samples exactly what the fixture's engine sampled
    np.testing.assert_array_equal(load_images(tmp_path / "O.npz"), load_images(builtin.npz))


def test_sample_errors_without_torch(tmp_path: Path) -> None:
    proc, _ = _run_without_torch("sample", tmp_path, "-n", 2, "-o", tmp_path / "O", "--quiet")
    assert_failed(proc, "engine.json", code=1)
    assert not (tmp_path / "O").exists()


def test_version_option() -> None:
    result = run_main("--version")
    assert result.code == 0 and "0.1.0" in result.out
    assert os.path.basename(str(SCRIPT)) == "pqcad-deploy" and SCRIPT.exists()


@pytest.mark.parametrize("args, message", [
    (["--method", "minmax", "--timestep-mean", "0.3"],
     "Invalid value for --timestep-mean: only applies with normal timestep sampling"),
    (["--method", "pqcad", "--timestep-std", "0"], "--timestep-mean must be in [0, 1] and --timestep-std > 0; got 0.4, 0.0."),
    (["--method", "pqcad", "--timestep-sampling", "sideways"], "--timestep-sampling must be one of uniform, normal; got 'sideways'."),
    (["--method", "minmax", "--act-scale-init", "mse"], "--act-scale-init and --layer-loss apply to the learned methods"),
    (["--method", "minmax", "--layer-loss"], "--act-scale-init and --layer-loss apply to the learned methods"),
    (["--method", "brecq", "--act-scale-init", "p99"], "--act-scale-init must be one of minmax, percentile, mse; got 'p99'."),
])
def test_compress_refuses_bad_calibration_and_stage2_options(tmp_path, args, message):
    out = tmp_path / "art"
    outcome = run_main("compress", "--out", out, "--preset", "fast", *args)
    assert outcome.code != 0
    assert_one_error_line(outcome.err, message)
    assert not out.exists()


def test_compress_calibration_and_stage2_options_reach_the_artifact(tmp_path, small_unet_dir, monkeypatch):
    import dataclasses

    from pqcad_deploy.presets import PRESETS, CalibrationConfig, ReconstructionConfig

    # The options' way from the command line into the artifact is under test, not brecq's quality:
    # a few reconstruction iterations on a few calibration pairs run the same stages as the fast preset.
    monkeypatch.setitem(PRESETS, "fast", dataclasses.replace(
        PRESETS["fast"], calibration=CalibrationConfig(num_trajectories=2, timesteps_kept=3, batch_size=2),
        reconstruction=ReconstructionConfig(iters=6, act_iters=3, batch_size=4)))
    out = tmp_path / "art"
    outcome = run_main(
        "compress", "--model", small_unet_dir, "--out", out, "--preset", "fast", "--method", "brecq", "--no-distill",
        "--teacher-steps", "10", "--quiet", "--timestep-sampling", "normal", "--timestep-mean", "0.2",
        "--timestep-std", "0.1", "--act-scale-init", "percentile", "--layer-loss")
    assert outcome.code == 0, outcome.err
    options = json.loads((out / "artifact.json").read_text())["options"]
    assert options["act_scale_init"] == "percentile" and options["layer_loss"] is True
    assert options["calibration"]["timestep_sampling"] == "normal"
    assert (options["calibration"]["timestep_mean"], options["calibration"]["timestep_std"]) == (0.2, 0.1)
