"""Issue 12, item 2 and the missing-extras part of item 3: inputs validated up front, integrity checks.

Every refusal is one `error:` line on stderr, the right exit code (2 for usage, 1 otherwise) and no
output left behind. Cheap on purpose: the small UNets of tests/_unets.py, minmax --no-distill fast
compresses, hand-made tiny ONNX graphs for the engine checks.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pqcad_deploy import cli
from pqcad_deploy.engines.manifest import OnnxManifest, write_onnx_manifest

from test_cli import FAST, ONE_THREAD_ENV, ROOT  # noqa: E402 - tests/ is on sys.path (conftest)
from test_cli import run_main as _run_outcome  # noqa: E402

WEIGHTS = "diffusion_pytorch_model.safetensors"


# ----------------------------------------------------------------------------------------- helpers

def run_main(*args: object) -> tuple[int, str, str]:
    """test_cli.run_main (in-process, one torch thread) as (code, stdout, stderr)."""
    result = _run_outcome(*args)
    return result.code, result.out, result.err


def assert_refused(result: tuple[int, str, str] | subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    if isinstance(result, subprocess.CompletedProcess):
        rc, out, err = result.returncode, result.stdout, result.stderr
    else:
        rc, out, err = result
    assert rc == code, (rc, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def assert_nothing_left(parent: Path, name: str) -> None:
    assert not (parent / name).exists(), f"{parent / name} was created"
    leftovers = [p.name for p in parent.iterdir() if p.name.startswith(f".{name}")] if parent.is_dir() else []
    assert leftovers == [], leftovers


def _copy_model(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def _edit_weights(d: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(d / WEIGHTS))
    edit(state)
    save_file(state, str(d / WEIGHTS))


SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
             "beta_schedule": "linear", "clip_sample": True, "set_alpha_to_one": True, "steps_offset": 0,
             "prediction_type": "epsilon", "timestep_spacing": "leading"}


def tiny_onnx(path: Path, *, precision: str = "fp32", image_shape=(1, 8, 8), big: int = 0) -> Path:
    """out = sample + w[int(timestep)], with `big` float32 weights (the optimized model is that large too:
    the lookup depends on an input, so nothing is constant-folded away)."""
    c, h, w = image_shape
    nodes = [helper.make_node("Cast", ["timestep"], ["ti"], to=TensorProto.INT64),
             helper.make_node("Gather", ["w", "ti"], ["g"]),
             helper.make_node("Reshape", ["g", "shape4"], ["g4"]),
             helper.make_node("Add", ["sample", "g4"], ["noise_pred"])]
    weights = numpy_helper.from_array(np.full(max(big, 1000), 1e-9, np.float32), "w")
    shape4 = numpy_helper.from_array(np.array([-1, 1, 1, 1], np.int64), "shape4")
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch", c, h, w]),
         helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["batch"])],
        [helper.make_tensor_value_info("noise_pred", TensorProto.FLOAT, ["batch", c, h, w])], initializer=[weights, shape4])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    manifest = OnnxManifest(precision=precision, image_shape=tuple(image_shape), scheduler_config=SCHEDULER,
                            prediction_type="epsilon", teacher_steps=4,
                            student_timesteps=(750, 500, 250, 0), artifact_sha256="ab" * 32)
    onnx.save(write_onnx_manifest(model, manifest), str(path))
    return path


# ----------------------------------------------------------------------------------------- fixtures

@pytest.fixture
def outdir(tmp_path: Path) -> Path:
    d = tmp_path / "outputs"
    d.mkdir()
    return d


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, small_unet_dir) -> Path:
    """A minmax W8A8 artifact of the small UNet (seconds)."""
    art = tmp_path_factory.mktemp("art") / "A"
    code, _, err = run_main("compress", "--model", small_unet_dir, *FAST, "--out", art)
    assert code == 0, err
    return art


@pytest.fixture
def art_copy(artifact: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(artifact, tmp_path / "art"))


# ----------------------------------------------------------------------------------------- models

@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_compress_refuses_non_finite_weights_up_front(small_unet_dir, tmp_path, outdir, value):
    model = _copy_model(small_unet_dir, tmp_path / "m")

    def poison(state):
        key = sorted(state)[0]
        state[key].view(-1)[3] = value

    _edit_weights(model, poison)
    result = run_main("compress", "--model", model, *FAST, "--out", outdir / "art")
    assert_refused(result, 1, "has NaN or Inf in 1 weight tensor(s) (first: ", "use a finite checkpoint")
    assert result[1] == ""
    assert_nothing_left(outdir, "art")


@pytest.mark.parametrize("size, fragments", [
    (30, ("sample_size 30", "multiple of 4", "e.g. 28 or 32")),
    (7, ("sample_size 7", "multiple of 4", "e.g. 4 or 8")),
])
def test_compress_refuses_a_sample_size_the_unet_cannot_run(unet_dirs, tmp_path, outdir, size, fragments):
    """The builtin-like layout (two downsamplings): 30 and 7 fail deep in the UNet without the check."""
    model = _copy_model(unet_dirs["c3_32_attn2_scaleshift"], tmp_path / "m")
    cfg = json.loads((model / "config.json").read_text())
    cfg["sample_size"] = size
    (model / "config.json").write_text(json.dumps(cfg))
    result = run_main("compress", "--model", model, *FAST, "--out", outdir / "art")
    assert_refused(result, 1, *fragments, "set sample_size")
    assert_nothing_left(outdir, "art")


# ----------------------------------------------------------------------------------------- compress options

def test_compress_help_lists_the_choices():
    code, out, _ = run_main("compress", "--help")
    assert code == 0
    text = " ".join(out.split())
    for listed in ("[minmax|brecq|pqcad]", "[fast|default]", "[cpu|cuda]", "[w8-fp-input|w8a8|target]",
                   "[minmax|percentile|mse]", "[uniform|normal]", "[none|density_diversity]",
                   "--seed INTEGER RANGE"):
        assert listed in text, listed


def test_compress_choices_are_the_librarys_tuples():
    from pqcad_deploy import choices

    params = {p.name: p for p in cli.compress.params}
    for name, values in (("method", choices.METHODS), ("preset", choices.PRESETS), ("device", choices.DEVICES),
                         ("first_last", choices.FIRST_LAST_POLICIES), ("act_scale_init", choices.ACT_SCALE_INITS),
                         ("timestep_sampling", choices.TIMESTEP_SAMPLINGS),
                         ("calibration_selection", choices.CALIBRATION_SELECTIONS)):
        assert tuple(params[name].type.choices) == tuple(values), name


@pytest.mark.parametrize("args, fragments", [
    (["--method", "nope"], ("--method must be one of minmax, brecq, pqcad; got 'nope'.",)),
    (["--preset", "slow"], ("--preset must be one of fast, default; got 'slow'.",)),
    (["--device", "tpu"], ("--device must be one of cpu, cuda; got 'tpu'.",)),
    (["--first-last", "w4"], ("--first-last must be one of w8-fp-input, w8a8, target; got 'w4'.",)),
    (["--act-scale-init", "p99"], ("--act-scale-init must be one of minmax, percentile, mse; got 'p99'.",)),
    (["--timestep-sampling", "sideways"], ("--timestep-sampling must be one of uniform, normal; got 'sideways'.",)),
    (["--calibration-selection", "kcenter"], ("--calibration-selection must be one of none, density_diversity",)),
    (["--seed", "12345678901234567890123"], ("--seed", "12345678901234567890123", "0<=x<=4294967295")),
    (["--seed", "-1"], ("--seed", "-1", "0<=x<=4294967295")),
    (["--seed", "abc"], ("--seed", "'abc' is not a valid integer")),
    (["--teacher-steps", "0"], ("--teacher-steps", "x>=1")),
    (["--teacher-steps", "-5"], ("--teacher-steps", "x>=1")),
    (["--calibration-selection", "density_diversity", "--calibration-oversample", "0"],
     ("--calibration-oversample", "x>=1")),
], ids=lambda v: "_".join(v) if isinstance(v, list) else None)
def test_compress_bad_option_values_are_usage_errors(args, fragments, outdir):
    result = run_main("compress", *args, "--quiet", "--out", outdir / "art")
    assert_refused(result, 2, *fragments)
    assert result[1] == ""
    assert_nothing_left(outdir, "art")


# ----------------------------------------------------------------------------------------- artifacts

def _rerecord(path: Path) -> None:
    import hashlib

    m = json.loads((path / "artifact.json").read_text())
    m["files"] = {name: hashlib.sha256((path / name).read_bytes()).hexdigest() for name in m["files"]}
    (path / "artifact.json").write_text(json.dumps(m, sort_keys=True, indent=1))


def test_export_refuses_a_swapped_teacher(art_copy, unet_dirs, outdir):
    shutil.copyfile(unet_dirs["c1_28_attn2_scaleshift"] / WEIGHTS, art_copy / "teacher.safetensors")
    for extra in ([], ["--fp"]):
        result = run_main("export", art_copy, "--onnx", outdir / "m.onnx", "--no-parity", *extra)
        assert_refused(result, 1, f"{art_copy / 'teacher.safetensors'} does not match the sha256 recorded in "
                                  "artifact.json", "restore it or recompress")
        assert_nothing_left(outdir, "m.onnx")


@pytest.mark.parametrize("key, value, fragment", [
    ("conv_in.weight_scale", -0.01, "conv_in.weight_scale has 1 scale(s) that are not finite and > 0"),
    ("conv_in.weight_scale", 0.0, "conv_in.weight_scale has 1 scale(s) that are not finite and > 0"),
    ("conv_out.act_scale", float("inf"), "conv_out.act_scale has 1 scale(s) that are not finite and > 0"),
    ("conv_out.act_scale", -1.0, "conv_out.act_scale has 1 scale(s) that are not finite and > 0"),
    ("conv_in.weight_codes", 200, "conv_in.weight_codes lie in ["),
])
def test_export_refuses_bad_scales_and_codes(art_copy, outdir, key, value, fragment):
    """Even with the file hashes re-recorded (a bad compress, or a deliberate edit)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(art_copy / "student.safetensors"))
    t = tensors[key]
    if key.endswith("weight_codes"):
        t = t.to(dtype=__import__("torch").int16)
    t.view(-1)[0] = value
    tensors[key] = t
    save_file(tensors, str(art_copy / "student.safetensors"))
    _rerecord(art_copy)
    result = run_main("export", art_copy, "--onnx", outdir / "m.onnx", "--no-parity")
    assert_refused(result, 1, str(art_copy / "student.safetensors"), fragment, "recompress it")
    assert_nothing_left(outdir, "m.onnx")


def test_same_seed_same_artifact_bytes(artifact, small_unet_dir, tmp_path):
    """Every file, artifact.json included (no timestamp in the provenance)."""
    again = tmp_path / "B"
    code, _, err = run_main("compress", "--model", small_unet_dir, *FAST, "--out", again)
    assert code == 0, err
    names = sorted(p.name for p in artifact.iterdir())
    assert names == sorted(p.name for p in again.iterdir()) and "artifact.json" in names
    for name in names:
        assert (artifact / name).read_bytes() == (again / name).read_bytes(), name


# ----------------------------------------------------------------------------------------- engines

def test_build_engine_refuses_a_quantized_claim_on_a_float_graph(tmp_path, outdir):
    onnx_path = tiny_onnx(tmp_path / "lie.onnx", precision="w4a4")
    result = run_main("build-engine", onnx_path, "-o", outdir / "E")
    assert_refused(result, 1, str(onnx_path), "its manifest claims precision w4a4, but the graph has no "
                                              "QuantizeLinear / DequantizeLinear")
    assert_nothing_left(outdir, "E")


def test_sample_refuses_an_engine_json_whose_image_shape_was_edited(tmp_path, outdir):
    engine = tmp_path / "E"
    code, _, err = run_main("build-engine", tiny_onnx(tmp_path / "m.onnx"), "-o", engine)
    assert code == 0, err
    code, _, err = run_main("sample", engine, "-n", 2, "-o", outdir / "ok", "--quiet")
    assert code == 0, err
    data = json.loads((engine / "engine.json").read_text())
    data["image_shape"] = [1, 16, 16]
    (engine / "engine.json").write_text(json.dumps(data))
    result = run_main("sample", engine, "-n", 2, "-o", outdir / "O", "--quiet")
    assert_refused(result, 1, "the graph's 'sample' input has shape [?, 1, 8, 8], but engine.json claims "
                              "image_shape [1, 16, 16]")
    assert_nothing_left(outdir, "O")


def test_build_engine_on_a_full_disk_is_a_write_failure(tmp_path, full_disk):
    onnx_path = tiny_onnx(tmp_path / "big.onnx", big=100_000)  # 400 KB of weights, the disk holds 64 KB
    result = run_main("build-engine", onnx_path, "-o", full_disk / "E")
    line = assert_refused(result, 1, f"cannot write the engine to {full_disk / 'E'}",
                          "failed to save the optimized model", "although it loads the input ONNX fine",
                          "free space or choose another -o location")
    assert "check the export" not in line
    assert sorted(p.name for p in full_disk.iterdir()) == []


# ----------------------------------------------------------------------------------------- missing extras

NO_TORCH = r"""
import sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "diffusers"):
            raise ImportError(f"blocked by the test: {name}")
        return None

sys.meta_path.insert(0, Block())
sys.modules["torch"] = None
sys.modules["diffusers"] = None
from pqcad_deploy.cli import main
main(sys.argv[1:])
"""


def _run_without_torch(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TORCH, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=ONE_THREAD_ENV)


@pytest.mark.parametrize("verb, args", [
    ("compress", ["compress", "--preset", "fast", "--out", "{out}/art", "--quiet"]),
    ("export", ["export", "{art}", "--onnx", "{out}/m.onnx", "--target", "qdq"]),
    ("eval fid", ["eval", "fid", "builtin", "-n", "2", "--quiet"]),
])
def test_pytorch_verbs_name_the_extra_in_a_runtime_only_install(verb, args, artifact, outdir):
    proc = _run_without_torch(*(a.format(out=outdir, art=artifact) for a in args))
    assert_refused(proc, 1, f"error: {verb} needs the PyTorch stage, which is not installed",
                   "pip install 'pqcad-deploy[full]'")
    assert proc.stdout == ""
    assert list(outdir.iterdir()) == []
