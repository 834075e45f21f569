"""Class-conditional engines, torch-free (issue 17): the manifest's conditioning entry, the runner's input
check, the TensorRT profile, sample's --class / --guidance-scale, the guided loop against
engines.guidance.guided_ddim, and the static checker, on a tiny hand-made class-conditional ONNX.

The tiny model is ``out = 0.5 sample + 0.001 t + table[class_labels]`` (one value per label, broadcast
over the image), so each label moves the image by a known amount and guidance's arithmetic is exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from _cli_runner import run_cli
from pqcad_deploy.engines.build import build_onnxruntime_engine
from pqcad_deploy.engines.conditioning import (ClassConditioningSpec, conditioning_from_dict, sample_conditions)
from pqcad_deploy.engines.ddim import DDIMSampler
from pqcad_deploy.engines.errors import ConfigError, ManifestError, OutputError, RunnerError
from pqcad_deploy.engines.generate import generate_to_directory
from pqcad_deploy.engines.guidance import Guidance, guided_ddim
from pqcad_deploy.engines.manifest import (EngineManifest, OnnxManifest, read_engine_manifest, read_onnx_manifest,
                                           write_onnx_manifest)
from pqcad_deploy.engines.onnx_check import check_onnx
from pqcad_deploy.engines.ort import OnnxRuntimeRunner
from pqcad_deploy.engines.sampler import denoise, initial_noise, sample_images, sampling_timesteps
from pqcad_deploy.engines.tensorrt_options import TensorRTBuildOptions, trtexec_command

NUM_CLASSES, NULL_CLASS = 10, 10
TABLE = np.arange(NUM_CLASSES + 1, dtype=np.float32) * np.float32(0.1)  # label c adds 0.1 c; the null row 1.0
CLASS_ENTRY = {"kind": "class", "num_classes": NUM_CLASSES, "null_class": NULL_CLASS, "guidance_scale": 2.0}


def _class_model(label_input: str = "class_labels", label_type: int = TensorProto.INT64,
                 extra_input: str | None = None) -> onnx.ModelProto:
    c, h, w = 3, 8, 8
    nodes = [
        helper.make_node("Mul", ["sample", "half"], ["scaled"]),
        helper.make_node("Reshape", ["timestep", "shape4"], ["t4"]),
        helper.make_node("Mul", ["t4", "milli"], ["tscaled"]),
        helper.make_node("Add", ["scaled", "tscaled"], ["xt"]),
        helper.make_node("Cast", [label_input], ["labels64"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "labels64"], ["emb"]),
        helper.make_node("Reshape", ["emb", "shape4"], ["emb4"]),
        helper.make_node("Add", ["xt", "emb4"], ["noise_pred"]),
    ]
    inputs = [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch", c, h, w]),
              helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["batch"]),
              helper.make_tensor_value_info(label_input, label_type, ["batch"])]
    if extra_input is not None:  # a stray input nothing reads
        inputs.append(helper.make_tensor_value_info(extra_input, TensorProto.FLOAT, ["batch", 4]))
    graph = helper.make_graph(
        nodes, "tiny_class", inputs,
        [helper.make_tensor_value_info("noise_pred", TensorProto.FLOAT, ["batch", c, h, w])],
        initializer=[helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
                     helper.make_tensor("milli", TensorProto.FLOAT, [], [0.001]),
                     helper.make_tensor("shape4", TensorProto.INT64, [4], [-1, 1, 1, 1]),
                     helper.make_tensor("table", TensorProto.FLOAT, [len(TABLE)], TABLE.tolist())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def class_manifest(make_manifest):
    def make(entry: dict | None = CLASS_ENTRY) -> OnnxManifest:
        return make_manifest(image_shape=(3, 8, 8), conditioning=entry)
    return make


@pytest.fixture
def class_onnx(tmp_path: Path, class_manifest):
    def make(entry: dict | None = CLASS_ENTRY, name: str = "class.onnx", **model_kw) -> Path:
        path = tmp_path / name
        onnx.save(write_onnx_manifest(_class_model(**model_kw), class_manifest(entry)), str(path))
        return path
    return make


@pytest.fixture
def class_engine(class_onnx, tmp_path: Path):
    def make(entry: dict | None = CLASS_ENTRY, name: str = "engine") -> Path:
        build_onnxruntime_engine(class_onnx(entry, name=f"{name}.onnx"), tmp_path / name)
        return tmp_path / name
    return make


# ----------------------------------------------------------------------------------------- manifests
def test_the_manifest_records_the_conditioning_and_its_graph_input(class_manifest, make_manifest) -> None:
    m = class_manifest()
    assert m.conditioning == ClassConditioningSpec(num_classes=10, null_class=10, guidance_scale=2.0)
    assert m.input_names == ("sample", "timestep", "class_labels")
    assert [(i.name, i.dtype, i.dims) for i in m.graph_inputs] == [
        ("sample", "float32", (3, 8, 8)), ("timestep", "float32", ()), ("class_labels", "int64", ())]
    data = json.loads(m.to_json())
    assert data["conditioning"] == CLASS_ENTRY
    assert OnnxManifest.from_json(m.to_json()) == m
    # unconditional manifests have no conditioning key, and one without it (written before) is unconditional
    plain = make_manifest()
    assert "conditioning" not in plain.to_dict() and plain.conditioning is None
    assert plain.input_names == ("sample", "timestep")
    assert OnnxManifest.from_dict(plain.to_dict()).conditioning is None


def test_engine_json_carries_the_conditioning(class_engine) -> None:
    engine = class_engine()
    data = json.loads((engine / "engine.json").read_text())
    assert data["conditioning"] == CLASS_ENTRY
    assert read_engine_manifest(engine).onnx.conditioning.num_classes == 10
    assert EngineManifest.from_json((engine / "engine.json").read_text()) == read_engine_manifest(engine)


@pytest.mark.parametrize("entry, message", [
    ({**CLASS_ENTRY, "kind": "prompt"}, "the manifest's conditioning kind 'prompt' is not one this runtime reads "
                                        "(class, embedding); upgrade pqcad-deploy or re-export the ONNX."),
    ({**CLASS_ENTRY, "labels": [1]}, "the manifest's class conditioning has unknown keys ['labels']; it was written "
                                     "by a different pqcad-deploy version: re-export the ONNX."),
    ({k: v for k, v in CLASS_ENTRY.items() if k != "null_class"},
     "the manifest's class conditioning lacks keys ['null_class']; it was written by a different pqcad-deploy "
     "version: re-export the ONNX."),
    ({**CLASS_ENTRY, "null_class": 3}, "Manifest field conditioning.null_class must be null or a label after the "
                                       "classes 0 .. 9, got 3."),
    ({**CLASS_ENTRY, "null_class": None}, "Manifest field conditioning.guidance_scale 2 needs a null_class (the "
                                          "unconditional half of guidance); got null."),
    ({**CLASS_ENTRY, "guidance_scale": 0.5}, "Manifest field conditioning.guidance_scale must be a finite number "
                                             ">= 1, got 0.5."),
    ({**CLASS_ENTRY, "num_classes": 0}, "Manifest field conditioning.num_classes must be a positive integer, got 0."),
    ("class", "the manifest's conditioning must be a JSON object, got 'class'."),
])
def test_a_bad_conditioning_entry_is_refused_with_the_file_named(entry, message, class_manifest) -> None:
    data = {**class_manifest().to_dict(), "conditioning": entry}
    with pytest.raises(ManifestError) as info:
        OnnxManifest.from_dict(data, source="model.onnx")
    assert str(info.value) == f"model.onnx: {message}"


def test_build_refuses_a_graph_whose_labels_are_not_int64(class_onnx, tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"the graph's 'class_labels' input is float32, but its manifest promises "
                                            r"int64 \[batch\]"):
        build_onnxruntime_engine(class_onnx(label_type=TensorProto.FLOAT), tmp_path / "e")
    with pytest.raises(ManifestError, match=r"the graph's inputs are \['class_labels', 'sample', 'timestep'\], but its "
                                            r"manifest promises \['sample', 'timestep'\]"):
        build_onnxruntime_engine(class_onnx(None), tmp_path / "e")  # a manifest that says unconditional


# ------------------------------------------------------------------------------- runner, TensorRT
def test_the_runner_feeds_int64_labels_and_refuses_others(class_onnx, class_manifest) -> None:
    runner = OnnxRuntimeRunner(class_onnx(), class_manifest())
    x = np.zeros((2, 3, 8, 8), np.float32)
    t = np.full((2,), 10.0, np.float32)
    with runner:
        out = runner.infer({"sample": x, "timestep": t, "class_labels": np.array([3, 10])})["noise_pred"]
        np.testing.assert_allclose(out[:, 0, 0, 0], [0.01 + 0.3, 0.01 + 1.0], rtol=1e-6)
        with pytest.raises(RunnerError, match=r"^Input 'class_labels' must be a int64 numpy array, got float32\.$"):
            runner.infer({"sample": x, "timestep": t, "class_labels": np.zeros(2, np.float32)})
        with pytest.raises(RunnerError, match=r"^Input 'class_labels' must have shape \[2\] \(one per sample\), "
                                              r"got \[3\]\.$"):
            runner.infer({"sample": x, "timestep": t, "class_labels": np.zeros(3, np.int64)})
        with pytest.raises(RunnerError, match=r"expects inputs \['class_labels', 'sample', 'timestep'\], got "
                                              r"\['sample', 'timestep'\]"):
            runner.infer({"sample": x, "timestep": t})


def test_the_tensorrt_profile_covers_the_labels_and_twice_the_batch_when_guiding() -> None:
    options = TensorRTBuildOptions(opt_batch=2, max_batch=4)
    guiding = conditioning_from_dict(CLASS_ENTRY)
    assert options.profile_shapes((3, 8, 8), guiding) == {
        "sample": ((1, 3, 8, 8), (4, 3, 8, 8), (8, 3, 8, 8)),
        "timestep": ((1,), (4,), (8,)),
        "class_labels": ((1,), (4,), (8,))}
    no_null = conditioning_from_dict({**CLASS_ENTRY, "null_class": None, "guidance_scale": 1})
    assert options.profile_shapes((3, 8, 8), no_null)["class_labels"] == ((1,), (2,), (4,))  # never doubled
    assert options.profile_shapes((3, 8, 8)) == {"sample": ((1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8)),
                                                 "timestep": ((1,), (2,), (4,))}


def test_trtexec_shapes_name_the_labels(class_manifest) -> None:
    line = trtexec_command("m.onnx", "eng", class_manifest(), TensorRTBuildOptions(opt_batch=8, max_batch=16))
    assert "--minShapes=sample:1x3x8x8,timestep:1,class_labels:1" in line
    assert "--optShapes=sample:16x3x8x8,timestep:16,class_labels:16" in line
    assert "--maxShapes=sample:32x3x8x8,timestep:32,class_labels:32" in line


# ------------------------------------------------------------------------------------- conditions
def test_sample_conditions_cycle_labels_and_check_them() -> None:
    spec = conditioning_from_dict(CLASS_ENTRY)
    default = sample_conditions(spec)
    assert default.conditions(np.arange(23)).tolist() == [i % 10 for i in range(23)]  # PyTorch's rule
    assert default.guidance.scale == 2.0 and default.null(3).tolist() == [10, 10, 10]
    assert default.describe() == "class i mod 10, guidance scale 2"
    picked = sample_conditions(spec, class_labels=[3, 5], guidance_scale=1.0)
    assert picked.conditions(np.arange(2, 7)).tolist() == [3, 5, 3, 5, 3]
    cond, uncond = picked.halves(np.arange(2))
    assert cond.tolist() == [3, 5] and uncond is None  # scale 1: no unconditional half, no doubled batch
    cond, uncond = default.halves(np.arange(2))
    assert cond.tolist() == [0, 1] and uncond.tolist() == [10, 10] and uncond.dtype == np.int64
    assert picked.to_record() == {"kind": "class", "class_labels": [3, 5], "guidance_scale": 1.0, "null_class": 10}
    cases = [
        (dict(class_labels=[3, 10]), "--class labels must be classes of this model, 0 .. 9; got 10; 10 is the null "
                                     "class, which guidance uses itself."),
        (dict(class_labels=[-1]), "--class labels must be classes of this model, 0 .. 9; got -1."),
        (dict(class_labels=[]), "--class needs at least one label (0 .. 9)."),
        (dict(guidance_scale=0.5), "--guidance-scale must be a finite number >= 1 (1 turns guidance off); got 0.5."),
    ]
    for choices, message in cases:
        with pytest.raises(ConfigError) as info:
            sample_conditions(spec, **choices)
        assert str(info.value) == message
    no_null = conditioning_from_dict({**CLASS_ENTRY, "null_class": None, "guidance_scale": 1})
    with pytest.raises(ConfigError) as info:
        sample_conditions(no_null, guidance_scale=3)
    assert str(info.value) == ("--guidance-scale 3 needs the model's null class (the unconditional half of guidance), "
                               "and this class-conditional engine has none (it was compressed without --null-class): "
                               "use --guidance-scale 1.")
    assert sample_conditions(None) is None
    with pytest.raises(ConfigError) as info:
        sample_conditions(None, class_labels=[1], guidance_scale=2.0)
    assert str(info.value) == ("--class and --guidance-scale apply to conditional engines; this engine's model is "
                               "unconditional: drop them.")


@pytest.mark.parametrize("scale", [1.0, 2.0, 3.5])
def test_the_sampling_loop_is_guided_ddim_on_the_engine(class_onnx, class_manifest, scale: float) -> None:
    """denoise's guided loop (padding, doubled batch, combine) equals engines.guidance.guided_ddim, which is
    pinned against diffusers (tests/engines/test_guidance.py), value for value."""
    m = class_manifest()
    runner = OnnxRuntimeRunner(class_onnx(), m)
    timesteps = sampling_timesteps(m)
    noise = initial_noise(5, m.image_shape, seed=4)
    conditions = sample_conditions(m.conditioning, class_labels=[7, 2, 9], guidance_scale=scale)
    labels = np.array([7, 2, 9, 7, 2])
    with runner:
        ours, _ = denoise(runner, m, noise.copy(), timesteps, batch_size=3, progress=False, conditions=conditions)

        def model(x, t, cond):
            return runner.infer({"sample": x, "timestep": np.full((len(x),), t, np.float32),
                                 "class_labels": cond})["noise_pred"]

        sampler = DDIMSampler({**m.scheduler_config, "prediction_type": "epsilon"})
        theirs = guided_ddim(model, sampler, timesteps, noise, labels, np.full(5, NULL_CLASS), Guidance(scale))
        unguided = guided_ddim(model, sampler, timesteps, noise, labels, None, Guidance(1.0))
    np.testing.assert_array_equal(ours, theirs)
    assert (np.abs(ours - unguided).max() > 0.1) == (scale > 1.0)  # the scale reached the loop


def test_images_do_not_depend_on_batch_size_and_default_to_class_i_mod_n(class_engine) -> None:
    from pqcad_deploy.engines.generate import open_runner

    runner, m = open_runner(class_engine(), threads=1)
    a = sample_images(runner, m, 11, seed=5, batch_size=4, progress=False).images
    b = sample_images(runner, m, 11, seed=5, batch_size=11, progress=False).images
    explicit = sample_conditions(m.onnx.conditioning, class_labels=list(range(10)))
    c = sample_images(runner, m, 11, seed=5, batch_size=16, progress=False, conditions=explicit).images
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)  # the default is class i % 10 at the manifest's scale
    other = sample_conditions(m.onnx.conditioning, class_labels=[9])
    d = sample_images(runner, m, 11, seed=5, batch_size=4, progress=False, conditions=other).images
    assert np.abs(a.astype(int) - d.astype(int)).max() > 20  # the label is fed: class 9 is brighter


# -------------------------------------------------------------------------------------------- CLI
def test_sample_cli_on_a_class_engine(class_engine, tmp_path: Path) -> None:
    engine = class_engine()
    first = run_cli("sample", engine, "-n", "5", "--seed", "2", "-o", tmp_path / "a", "--class", "3, 8",
                    "--guidance-scale", "1.5", "--quiet")
    assert first.code == 0, first.err
    assert "(4 DDIM steps, classes 3,8 cycled, guidance scale 1.5, " in first.out
    record = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert record["conditioning"] == {"kind": "class", "class_labels": [3, 8], "guidance_scale": 1.5,
                                      "null_class": 10}
    again = run_cli("sample", engine, "-n", "5", "--seed", "2", "-o", tmp_path / "b", "--class", "3,8",
                    "--guidance-scale", "1.5", "--quiet", "--batch-size", "2")
    assert again.code == 0, again.err
    for i in range(5):  # the same seeds give the same bytes
        assert (tmp_path / "a" / f"{i:05d}.png").read_bytes() == (tmp_path / "b" / f"{i:05d}.png").read_bytes()
    default = run_cli("sample", engine, "-n", "2", "-o", tmp_path / "c", "--quiet")
    assert default.code == 0 and "class i mod 10, guidance scale 2," in default.out
    assert json.loads((tmp_path / "c" / "samples.json").read_text())["conditioning"]["class_labels"] == list(range(10))


@pytest.mark.parametrize("args, code, message", [
    (("--class", "10"), 1, "--class labels must be classes of this model, 0 .. 9; got 10; 10 is the null class, "
                           "which guidance uses itself."),
    (("--class", "12"), 1, "--class labels must be classes of this model, 0 .. 9; got 12."),
    (("--class", "1,x"), 2, "Invalid value for --class: must be comma-separated integer labels like 3 or 0,4,7; "
                            "got '1,x'."),
    (("--guidance-scale", "0"), 1, "--guidance-scale must be a finite number >= 1 (1 turns guidance off); got 0.0."),
])
def test_sample_cli_refuses_bad_conditions_in_one_line(class_engine, tmp_path: Path, args, code: int,
                                                         message: str) -> None:
    result = run_cli("sample", class_engine(), "-n", "2", "-o", tmp_path / "out", *args)
    assert (result.code, result.err) == (code, f"error: {message}\n")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_sample_cli_refuses_conditions_the_engine_cannot_take(class_engine, make_tiny_onnx, tmp_path: Path) -> None:
    build_onnxruntime_engine(make_tiny_onnx(), tmp_path / "plain")
    result = run_cli("sample", tmp_path / "plain", "-n", "2", "-o", tmp_path / "out", "--class", "1")
    assert (result.code, result.err) == (1, "error: --class applies to conditional engines; this engine's model is "
                                            "unconditional: drop it.\n")
    result = run_cli("sample", tmp_path / "plain", "-n", "2", "-o", tmp_path / "out", "--guidance-scale", "2")
    assert result.err == ("error: --guidance-scale applies to conditional engines; this engine's model is "
                          "unconditional: drop it.\n")
    no_null = class_engine({**CLASS_ENTRY, "null_class": None, "guidance_scale": 1.0}, name="no_null")
    result = run_cli("sample", no_null, "-n", "2", "-o", tmp_path / "out", "--guidance-scale", "2")
    assert (result.code, result.err) == (1, "error: --guidance-scale 2 needs the model's null class (the unconditional "
                                            "half of guidance), and this class-conditional engine has none (it was "
                                            "compressed without --null-class): use --guidance-scale 1.\n")


def test_resume_needs_the_same_conditions(class_engine, tmp_path: Path) -> None:
    engine, out = class_engine(), tmp_path / "imgs"

    def stop(batch):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_to_directory(engine, out, 6, batch_size=2, progress=False, class_labels=[1, 2], on_batch=stop)
    with pytest.raises(OutputError, match=r"its conditioning \(class labels or prompts, guidance scale\) is "
                                          r"\{'class_labels': "
                                          r"\[1, 2\], .*this run's is \{.*'class_labels': \[1\],"):
        generate_to_directory(engine, out, 6, batch_size=2, progress=False, class_labels=[1], resume=True)
    done = generate_to_directory(engine, out, 6, batch_size=3, progress=False, class_labels=[1, 2], resume=True)
    whole = generate_to_directory(engine, tmp_path / "whole", 6, batch_size=6, progress=False, class_labels=[1, 2])
    assert done.reused == 2
    for i in range(6):
        assert (out / f"{i:05d}.png").read_bytes() == (tmp_path / "whole" / f"{i:05d}.png").read_bytes()
    assert whole.conditions.to_record()["class_labels"] == [1, 2]


# ----------------------------------------------------------------------------------------- checker
def test_the_checker_takes_class_labels_when_the_manifest_says_class(class_onnx) -> None:
    findings = check_onnx(class_onnx(), "tensorrt")
    assert [f for f in findings if f.rule == "trt-input-profile" or f.severity == "error"] == []
    stray = [f for f in check_onnx(class_onnx(name="stray.onnx", extra_input="mask"), "tensorrt")
             if f.rule == "trt-input-profile"]
    assert [(f.node, f.message) for f in stray] == [("mask", (
        "graph input 'mask' has a dynamic batch, but build-engine's TensorRT profile covers only sample, timestep and "
        "class_labels; export the model with only those inputs."))]
    unconditional = [f for f in check_onnx(class_onnx(None, name="plain.onnx"), "tensorrt")
                     if f.rule == "trt-input-profile"]
    assert [(f.node, f.message) for f in unconditional] == [("class_labels", (
        "graph input 'class_labels' has a dynamic batch, but build-engine's TensorRT profile covers only sample and "
        "timestep; export the model with only those inputs."))]
    assert read_onnx_manifest(class_onnx(name="again.onnx")).conditioning.kind == "class"


# --------------------------------------------------------------------------------- with TensorRT
TRT_SKIP = ("TensorRT cannot be installed in this workplace (registry packages are stubs that download from an "
            "unreachable host)")


@pytest.mark.tensorrt
def test_a_tensorrt_class_engine_guides_like_onnx_runtime(class_onnx, class_engine, tmp_path: Path) -> None:
    """Built for at most 8 images a call, the plan takes the sampler's guided calls of 16 rows (8 images,
    padded to MODEL_BATCH_MULTIPLE, twice: the profile doubles the batch); its guided images equal ONNX
    Runtime's to FP32 rounding."""
    try:
        import tensorrt  # noqa: F401
    except Exception:  # ImportError, or a wheel whose libraries do not load
        pytest.skip(TRT_SKIP)
    from pqcad_deploy.engines.generate import open_runner
    from pqcad_deploy.engines.tensorrt_build import build_tensorrt_engine

    m = build_tensorrt_engine(class_onnx(), tmp_path / "trt", opt_batch=8, max_batch=8)
    assert "--maxShapes=sample:16x3x8x8,timestep:16,class_labels:16" in m.tensorrt.trtexec_command
    trt_runner, trt_manifest = open_runner(tmp_path / "trt")
    ort_runner, ort_manifest = open_runner(class_engine())
    ours = sample_images(trt_runner, trt_manifest, 3, seed=1, batch_size=2, progress=False).images
    theirs = sample_images(ort_runner, ort_manifest, 3, seed=1, batch_size=2, progress=False).images
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1
    with pytest.raises(RunnerError, match=r"Batch 17 exceeds the engine's maximum batch 16; lower --batch-size "
                                          r"\(guidance runs each image twice per call\)"):
        with trt_runner:
            trt_runner.infer({"sample": np.zeros((17, 3, 8, 8), np.float32), "timestep": np.zeros(17, np.float32),
                              "class_labels": np.zeros(17, np.int64)})
