"""`analyze`: where a student's error comes from, on its own DDIM trajectories (pqcad_deploy.analyze).

One small W8A8 artifact (minmax, no distillation, 10 steps) of the c1_32_attn1_default UNet for the
module; every run samples 1-2 images and measures sensitivity on 1-3 of the 10 timesteps (the
CLI run covers batching: 20 points in batches of 16 and 4).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_cli import FAST, assert_failed, assert_nothing_left, run_main  # tests/ is on sys.path (conftest)

from pqcad_deploy.engines._atomic import directory_kind
from pqcad_deploy import analyze
from pqcad_deploy.artifact import artifact_digest, load_artifact
from pqcad_deploy.quant.replace import quant_layers

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def artifact(small_unet_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("analyze") / "art"
    result = run_main("compress", "--model", small_unet_dir, *FAST, "--out", out)
    assert result.code == 0, result.err
    return out


def _finite_non_negative(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value >= 0.0


def test_measure_on_the_students_own_trajectories(artifact: Path) -> None:
    art = load_artifact(artifact)
    teacher, student = art.build_teacher(), art.build_student()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    data = analyze.measure(teacher, student, art.manifest, n=1, seed=5, batch_size=16, sensitivity_steps=3)

    # the teacher is restored: every layer was quantized and put back, hooks removed
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(not m._forward_pre_hooks for m in teacher.modules())

    timesteps = art.manifest.student_timesteps
    assert data["timesteps"] == timesteps and data["num_points"] == len(timesteps)
    assert [e["t"] for e in data["error_by_timestep"]] == timesteps
    for e in data["error_by_timestep"]:
        assert _finite_non_negative(e["rel_mse"]) and e["rel_mse"] > 0 and math.isfinite(e["sqnr_db"])
        assert e["sqnr_db"] == pytest.approx(-10 * math.log10(e["rel_mse"]))

    layers = quant_layers(student)
    assert set(data["layers"]) == set(layers) and layers
    for name, entry in data["layers"].items():
        record = art.manifest.layers[name]
        assert (entry["weight_bits"], entry["act_bits"]) == (record.weight_bits, record.act_bits)
        assert entry["kind"] in ("conv2d", "linear")
        assert _finite_non_negative(entry["weight_rel_mse"])
        assert entry["act_rel_mse"] is None if entry["act_bits"] is None else _finite_non_negative(entry["act_rel_mse"])
    weights = [data["layers"][nm]["weight_rel_mse"] for nm in data["ranking"]["weight"]]
    acts = [data["layers"][nm]["act_rel_mse"] for nm in data["ranking"]["activation"]]
    assert weights == sorted(weights, reverse=True) and len(weights) == len(layers)
    assert acts == sorted(acts, reverse=True) and max(acts) > 0 and max(weights) > 0
    # the signed mean shift of eps per image channel, and a ranking by its largest magnitude
    shifts = [data["layers"][nm]["max_abs_eps_mean_shift"] for nm in data["ranking"]["mean_shift"]]
    assert shifts == sorted(shifts, reverse=True) and len(shifts) == len(layers)
    for entry in data["layers"].values():
        assert len(entry["weight_eps_mean_shift"]) == art.manifest.image_shape[0]
        assert entry["max_abs_eps_mean_shift"] == max(abs(v) for v in entry["weight_eps_mean_shift"]
                                                      + (entry["act_eps_mean_shift"] or []))
    for key in ("overall", "all_weights_only", "all_activations_only"):
        assert _finite_non_negative(data[key]["rel_mse"]) and data[key]["rel_mse"] > 0

    channels = art.manifest.image_shape[0]
    assert [e["t"] for e in data["x0_channel_drift"]] == timesteps
    assert all(len(e["drift_255"]) == channels for e in data["x0_channel_drift"])
    final = data["final_channel_mean"]
    assert all(len(final[k]) == channels for k in ("student_255", "fp_255", "drift_255"))
    assert all(0.0 <= v <= 255.0 for v in final["student_255"] + final["fp_255"])
    assert final["drift_255"] == pytest.approx([s - f for s, f in zip(final["student_255"], final["fp_255"])])


def test_weight_sensitivity_is_zero_where_the_teacher_already_has_the_quantized_weights(artifact: Path) -> None:
    art = load_artifact(artifact)
    teacher, student = art.build_teacher(), art.build_student()
    layers = quant_layers(student)
    modules = dict(teacher.named_modules())
    with torch.no_grad():
        for name, layer in layers.items():
            modules[name].weight.copy_(layer.quantized_weight())
    data = analyze.measure(teacher, student, art.manifest, n=1, seed=5, batch_size=1, sensitivity_steps=2)
    timesteps = art.manifest.student_timesteps

    # the first point is the seeded noise itself: recompute its error directly (the same batch of 1)
    noise = torch.randn((1, *art.manifest.image_shape), generator=torch.Generator("cpu").manual_seed(5))
    t0 = torch.full((1,), timesteps[0], dtype=torch.float32)
    with torch.no_grad():
        e_fp = teacher(noise, t0).sample.double()
        e_st = student(noise, t0).sample.double()
    assert data["error_by_timestep"][0]["rel_mse"] == pytest.approx(
        float((e_st - e_fp).pow(2).sum() / e_fp.pow(2).sum()), rel=1e-9)

    assert len(data["sensitivity_timesteps"]) == 2 and data["sensitivity_points"] == 2
    assert data["sensitivity_timesteps"][0] == data["timesteps"][0]
    assert data["sensitivity_timesteps"][-1] == data["timesteps"][-1]
    assert all(entry["weight_rel_mse"] == 0.0 for entry in data["layers"].values())
    assert all(entry["weight_eps_mean_shift"] == [0.0] for entry in data["layers"].values())
    assert data["all_weights_only"] == {"rel_mse": 0.0, "sqnr_db": None, "eps_mean_shift": [0.0]}
    assert data["all_activations_only"]["rel_mse"] > 0  # the inputs are still quantized


def test_cli_writes_the_analysis_directory(artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "an"
    result = run_main("analyze", artifact, "--out", out, "-n", 2, "--seed", 3, "--quiet", "--sensitivity-steps", 2)
    assert result.code == 0, result.err
    assert "top 5 layers by weight sensitivity" in result.out and "worst timestep: t=" in result.out
    assert "final images, per-channel mean" in result.out and f"wrote {out}" in result.out

    text = (out / "analysis.json").read_text()
    data = json.loads(text)
    assert text == json.dumps(data, sort_keys=True, indent=1) + "\n"
    assert data["artifact_digest"] == artifact_digest(artifact) and data["artifact"] == str(artifact)
    assert (data["n"], data["seed"], data["timesteps"]) == (2, 3, load_artifact(artifact).manifest.student_timesteps)
    png = (out / "analysis.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    from PIL import Image

    with Image.open(out / "analysis.png") as image:
        image.verify()
    assert directory_kind(out) == "analysis"

    # --overwrite replaces an analysis only, never e.g. the artifact (tests/test_cli.py runs the rest of
    # the --overwrite contract for every command, analyze included)
    refused = run_main("analyze", artifact, "--out", artifact, "-n", 1, "--quiet", "--overwrite")
    assert_failed(refused, "artifact directory, not an analysis one", code=1)

    missing = run_main("analyze", tmp_path / "no_such_artifact", "--out", tmp_path / "never")
    assert_failed(missing, "no_such_artifact", "does not exist", code=1)
    assert_nothing_left(tmp_path, "never")


def test_a_failure_leaves_nothing(artifact: Path, tmp_path: Path, monkeypatch) -> None:
    def broken(data, path, top=20):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(analyze, "plot_analysis", broken)
    with pytest.raises(RuntimeError, match="plot failed"):
        analyze.analyze_artifact(artifact, tmp_path / "an", n=1, sensitivity_steps=1, progress=False)
    assert_nothing_left(tmp_path, "an")
