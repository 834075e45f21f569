"""Class-conditional artifacts through export, build-engine and sample (issue 17), on the
class-conditional fixture UNet (tests/_pipelines.py: 10 classes and the null class 10).

The artifact is compressed once (min-max W8A8, no CAD, guided calibration at scale 2.5 with the null
class, the converters' 8-pair calibration set) and exported once per target; the tests read those.
The headline check: an --fp export sampled by the ONNX Runtime engine gives PyTorch's images
(pqcad_deploy.eval.pipeline_sampling.generate_images with the same conditioning) on the same noise, at
guidance 1 and 2.5.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from _cli_runner import run_cli
from _pipelines import NULL_CLASS, NUM_CLASSES
from pqcad_deploy.converters.export_onnx import export_onnx
from pqcad_deploy.converters.parity import parity_report
from pqcad_deploy.engines.manifest import read_onnx_manifest
from pqcad_deploy.engines.onnx_check import check_onnx
from test_export_onnx import assert_parity  # the tolerances every target is held to

SCALE = 2.5
ENTRY = {"kind": "class", "num_classes": NUM_CLASSES, "null_class": NULL_CLASS, "guidance_scale": SCALE}
TARGETS = ("qdq", "ort-x86", "ort-qlinear", "tensorrt")
IMAGE_LEVEL_TOL = 1
"""Engine vs PyTorch, per uint8 value (measured: at most 1 level, on 4 of 18,432 values at scale 1 and 21 at
2.5, ONNX Runtime's float sums against torch's on a value at a rounding boundary)."""
IMAGE_DIFFERING_TOL = 0.005
"""... on at most this share of the values."""


@pytest.fixture(scope="module")
def class_artifact(class_conditional_dir, tmp_path_factory):
    from pqcad_deploy.compress import compress
    from pqcad_deploy.config import CompressConfig
    from pqcad_deploy.presets import PRESETS, CalibrationConfig

    out = tmp_path_factory.mktemp("class_art") / "art"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PRESETS, "fast", dataclasses.replace(
            PRESETS["fast"], calibration=CalibrationConfig(num_trajectories=2, timesteps_kept=4, batch_size=2)))
        compress(CompressConfig(model=str(class_conditional_dir), method="minmax", distill=False, teacher_steps=6,
                                preset="fast", guidance_scale=SCALE, null_class=NULL_CLASS), out, progress=False)
    return out


@pytest.fixture(scope="module")
def exports(class_artifact, tmp_path_factory):
    """target -> ExportResult; 'fp' is the teacher (--fp, target qdq). The ONNX Runtime targets pass the
    parity gate (export raises otherwise); tensorrt's FP16 output parity is not gated on random weights
    (tests/converters/test_tensorrt_target.py says why)."""
    root = tmp_path_factory.mktemp("class_onnx")
    made = {t: export_onnx(class_artifact, root / f"{t}.onnx", target=t, parity=t != "tensorrt") for t in TARGETS}
    made["fp"] = export_onnx(class_artifact, root / "fp.onnx", fp=True)
    made["fp-tensorrt"] = export_onnx(class_artifact, root / "fp_tensorrt.onnx", fp=True, target="tensorrt")
    return made


def _inputs(path) -> list[tuple[str, int, list]]:
    graph = onnx.load(str(path)).graph
    return [(i.name, i.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim])
            for i in graph.input]


@pytest.mark.parametrize("target", [*TARGETS, "fp", "fp-tensorrt"])
def test_every_target_has_the_labels_input_with_a_dynamic_batch(exports, target: str) -> None:
    result = exports[target]
    assert _inputs(result.path) == [("sample", TensorProto.FLOAT, ["batch", 3, 32, 32]),
                                    ("timestep", TensorProto.FLOAT, ["batch"]),
                                    ("class_labels", TensorProto.INT64, ["batch"])]
    manifest = read_onnx_manifest(result.path)
    assert manifest.conditioning.to_dict() == ENTRY
    assert manifest.input_names == ("sample", "timestep", "class_labels")
    assert result.conditioning == manifest.conditioning
    if result.parity is not None:
        assert result.parity.passed, result.parity


def test_parity_feeds_the_labels_within_the_usual_tolerances(class_artifact, exports) -> None:
    report = parity_report(class_artifact, exports["qdq"].path, n=8, seed=1)
    assert_parity(report)
    assert len(report.sample_rel_errors) == 8


def test_the_tensorrt_form_passes_the_checker_and_fp16_keeps_the_labels(class_artifact, exports) -> None:
    """The tensorrt target's graphs have no checker error (class_labels is covered by the profile), and the
    FP16 teacher graph computes the labelled teacher's prediction (the class embedding in FP16)."""
    import onnxruntime as ort

    from pqcad_deploy.artifact import load_artifact

    for key in ("tensorrt", "fp-tensorrt"):
        assert [f for f in check_onnx(exports[key].path, "tensorrt") if f.severity == "error"] == []
    teacher = load_artifact(class_artifact).build_teacher()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([830.0, 498.0, 166.0, 0.0])
    labels = torch.tensor([0, 3, NULL_CLASS, 7])
    with torch.no_grad():
        reference = teacher(x, t, class_labels=labels).sample.numpy()
        other = teacher(x, t, class_labels=torch.tensor([1, 4, 0, 8])).sample.numpy()
    session = ort.InferenceSession(str(exports["fp-tensorrt"].path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"sample": x.numpy(), "timestep": t.numpy(), "class_labels": labels.numpy()})
    relative = np.linalg.norm(out - reference) / np.linalg.norm(reference)
    assert relative < 5e-3, relative  # measured 7.7e-4 (FP16)
    assert np.linalg.norm(other - reference) / np.linalg.norm(reference) > 100 * relative  # the labels matter


def test_the_engine_samples_pytorchs_images_with_and_without_guidance(class_artifact, exports, tmp_path) -> None:
    from pqcad_deploy.artifact import load_artifact
    from pqcad_deploy.conditioning import ClassConditioning
    from pqcad_deploy.engines.build import build_onnxruntime_engine
    from pqcad_deploy.engines.generate import open_runner
    from pqcad_deploy.engines.images import nchw_to_nhwc, to_uint8
    from pqcad_deploy.engines.sampler import denoise, sampling_timesteps
    from pqcad_deploy.eval.pipeline_sampling import generate_images

    art = load_artifact(class_artifact)
    teacher = art.build_teacher()
    build_onnxruntime_engine(exports["fp"].path, tmp_path / "engine")
    runner, engine = open_runner(tmp_path / "engine", threads=1)
    n, seed = 6, 3
    # generate_images' noise: image i from torch.Generator().manual_seed(seed + i)
    noise = torch.cat([torch.randn((1, 3, 32, 32), generator=torch.Generator("cpu").manual_seed(seed + i))
                       for i in range(n)]).numpy()
    images = {}
    for scale in (1.0, SCALE):
        theirs = generate_images(teacher, art.manifest.scheduler_config, n, art.manifest.teacher_steps, seed=seed,
                                 batch_size=n, progress=False,
                                 conditioning=ClassConditioning(NUM_CLASSES, NULL_CLASS, scale)).images
        conditions = engine.onnx.conditioning.sample_conditions(guidance_scale=scale)  # image i: class i % 10
        x, _ = denoise(runner, engine.onnx, noise.copy(), sampling_timesteps(engine.onnx), batch_size=4,
                       progress=False, conditions=conditions)
        ours = nchw_to_nhwc(to_uint8(x))
        difference = np.abs(ours.astype(int) - theirs.astype(int))
        print(f"scale {scale}: max {difference.max()} levels, {(difference > 0).sum()} of {difference.size} values")
        assert difference.max() <= IMAGE_LEVEL_TOL
        assert (difference > 0).mean() <= IMAGE_DIFFERING_TOL
        images[scale] = ours
    assert np.abs(images[1.0].astype(int) - images[SCALE].astype(int)).max() > 20  # guidance changed the images


def test_export_build_engine_and_sample_from_the_cli(class_artifact, exports, tmp_path) -> None:
    onnx_path = tmp_path / "m.onnx"
    exported = run_cli("export", class_artifact, "--onnx", onnx_path, "--target", "qdq", "--no-parity")
    assert exported.code == 0, exported.err
    assert f"class-conditional: 10 classes, null class 10, guidance scale {SCALE:g}, " in exported.out
    built = run_cli("build-engine", onnx_path, "-o", tmp_path / "engine")
    assert built.code == 0, built.err
    assert "class-conditional: 10 classes, null class 10, guidance scale 2.5" in built.out
    assert json.loads((tmp_path / "engine" / "engine.json").read_text())["conditioning"] == ENTRY
    for out, batch in (("a", "16"), ("b", "2")):  # guided calls of 8 and 2 images: the same bytes
        sampled = run_cli("sample", tmp_path / "engine", "-n", "3", "--class", "4,9", "-o", tmp_path / out, "--quiet",
                          "--batch-size", batch)
        assert sampled.code == 0, sampled.err
        assert "classes 4,9 cycled, guidance scale 2.5" in sampled.out
    for i in range(3):
        assert (tmp_path / "a" / f"{i:05d}.png").read_bytes() == (tmp_path / "b" / f"{i:05d}.png").read_bytes()
    wrong = run_cli("sample", tmp_path / "engine", "-n", "3", "--class", "11", "-o", tmp_path / "c")
    assert (wrong.code, wrong.err) == (1, "error: --class labels must be classes of this model, 0 .. 9; got 11.\n")
