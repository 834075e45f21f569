"""The CLI's error promise, swept: every bad input a user can give any verb ends as exactly one
`error: ...` line on stderr, exit 2 for bad usage and 1 otherwise, no traceback, and nothing left
behind (no output, no temporary sibling, no lock file; the inputs untouched).

Each row of CASES is one distinct bad input. The rows run in-process through `cli.main` (the
console script's own function) in a fresh working directory; a few that need a runtime-only
install run in a subprocess in tests/test_input_validation.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from test_cli import FAST, run_main  # tests/ is on sys.path (conftest)

HUGE_SEED = "12345678901234567890123"


@dataclass(frozen=True)
class Case:
    """One bad input: argv with {placeholders}, the exit code, fragments of the one error line."""

    id: str
    argv: tuple[str, ...]
    code: int
    fragments: tuple[str, ...] = ()
    setup: Callable[["Inputs", Path], None] | None = None
    """Makes the bad input inside the case's working directory before the run."""


@dataclass
class Inputs:
    """Good inputs made once per module; cases point at them or at broken copies."""

    model: Path
    artifact: Path
    onnx: Path
    engine: Path
    images: Path
    extra: dict[str, Path] = field(default_factory=dict)


def _run(argv: list[str]) -> tuple[int, str, str]:
    """test_cli.run_main (the console entry point in-process, one torch thread) as (code, stdout, stderr)."""
    result = run_main(*argv)
    return result.code, result.out, result.err


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, small_unet_dir: Path) -> Inputs:
    root = tmp_path_factory.mktemp("sweep")
    art, onnx_path, engine, images = root / "art", root / "m.onnx", root / "eng", root / "imgs"
    for argv in (["compress", "--model", str(small_unet_dir), *FAST, "--out", str(art)],
                 ["export", str(art), "--onnx", str(onnx_path), "--target", "qdq", "--no-parity"],
                 ["build-engine", str(onnx_path), "-o", str(engine)],
                 ["sample", str(engine), "-n", "2", "-o", str(images), "--quiet"]):
        code, _, err = _run(argv)
        assert code == 0, f"{argv[0]} failed: {err}"
    return Inputs(model=small_unet_dir, artifact=art, onnx=onnx_path, engine=engine, images=images)


# ------------------------------------------------------------------------------ broken inputs, made per case

def _copy(src: Path, dst: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy(src, dst)
    return dst


def _model_with(value: float) -> Callable[[Inputs, Path], None]:
    def make(i: Inputs, cwd: Path) -> None:
        import torch
        from safetensors.torch import load_file, save_file

        model = _copy(i.model, cwd / "badmodel")
        (weights,) = model.glob("*.safetensors")
        state = load_file(str(weights))
        name = sorted(state)[3]
        state[name] = state[name].clone()
        state[name].view(-1)[0] = torch.tensor(value)
        save_file(state, str(weights))
    return make


BUILTIN_MODEL = Path(__file__).resolve().parents[1] / "pqcad_deploy" / "builtin" / "fashion_mnist_ddpm"


def _model_config(base: Path | None = None, **changes) -> Callable[[Inputs, Path], None]:
    """A copy of the small test UNet (or of `base`) with config.json changed."""
    def make(i: Inputs, cwd: Path) -> None:
        model = _copy(base or i.model, cwd / "badmodel")
        config = json.loads((model / "config.json").read_text())
        config.update(changes)
        (model / "config.json").write_text(json.dumps(config))
    return make


def _broken_model_config(i: Inputs, cwd: Path) -> None:
    model = _copy(i.model, cwd / "badmodel")
    (model / "config.json").write_text("{not json")


def _users_folder(name: str) -> Callable[[Inputs, Path], None]:
    def make(i: Inputs, cwd: Path) -> None:
        (cwd / name).mkdir()
        (cwd / name / "notes.txt").write_text("mine")
    return make


def _users_file(name: str) -> Callable[[Inputs, Path], None]:
    def make(i: Inputs, cwd: Path) -> None:
        (cwd / name).write_text("mine")
    return make


def _artifact_with_teacher_of(other: str) -> Callable[[Inputs, Path], None]:
    def make(i: Inputs, cwd: Path) -> None:
        art = _copy(i.artifact, cwd / "badart")
        from safetensors.torch import load_file, save_file

        state = load_file(str(art / "teacher.safetensors"))
        key = sorted(state)[0]
        state[key] = state[key] + 1.0  # another model's weights, same shapes
        save_file(state, str(art / "teacher.safetensors"))
    return make


def _artifact_with_negative_scale(i: Inputs, cwd: Path) -> None:
    from safetensors.torch import load_file, save_file

    art = _copy(i.artifact, cwd / "badart")
    state = load_file(str(art / "student.safetensors"))
    key = next(k for k in sorted(state) if "scale" in k)
    state[key] = -state[key].abs()
    save_file(state, str(art / "student.safetensors"))
    _refresh_artifact_digests(art)


def _refresh_artifact_digests(art: Path) -> None:
    """Recompute artifact.json's per-file digests, so that the content check (not the digest) is what fails."""
    manifest = json.loads((art / "artifact.json").read_text())
    files = manifest.get("files")
    if isinstance(files, dict):
        for name in files:
            digest = hashlib.sha256((art / name).read_bytes()).hexdigest()
            files[name] = digest if isinstance(files[name], str) else {**files[name], "sha256": digest}
        (art / "artifact.json").write_text(json.dumps(manifest, sort_keys=True, indent=1))


def _artifact_json(text: str) -> Callable[[Inputs, Path], None]:
    def make(i: Inputs, cwd: Path) -> None:
        art = _copy(i.artifact, cwd / "badart")
        (art / "artifact.json").write_text(text)
    return make


def _artifact_without(name: str) -> Callable[[Inputs, Path], None]:
    def make(i: Inputs, cwd: Path) -> None:
        art = _copy(i.artifact, cwd / "badart")
        (art / name).unlink()
    return make


def _onnx_claiming(precision: str) -> Callable[[Inputs, Path], None]:
    """Our FP32 export whose manifest claims a quantized precision."""
    def make(i: Inputs, cwd: Path) -> None:
        import onnx

        code, _, err = _run(["export", str(i.artifact), "--onnx", str(cwd / "fp.onnx"), "--fp", "--no-parity"])
        assert code == 0, err
        model = onnx.load(str(cwd / "fp.onnx"))
        for prop in model.metadata_props:
            if prop.key == "pqcad.manifest":
                data = json.loads(prop.value)
                data["precision"] = precision
                prop.value = json.dumps(data, sort_keys=True)
        onnx.save(model, str(cwd / "bad.onnx"))
        (cwd / "fp.onnx").unlink()
    return make


def _foreign_onnx(i: Inputs, cwd: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(graph), str(cwd / "bad.onnx"))


def _text_file(name: str, text: str = "not what you think") -> Callable[[Inputs, Path], None]:
    def make(i: Inputs, cwd: Path) -> None:
        (cwd / name).write_text(text)
    return make


def _engine_edit(**changes) -> Callable[[Inputs, Path], None]:
    def make(i: Inputs, cwd: Path) -> None:
        engine = _copy(i.engine, cwd / "badeng")
        data = json.loads((engine / "engine.json").read_text())
        data.update(changes)
        (engine / "engine.json").write_text(json.dumps(data, sort_keys=True, indent=1))
    return make


def _engine_model_changed(i: Inputs, cwd: Path) -> None:
    engine = _copy(i.engine, cwd / "badeng")
    with open(engine / "model.onnx", "ab") as f:
        f.write(b"\0")


def _engine_without(name: str) -> Callable[[Inputs, Path], None]:
    def make(i: Inputs, cwd: Path) -> None:
        engine = _copy(i.engine, cwd / "badeng")
        (engine / name).unlink()
    return make


def _partial_samples(i: Inputs, cwd: Path) -> None:
    _copy(i.images, cwd / "imgs.partial")


def _empty_dir(name: str) -> Callable[[Inputs, Path], None]:
    def make(i: Inputs, cwd: Path) -> None:
        (cwd / name).mkdir()
    return make


def _both(*makers: Callable[[Inputs, Path], None]) -> Callable[[Inputs, Path], None]:
    def make(i: Inputs, cwd: Path) -> None:
        for m in makers:
            m(i, cwd)
    return make


# ------------------------------------------------------------------------------------------------ the table

C, A, O, E, I = "{model}", "{artifact}", "{onnx}", "{engine}", "{images}"  # noqa: E741
OUT = ("--out", "out")

CASES: list[Case] = [
    # the group
    Case("unknown-command", ("frobnicate",), 2, ("No such command",)),
    Case("compress-missing-out", ("compress",), 2, ("--out",)),
    Case("sample-missing-out", ("sample", E), 2, ("-o",)),
    Case("export-missing-onnx", ("export", A), 2, ("--onnx",)),
    # compress: option values
    Case("compress-method", ("compress", *OUT, "--method", "gptq"), 2, ("--method", "gptq")),
    Case("compress-preset", ("compress", *OUT, "--preset", "huge"), 2, ("--preset", "huge")),
    Case("compress-device", ("compress", *OUT, "--device", "tpu"), 2, ("--device", "tpu")),
    Case("compress-weight-bits", ("compress", *OUT, "--weight-bits", "3"), 2, ("--weight-bits",)),
    Case("compress-act-bits", ("compress", *OUT, "--act-bits", "16"), 2, ("--act-bits",)),
    Case("compress-teacher-steps-zero", ("compress", *OUT, "--teacher-steps", "0"), 2, ("--teacher-steps",)),
    Case("compress-teacher-steps-odd-distill", ("compress", *OUT, "--teacher-steps", "7"), 2, ("--teacher-steps",)),
    Case("compress-seed-negative", ("compress", *OUT, "--seed", "-1"), 2, ("--seed",)),
    Case("compress-seed-huge", ("compress", *OUT, "--seed", HUGE_SEED), 2, ("--seed",)),
    Case("compress-seed-text", ("compress", *OUT, "--seed", "abc"), 2, ("--seed",)),
    Case("compress-first-last", ("compress", *OUT, "--first-last", "none"), 2, ("--first-last",)),
    Case("compress-act-scale-init", ("compress", *OUT, "--act-scale-init", "max"), 2, ("--act-scale-init",)),
    Case("compress-precision-policy", ("compress", *OUT, "--precision-policy", "none"), 2, ("--precision-policy",)),
    Case("compress-keep-float-no-match", ("compress", *OUT, *FAST, "--keep-float", "no_such_layer*"), 1,
         ("--keep-float", "no_such_layer*", "conv_in")),
    Case("compress-bias-correction-data-alone", ("compress", *OUT, "--bias-correction-data", "student"), 2,
         ("--bias-correction-data", "--bias-correction")),
    Case("compress-rounds-indivisible-steps", ("compress", *OUT, "--rounds", "3"), 2,
         ("--rounds 3", "divisible by 8", "100")),
    Case("compress-rounds-without-distill", ("compress", *OUT, "--rounds", "2", "--no-distill"), 2,
         ("--rounds", "--no-distill")),
    Case("compress-guard-unknown", ("compress", *OUT, "--guard", "lpips"), 2, ("--guard", "psnr, fid", "lpips")),
    Case("compress-split-concat-unknown", ("compress", *OUT, "--split-concat", "conv2"), 2,
         ("--split-concat", "shortcut+conv1")),
    Case("compress-smoothquant-alpha-out-of-range", ("compress", *OUT, "--smoothquant-alpha", "1.5"), 2,
         ("--smoothquant-alpha", "(0, 1)")),
    Case("analyze-missing-artifact", ("analyze", "nowhere", "--out", "analysis"), 1, ("nowhere",)),
    Case("compress-timestep-sampling", ("compress", *OUT, "--timestep-sampling", "beta"), 2, ("--timestep-sampling",)),
    Case("compress-timestep-mean-uniform", ("compress", *OUT, "--method", "minmax", "--timestep-mean", "0.5"), 2,
         ("--timestep-mean",)),
    Case("compress-selection", ("compress", *OUT, "--calibration-selection", "random"), 2, ("--calibration-selection",)),
    Case("compress-oversample-alone", ("compress", *OUT, "--calibration-oversample", "3"), 2, ("--calibration-oversample",)),
    Case("compress-avg-bits-with-w8", ("compress", *OUT, "--avg-weight-bits", "5"), 2, ("--avg-weight-bits",)),
    Case("compress-avg-bits-range", ("compress", *OUT, "--weight-bits", "4", "--avg-weight-bits", "9"), 2,
         ("--avg-weight-bits",)),
    # compress: outputs
    Case("compress-out-empty", ("compress", "--out", "", *FAST), 1, ("current directory",)),
    Case("compress-out-dot", ("compress", "--out", ".", *FAST), 1, ("current directory",)),
    Case("compress-out-proc", ("compress", "--out", "/proc/pqcad-out", *FAST), 1, ("/proc",)),
    Case("compress-out-is-file", ("compress", *OUT, *FAST), 1, ("out", "not a directory"), _users_file("out")),
    Case("compress-out-users-folder", ("compress", *OUT, *FAST), 1, ("--overwrite",), _users_folder("out")),
    Case("compress-overwrite-users-folder", ("compress", *OUT, *FAST, "--overwrite"), 1, ("not written by pqcad-deploy",),
         _users_folder("out")),
    Case("compress-overwrite-engine-dir", ("compress", *OUT, *FAST, "--overwrite"), 1, ("engine",),
         lambda i, cwd: _copy(i.engine, cwd / "out") and None),
    # compress: models
    Case("compress-model-missing", ("compress", "--model", "nowhere", *OUT, *FAST), 1, ("nowhere",)),
    Case("compress-model-is-file", ("compress", "--model", "notes.txt", *OUT, *FAST), 1, ("notes.txt",),
         _text_file("notes.txt")),
    Case("compress-model-empty-dir", ("compress", "--model", "empty", *OUT, *FAST), 1, ("empty",), _empty_dir("empty")),
    Case("compress-model-bad-config", ("compress", "--model", "badmodel", *OUT, *FAST), 1, ("badmodel",),
         _broken_model_config),
    Case("compress-model-nan", ("compress", "--model", "badmodel", *OUT, *FAST), 1, ("NaN",), _model_with(float("nan"))),
    Case("compress-model-inf", ("compress", "--model", "badmodel", *OUT, *FAST), 1, ("Inf",), _model_with(float("inf"))),
    Case("compress-model-sample-size-30", ("compress", "--model", "badmodel", *OUT, *FAST), 1, ("sample_size", "30"),
         _model_config(BUILTIN_MODEL, sample_size=30)),
    Case("compress-model-sample-size-7", ("compress", "--model", "badmodel", *OUT, *FAST), 1, ("sample_size", "7"),
         _model_config(sample_size=7)),
    # export
    Case("export-artifact-missing", ("export", "nowhere", "--onnx", "m.onnx"), 1, ("nowhere",)),
    Case("export-artifact-not-artifact", ("export", "empty", "--onnx", "m.onnx"), 1, ("empty",), _empty_dir("empty")),
    Case("export-artifact-json-broken", ("export", "badart", "--onnx", "m.onnx"), 1, ("badart",), _artifact_json("{")),
    Case("export-artifact-json-foreign", ("export", "badart", "--onnx", "m.onnx"), 1, ("badart",),
         _artifact_json('{"format": "something-else"}')),
    Case("export-artifact-no-student", ("export", "badart", "--onnx", "m.onnx"), 1, ("student.safetensors",),
         _artifact_without("student.safetensors")),
    Case("export-artifact-teacher-swapped", ("export", "badart", "--onnx", "m.onnx", "--fp"), 1,
         ("teacher.safetensors",), _artifact_with_teacher_of("another")),
    Case("export-artifact-negative-scale", ("export", "badart", "--onnx", "m.onnx"), 1, ("scale",),
         _artifact_with_negative_scale),
    Case("export-opset-low", ("export", A, "--onnx", "m.onnx", "--opset", "12"), 2, ("--opset",)),
    Case("export-opset-high", ("export", A, "--onnx", "m.onnx", "--opset", "99"), 2, ("--opset",)),
    Case("export-target", ("export", A, "--onnx", "m.onnx", "--target", "tflite"), 2, ("--target",)),
    Case("export-weight-storage", ("export", A, "--onnx", "m.onnx", "--weight-storage", "int2"), 2, ("--weight-storage",)),
    Case("export-onnx-is-dir", ("export", A, "--onnx", "somedir"), 1, ("somedir", "directory"), _empty_dir("somedir")),
    Case("export-onnx-proc", ("export", A, "--onnx", "/proc/pqcad.onnx", "--no-parity"), 1, ("/proc",)),
    Case("export-onnx-empty", ("export", A, "--onnx", ""), 1, ("empty",)),
    Case("export-onnx-exists", ("export", A, "--onnx", "m.onnx"), 1, ("--overwrite",), _users_file("m.onnx")),
    Case("export-onnx-overwrite-users-file", ("export", A, "--onnx", "m.onnx", "--overwrite"), 1,
         ("not written by pqcad-deploy",), _users_file("m.onnx")),
    # build-engine
    Case("build-onnx-missing", ("build-engine", "nowhere.onnx", "-o", "eng"), 1, ("nowhere.onnx",)),
    Case("build-onnx-not-onnx", ("build-engine", "notes.txt", "-o", "eng"), 1, ("notes.txt",), _text_file("notes.txt")),
    Case("build-onnx-foreign", ("build-engine", "bad.onnx", "-o", "eng"), 1, ("bad.onnx",), _foreign_onnx),
    Case("build-onnx-claims-w4a4", ("build-engine", "bad.onnx", "-o", "eng"), 1, ("w4a4",), _onnx_claiming("w4a4")),
    Case("build-onnx-claims-w8a8", ("build-engine", "bad.onnx", "-o", "eng"), 1, ("w8a8",), _onnx_claiming("w8a8")),
    Case("build-backend", ("build-engine", O, "-o", "eng", "--backend", "openvino"), 2, ("--backend",)),
    Case("build-optimization-level-all", ("build-engine", O, "-o", "eng", "--optimization-level", "all"), 2,
         ("--optimization-level",)),
    Case("build-out-users-folder-overwrite", ("build-engine", O, "-o", "eng", "--overwrite"), 1,
         ("not written by pqcad-deploy",), _users_folder("eng")),
    Case("build-out-proc", ("build-engine", O, "-o", "/proc/pqcad-eng"), 1, ("/proc",)),
    Case("build-out-dot", ("build-engine", O, "-o", "."), 1, ("current directory",)),
    Case("build-out-is-file", ("build-engine", O, "-o", "eng"), 1, ("eng",), _users_file("eng")),
    # sample
    Case("sample-engine-missing", ("sample", "nowhere", "-o", "imgs"), 1, ("nowhere",)),
    Case("sample-engine-no-json", ("sample", "badeng", "-o", "imgs"), 1, ("engine.json",), _engine_without("engine.json")),
    Case("sample-engine-no-model", ("sample", "badeng", "-o", "imgs"), 1, ("model.onnx",), _engine_without("model.onnx")),
    Case("sample-engine-model-changed", ("sample", "badeng", "-o", "imgs"), 1, ("badeng",), _engine_model_changed),
    Case("sample-engine-image-shape-edited", ("sample", "badeng", "-o", "imgs", "-n", "2"), 1, ("image_shape",),
         _engine_edit(image_shape=[3, 30, 30])),
    Case("sample-engine-json-broken", ("sample", "badeng", "-o", "imgs"), 1, ("engine.json",),
         lambda i, cwd: (_copy(i.engine, cwd / "badeng") / "engine.json").write_text("{")),
    Case("sample-n-zero", ("sample", E, "-o", "imgs", "-n", "0"), 2, ("-n",)),
    Case("sample-n-negative", ("sample", E, "-o", "imgs", "-n", "-5"), 2, ("-n",)),
    Case("sample-seed-negative", ("sample", E, "-o", "imgs", "--seed", "-1"), 2, ("--seed",)),
    Case("sample-seed-huge", ("sample", E, "-o", "imgs", "--seed", HUGE_SEED), 2, ("--seed",)),
    Case("sample-steps-zero", ("sample", E, "-o", "imgs", "--steps", "0"), 2, ("--steps",)),
    Case("sample-steps-too-many", ("sample", E, "-o", "imgs", "--steps", "5000", "-n", "1"), 1, ("5000",)),
    Case("sample-batch-zero", ("sample", E, "-o", "imgs", "--batch-size", "0"), 2, ("--batch-size",)),
    Case("sample-threads-negative", ("sample", E, "-o", "imgs", "--threads", "-1"), 2, ("--threads",)),
    Case("sample-threads-zero", ("sample", E, "-o", "imgs", "--threads", "0"), 2, ("--threads",)),
    Case("sample-npz-is-dir", ("sample", E, "-o", "imgs", "-n", "1", "--npz", "somedir"), 1, ("somedir",),
         _empty_dir("somedir")),
    Case("sample-npz-proc", ("sample", E, "-o", "imgs", "-n", "1", "--npz", "/proc/pqcad.npz"), 1, ("/proc",)),
    Case("sample-npz-overwrite-users-file", ("sample", E, "-o", "imgs", "-n", "1", "--npz", "x.npz", "--overwrite"), 1,
         ("not written by pqcad-deploy",), _users_file("x.npz")),
    Case("sample-out-empty", ("sample", E, "-o", "", "-n", "1"), 1, ("current directory",)),
    Case("sample-out-proc", ("sample", E, "-o", "/proc/pqcad-imgs", "-n", "1"), 1, ("/proc",)),
    Case("sample-out-users-folder-overwrite", ("sample", E, "-o", "photos", "-n", "1", "--overwrite"), 1,
         ("not written by pqcad-deploy",), _users_folder("photos")),
    Case("sample-out-engine-dir-overwrite", ("sample", "eng", "-o", "eng", "-n", "1", "--overwrite"), 1, ("engine",),
         lambda i, cwd: _copy(i.engine, cwd / "eng") and None),
    Case("sample-partial-without-resume", ("sample", E, "-o", "imgs", "-n", "2"), 1, ("--resume",), _partial_samples),
    # eval fid
    Case("fid-source-missing", ("eval", "fid", "nowhere"), 1, ("nowhere",)),
    Case("fid-n-one", ("eval", "fid", I, "-n", "1"), 2, ("-n",)),
    Case("fid-steps-zero", ("eval", "fid", E, "--steps", "0"), 2, ("--steps",)),
    Case("fid-batch-zero", ("eval", "fid", I, "--batch-size", "0"), 2, ("--batch-size",)),
    Case("fid-device", ("eval", "fid", I, "--device", "tpu"), 2, ("--device",)),
    Case("fid-seed-negative", ("eval", "fid", E, "--seed", "-1"), 2, ("--seed",)),
    Case("fid-empty-folder", ("eval", "fid", "empty"), 1, ("empty",), _empty_dir("empty")),
    Case("fid-partial-folder", ("eval", "fid", "imgs.partial"), 1, ("imgs.partial",), _partial_samples),
    Case("fid-not-an-image-file", ("eval", "fid", "notes.txt"), 1, ("notes.txt",), _text_file("notes.txt")),
    Case("fid-ref-missing", ("eval", "fid", I, "--ref", "nowhere.npz"), 1, ("nowhere.npz",)),
    Case("fid-ref-not-stats", ("eval", "fid", I, "--ref", "notes.npz"), 1, ("notes.npz",), _text_file("notes.npz")),
    Case("fid-json-is-dir", ("eval", "fid", I, "--json", "somedir"), 1, ("somedir",), _empty_dir("somedir")),
    Case("fid-save-npz-proc", ("eval", "fid", I, "--save-npz", "/proc/pqcad.npz"), 1, ("/proc",)),
]


def _expand(argv: tuple[str, ...], i: Inputs) -> list[str]:
    values = {"{model}": i.model, "{artifact}": i.artifact, "{onnx}": i.onnx, "{engine}": i.engine,
              "{images}": i.images}
    return [str(values.get(a, a)) for a in argv]


def _tree(root: Path) -> dict[str, str]:
    """Every path under root with a digest of its bytes (directories as 'dir')."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_the_sweep_covers_at_least_sixty_distinct_inputs() -> None:
    assert len({c.id for c in CASES}) == len(CASES) >= 60
    verbs = {c.argv[0] if c.argv[0] != "eval" else "eval fid" for c in CASES}
    assert {"compress", "export", "build-engine", "sample", "eval fid"} <= verbs


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_error_line_and_leaves_nothing(case: Case, inputs: Inputs, tmp_path: Path,
                                                           monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    if case.setup is not None:
        case.setup(inputs, tmp_path)
    before, inputs_before = _tree(tmp_path), {p: _tree(p) for p in (inputs.artifact, inputs.engine, inputs.images)}
    onnx_before = hashlib.sha256(inputs.onnx.read_bytes()).hexdigest()

    code, _, err = _run(_expand(case.argv, inputs))

    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one 'error:' line, got:\n{err}"
    assert code == case.code, f"exit {code}, expected {case.code}: {lines[0]}"
    for fragment in case.fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert _tree(tmp_path) == before, "the run left or changed files in its working directory"
    assert {p: _tree(p) for p in inputs_before} == inputs_before
    assert hashlib.sha256(inputs.onnx.read_bytes()).hexdigest() == onnx_before


DISK_FULL_VERBS = {
    "compress": lambda i, d: ["compress", "--model", str(i.model), *FAST, "--out", str(d / "art")],
    "export": lambda i, d: ["export", str(i.artifact), "--onnx", str(d / "m.onnx"), "--target", "qdq", "--no-parity"],
    "build-engine": lambda i, d: ["build-engine", str(i.onnx), "-o", str(d / "eng")],
    "sample": lambda i, d: ["sample", str(i.engine), "-n", "4", "-o", str(d / "imgs"), "--quiet"],
    "eval fid --save-npz": lambda i, d: ["eval", "fid", str(i.images), "--save-npz", str(d / "x.npz"), "--quiet"],
}


@pytest.mark.parametrize("verb", list(DISK_FULL_VERBS))
def test_a_full_disk_gives_one_error_line_and_no_finished_looking_output(verb: str, inputs: Inputs, full_disk: Path,
                                                                         monkeypatch, tmp_path: Path) -> None:
    """The disk fills during the write (a 64 KiB tmpfs, all but 2 KiB taken by a filler file)."""
    monkeypatch.chdir(tmp_path)
    filler = full_disk / "filler"
    with open(filler, "wb") as f:
        with contextlib.suppress(OSError):
            f.write(b"\0" * (62 * 1024))
    code, _, err = _run(DISK_FULL_VERBS[verb](inputs, full_disk))
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and code == 1, (code, err)
    assert "space" in lines[0], lines[0]
    left = sorted(p.name for p in full_disk.iterdir())
    # only sample keeps its unfinished OUT.partial/ (no marker, refused by eval; --resume continues it)
    assert left in (["filler"], ["filler", "imgs.partial"]), left
    assert "imgs.partial" not in left or verb == "sample"
