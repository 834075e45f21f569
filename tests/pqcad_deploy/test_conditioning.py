"""Class conditioning through the PyTorch stage (issue 17): guidance arithmetic, guided calibration
trajectories, the conditional sampler against diffusers' DDIMPipeline, and compress end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _cli_runner import run_cli  # tests/, on sys.path through tests/conftest.py
from _pipelines import NULL_CLASS, NUM_CLASSES
from pqcad_deploy.conditioning import (UNCONDITIONAL, ClassConditioning, class_labels_for, conditioning_of,
                                       guided_eps)
from pqcad_deploy.errors import ConfigError


@pytest.fixture(scope="module")
def class_dir(class_conditional_dir) -> Path:
    return class_conditional_dir


@pytest.fixture(scope="module")
def loaded(class_dir):
    from pqcad_deploy.models import load_model

    return load_model(str(class_dir))


def test_conditioning_of_reads_the_config_and_refuses_what_cannot_work() -> None:
    config = {"num_class_embeds": NUM_CLASSES + 1}
    assert conditioning_of({}) is UNCONDITIONAL
    assert conditioning_of(config) == ClassConditioning(num_classes=NUM_CLASSES + 1)  # no null: every label is a class
    guided = conditioning_of(config, guidance_scale=3.0, null_class=NULL_CLASS)
    assert guided == ClassConditioning(num_classes=NUM_CLASSES, null_class=NULL_CLASS, guidance_scale=3.0)
    assert guided.to_dict() == {"kind": "class", "num_classes": 10, "null_class": 10, "guidance_scale": 3.0}
    with pytest.raises(ConfigError, match=r"^--guidance-scale 3 needs the model's null class"):
        conditioning_of(config, guidance_scale=3.0)
    with pytest.raises(ConfigError, match=r"^--null-class 3: .* last label \(10, DiT's convention\)"):
        conditioning_of(config, null_class=3)
    with pytest.raises(ConfigError, match=r"^--null-class must be one of the model's 11 labels \(0 \.\. 10\); got 11"):
        conditioning_of(config, null_class=11)
    with pytest.raises(ConfigError, match=r"^--guidance-scale and --null-class apply to conditional models"):
        conditioning_of({}, guidance_scale=2.0)
    assert class_labels_for(torch.arange(23), 10).tolist() == [i % 10 for i in range(23)]


def test_guided_eps_is_diffusers_arithmetic_on_one_doubled_batch(loaded) -> None:
    unet = loaded.unet
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.full((3,), 400)
    cond = {"class_labels": torch.tensor([0, 4, 9])}
    with torch.no_grad():
        eps_c = unet(x, t, **cond).sample
        eps_u = unet(x, t, class_labels=torch.full((3,), NULL_CLASS)).sample
        guided = guided_eps(unet, x, t, cond, ClassConditioning(NUM_CLASSES, NULL_CLASS, 4.0))
        plain = guided_eps(unet, x, t, cond, ClassConditioning(NUM_CLASSES, NULL_CLASS, 1.0))
    torch.testing.assert_close(guided, eps_u + 4.0 * (eps_c - eps_u), rtol=1e-5, atol=1e-5)
    assert torch.equal(plain, eps_c)  # scale 1: one conditional call, no doubled batch
    assert float((guided - eps_c).abs().max()) > 1e-3


def test_the_conditional_sampler_is_ddimpipeline_with_the_class_passed(loaded) -> None:
    """Image i with class i % 10 equals diffusers' DDIMPipeline run on a UNet that always gets that class
    (the same seeded noise per image, the same step and conversion)."""
    from diffusers import DDIMPipeline, DDIMScheduler

    from pqcad_deploy.eval.pipeline_sampling import generate_images

    conditioning = ClassConditioning(NUM_CLASSES, NULL_CLASS, 1.0)
    ours = generate_images(loaded.unet, loaded.scheduler_config, 3, 4, seed=5, batch_size=3, progress=False,
                           conditioning=conditioning).images
    unet = loaded.unet
    forward = unet.forward
    for i in range(3):
        unet.forward = lambda sample, timestep, i=i, **kw: forward(  # the class reaches DDIMPipeline's calls
            sample, timestep, class_labels=torch.full((sample.shape[0],), i % NUM_CLASSES), **kw)
        try:
            pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(loaded.scheduler_config))
            pipe.set_progress_bar_config(disable=True)
            theirs = pipe(batch_size=1, generator=[torch.Generator("cpu").manual_seed(5 + i)], num_inference_steps=4,
                          eta=0.0, output_type="np").images
        finally:
            unet.forward = forward
        expected = (theirs.clip(0, 1) * 255).round().astype("uint8")[0]
        assert abs(ours[i].astype(int) - expected.astype(int)).max() <= 1, i


def test_guided_calibration_keeps_both_halves_of_every_guided_step(loaded) -> None:
    from pqcad_deploy.calibration.trajectories import collect_trajectory_calibration
    from pqcad_deploy.config import CalibrationConfig
    from pqcad_deploy.schedule import make_ddim_scheduler

    config = CalibrationConfig(num_trajectories=3, timesteps_kept=2, batch_size=3, timestep_sampling="uniform")
    scheduler = make_ddim_scheduler(loaded.scheduler_config, 4)
    guided = ClassConditioning(NUM_CLASSES, NULL_CLASS, 3.0)
    cal = collect_trajectory_calibration(loaded.unet, scheduler, (3, 32, 32), config, seed=0, progress=False,
                                         conditioning=guided)
    labels = cal.cond["class_labels"]
    assert len(cal) == 3 * 2 * 2 and labels.dtype == torch.int64
    # per kept step: the three trajectories' classes (j % 10), then the same x_t with the null class
    assert labels.tolist() == [0, 1, 2, NULL_CLASS, NULL_CLASS, NULL_CLASS] * 2
    assert torch.equal(cal.x[0:3], cal.x[3:6]) and cal.description["conditioning"] == guided.to_dict()
    # the last kept x_t is the guided trajectory's: rerun it by hand
    x = torch.cat([torch.randn((3, 3, 32, 32), generator=torch.Generator().manual_seed(0))])
    cond = {"class_labels": torch.tensor([0, 1, 2])}
    with torch.no_grad():
        for t in scheduler.timesteps[:-1]:
            x = scheduler.step(guided_eps(loaded.unet, x, torch.full((3,), float(t)), cond, guided), t, x,
                               eta=0.0).prev_sample
    torch.testing.assert_close(cal.x[6:9], x, rtol=1e-5, atol=1e-5)
    batches = list(cal.batches(5))
    assert [b[2]["class_labels"].tolist() for b in batches] == [[0, 1, 2, 10, 10], [10, 0, 1, 2, 10], [10, 10]]
    unguided = collect_trajectory_calibration(loaded.unet, scheduler, (3, 32, 32), config, seed=0, progress=False,
                                              conditioning=ClassConditioning(NUM_CLASSES, NULL_CLASS, 1.0))
    assert len(unguided) == 6 and unguided.cond["class_labels"].tolist() == [0, 1, 2] * 2


def test_compress_quantizes_a_class_conditional_model_with_guidance(class_dir, tmp_path) -> None:
    """The CLI, end to end: the guided calibration and the options are in the artifact, the student runs
    with class labels, and analyze measures it as it samples (guided, image i of class i % 10)."""
    from pqcad_deploy.artifact import load_artifact

    art = tmp_path / "art"
    result = run_cli("compress", "--model", class_dir, "--out", art, "--preset", "fast", "--teacher-steps", "6",
                     "--method", "minmax", "--no-distill", "--guidance-scale", "2.5", "--null-class", str(NULL_CLASS),
                     "--quiet")
    assert result.code == 0, result.err
    manifest = json.loads((art / "artifact.json").read_text())
    assert manifest["options"]["guidance_scale"] == 2.5 and manifest["options"]["null_class"] == NULL_CLASS
    assert manifest["calibration"]["conditioning"] == {"kind": "class", "num_classes": 10, "null_class": 10,
                                                       "guidance_scale": 2.5}
    report = json.loads((art / "report.json").read_text())
    assert report["noise_pred_sqnr_db"] > 10  # measured on guided pairs of both halves: 8-bit minmax is close
    student = load_artifact(art).build_student()
    with torch.no_grad():
        eps = student(torch.zeros(2, 3, 32, 32), torch.full((2,), 10), class_labels=torch.tensor([1, 10])).sample
    assert eps.shape == (2, 3, 32, 32)
    out = run_cli("analyze", art, "--out", tmp_path / "analysis", "-n", "2", "--sensitivity-steps", "1", "--quiet")
    assert out.code == 0, out.err
    analysis = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    assert 0 < analysis["overall"]["rel_mse"] < 0.05  # 8-bit minmax on guided pairs of both halves
    from pqcad_deploy.analyze import measure

    artifact = load_artifact(art)
    unguided = measure(artifact.build_teacher(like_student=True), artifact.build_student(), artifact.manifest, n=2,
                       sensitivity_steps=1, conditioning=ClassConditioning(NUM_CLASSES, NULL_CLASS, 1.0))
    # the guidance scale reaches the measurement: the same points measured unguided give another error
    assert unguided["overall"]["rel_mse"] != pytest.approx(analysis["overall"]["rel_mse"], rel=1e-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["analysis", "art"]


# ----------------------------------------------------------------------------- CAD with conditions
def test_the_x0_target_takes_two_diffusers_steps_on_the_pairs_own_branch(loaded) -> None:
    """teacher_target with a class (or the null class) per pair is two DDIMScheduler steps of the
    teacher called with that pair's label, the pairs of one batch each on their own branch."""
    from pqcad_deploy.distill.grid import distill_grid
    from pqcad_deploy.distill.target import DDIMCoefficients, teacher_target
    from pqcad_deploy.schedule import make_ddim_scheduler

    unet = loaded.unet.double()
    try:
        grid = distill_grid(loaded.scheduler_config, 6)
        coeffs = DDIMCoefficients.from_config(loaded.scheduler_config)
        t0 = grid.student[0]
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        labels = torch.tensor([3, NULL_CLASS])
        target, x_end = teacher_target(unet, x, torch.full((2,), t0), grid, coeffs, {"class_labels": labels})
        scheduler = make_ddim_scheduler(loaded.scheduler_config, 6)
        first, second = grid.teacher_path(t0)
        for row in range(2):
            xr, cls = x[row:row + 1], labels[row:row + 1]
            with torch.no_grad():
                for t in (first, second):
                    xr = scheduler.step(unet(xr, t, class_labels=cls).sample, t, xr, eta=0.0).prev_sample
            torch.testing.assert_close(x_end[row:row + 1], xr, rtol=0, atol=1e-6)  # as test_distill_target
        assert float((x_end[0] - x_end[1]).abs().max()) > 1e-6  # the label changed the steps
        assert target.shape == x.shape and bool(torch.isfinite(target).all())
    finally:
        loaded.unet.float()


def test_cdc_pairs_carry_their_trajectorys_class_or_the_null_class(loaded) -> None:
    from pqcad_deploy.distill.dc import collect_dc
    from pqcad_deploy.distill.grid import distill_grid
    from pqcad_deploy.distill.target import DDIMCoefficients
    from pqcad_deploy.presets import DCConfig

    grid = distill_grid(loaded.scheduler_config, 4)
    guided = ClassConditioning(NUM_CLASSES, NULL_CLASS, 2.0)
    for fresh in (False, True):
        dc = collect_dc(loaded.unet, loaded.scheduler_config, grid, (3, 32, 32),
                        DCConfig(size=40, fresh=fresh, seed=3), progress=False, conditioning=guided)
        labels = dc.cond["class_labels"]
        assert len(labels) == 40 and dc.description["conditioning"] == guided.to_dict()
        null = labels == NULL_CLASS
        assert 8 <= int(null.sum()) <= 32  # a seeded half of the pairs train the unconditional branch
        assert set(labels[~null].tolist()) <= set(range(dc.pool_cond["class_labels"].numel()))
        assert dc.pool_cond["class_labels"].tolist() == [j % NUM_CLASSES for j in range(len(dc.pool_cond["class_labels"]))]
    batch = dc.draw(64, torch.Generator().manual_seed(0), DDIMCoefficients.from_config(loaded.scheduler_config))
    drawn = batch.cond["class_labels"]
    assert drawn.shape == (64,) and 16 <= int((drawn == NULL_CLASS).sum()) <= 48
    again = dc.draw(64, torch.Generator().manual_seed(0), DDIMCoefficients.from_config(loaded.scheduler_config))
    assert torch.equal(again.cond["class_labels"], drawn) and torch.equal(again.x, batch.x)
    plain = collect_dc(loaded.unet, loaded.scheduler_config, grid, (3, 32, 32), DCConfig(size=40, fresh=True, seed=3),
                       progress=False, conditioning=ClassConditioning(NUM_CLASSES + 1))
    # no guidance: every pair keeps its trajectory's label (here 11 classes, 10 among them), none is replaced
    assert set(plain.cond["class_labels"].tolist()) <= set(range(NUM_CLASSES + 1))


def test_compress_distills_a_guided_class_conditional_model(class_dir, tmp_path, monkeypatch) -> None:
    """compress with CAD on the class-conditional fixture: guided C_DC, both branches, the guard sampling
    with the classes; the artifact samples on the halved grid. (10 iterations: the path is under test.)"""
    import dataclasses

    from pqcad_deploy.presets import PRESETS, DCConfig, DistillConfig

    monkeypatch.setitem(PRESETS, "fast", dataclasses.replace(
        PRESETS["fast"], dc=DCConfig(size=16), heldout=DCConfig(size=8),
        distill=DistillConfig(iters=10, batch_size=4, heldout_every=5), distill_checkpoint_every=5))
    art = tmp_path / "art"
    result = run_cli("compress", "--model", class_dir, "--out", art, "--preset", "fast", "--teacher-steps", "4",
                     "--method", "minmax", "--guidance-scale", "2", "--null-class", str(NULL_CLASS), "--quiet")
    assert result.code == 0, result.err
    manifest = json.loads((art / "artifact.json").read_text())
    assert manifest["options"]["distill"] and len(manifest["student_timesteps"]) == 2
    distillation = json.loads((art / "report.json").read_text())["distillation"]
    assert distillation["extra"]["dc"]["conditioning"] == {"kind": "class", "num_classes": 10, "null_class": 10,
                                                            "guidance_scale": 2.0}
    assert len(distillation["losses"]) == 10 and distillation["guard"]["kept"] in ("distilled", "undistilled")
    assert all(torch.isfinite(torch.tensor(loss)) for loss in distillation["losses"])
