"""The distillation guard keeps whichever student samples closer to FP at the teacher's steps."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from pqcad_deploy.distill.guard import GuardConfig, guard_distillation


@pytest.fixture
def unet_and_scheduler(small_unet_dir):
    from pqcad_deploy.models import load_model

    loaded = load_model(str(small_unet_dir))
    return loaded.unet.eval(), loaded.scheduler_config


def _damaged(unet: torch.nn.Module) -> torch.nn.Module:
    """A copy whose output conv is perturbed: a student clearly worse than the FP model."""
    bad = copy.deepcopy(unet)
    with torch.no_grad():
        bad.conv_out.bias.add_(0.5)
    return bad


@pytest.mark.parametrize("distilled_is_damaged", [True, False])
def test_the_guard_keeps_the_student_closer_to_fp(unet_and_scheduler, distilled_is_damaged):
    fp, scheduler_config = unet_and_scheduler
    good, bad = copy.deepcopy(fp), _damaged(fp)
    distilled, undistilled = (bad, good) if distilled_is_damaged else (good, bad)
    kept, report = guard_distillation(fp, distilled, undistilled, scheduler_config, teacher_steps=4, student_steps=2,
                                      config=GuardConfig(images=2), seed=0, device="cpu")
    expected = "undistilled" if distilled_is_damaged else "distilled"
    assert report["kept"] == expected
    assert kept is (undistilled if distilled_is_damaged else distilled)
    worse, better = sorted((report["psnr_distilled_db"], report["psnr_undistilled_db"]))
    assert better > worse + 1.0, report  # the damage is visible in the PSNR, not a coin toss
    assert report["reference_steps"] == 4 and report["student_steps"] == 2


def test_the_guard_samples_on_the_students_grid(unet_and_scheduler):
    """It samples with K DDIM steps, which must be the distillation grid's student timesteps."""
    from pqcad_deploy.distill.grid import distill_grid
    from pqcad_deploy.schedule import ddim_timesteps

    _, scheduler_config = unet_and_scheduler
    for teacher_steps in (4, 20, 100):
        grid = distill_grid(scheduler_config, teacher_steps)
        assert list(grid.student) == ddim_timesteps(scheduler_config, teacher_steps // 2), teacher_steps


def test_a_later_round_records_its_psnr_against_the_original_teacher_too(unet_and_scheduler):
    """`also_against` measures both students against FP at other steps without changing the decision
    (distill_rounds passes a later round's own teacher steps); equal steps record nothing extra."""
    fp, scheduler_config = unet_and_scheduler
    good, bad = copy.deepcopy(fp), _damaged(fp)
    _, report = guard_distillation(fp, bad, good, scheduler_config, teacher_steps=4, student_steps=2,
                                   config=GuardConfig(images=2), seed=0, device="cpu", also_against=8)
    extra = report["also_against"]
    assert extra["reference_steps"] == 8 and report["reference_steps"] == 4
    assert report["kept"] == "undistilled"
    _, direct = guard_distillation(fp, bad, good, scheduler_config, teacher_steps=8, student_steps=2,
                                   config=GuardConfig(images=2), seed=0, device="cpu")
    assert extra["psnr_distilled_db"] == pytest.approx(direct["psnr_distilled_db"], abs=1e-9)
    assert extra["psnr_undistilled_db"] == pytest.approx(direct["psnr_undistilled_db"], abs=1e-9)
    assert extra["psnr_distilled_db"] != pytest.approx(report["psnr_distilled_db"], abs=1e-3)
    _, first = guard_distillation(fp, bad, good, scheduler_config, teacher_steps=4, student_steps=2,
                                  config=GuardConfig(images=2), seed=0, device="cpu", also_against=4)
    assert "also_against" not in first


def test_a_gain_within_the_checks_noise_keeps_the_undistilled_student(unet_and_scheduler):
    """The same model as both students: zero gain, so plain step halving stays (no coin toss for CAD)."""
    fp, scheduler_config = unet_and_scheduler
    distilled, undistilled = copy.deepcopy(fp), copy.deepcopy(fp)
    kept, report = guard_distillation(fp, distilled, undistilled, scheduler_config, teacher_steps=4, student_steps=2,
                                      config=GuardConfig(images=2), seed=0, device="cpu")
    assert report["kept"] == "undistilled" and kept is undistilled
    assert report["psnr_gain_db"] == 0.0 and report["psnr_gain_standard_error_db"] == 0.0


def test_the_paired_gain_needs_to_clear_min_z_standard_errors():
    """GPU round 2's failure: a 0.012 dB mean gain with per-image gains of both signs is noise."""
    from pqcad_deploy.distill.guard import paired_gain

    undistilled = np.array([30.0, 31.0, 29.0, 32.0])
    gain, error = paired_gain(undistilled + np.array([0.5, -0.45, 0.4, -0.4]), undistilled)
    assert gain == pytest.approx(0.0125) and error == pytest.approx(np.std([0.5, -0.45, 0.4, -0.4], ddof=1) / 2)
    assert not gain > 2.0 * error
    gain, error = paired_gain(undistilled + np.array([3.0, 2.5, 3.5, 2.8]), undistilled)
    assert gain == pytest.approx(2.95) and gain > 2.0 * error
    assert paired_gain(np.array([31.0]), np.array([30.0])) == (1.0, 0.0)


def test_the_fid_guard_judges_by_fid_against_fp_and_records_both(unet_and_scheduler, monkeypatch):
    """metric "fid": both students' FID against FP's images at the teacher steps (real Inception
    weights), the bootstrap error, the PSNR of the same images beside; the damaged student loses."""
    from pqcad_deploy.eval.inception import find_fid_weights
    from pqcad_deploy.errors import PqcadError

    try:
        find_fid_weights()
    except PqcadError as exc:
        pytest.skip(f"FID weights not installed: {exc}")
    fp, scheduler_config = unet_and_scheduler
    good, bad = copy.deepcopy(fp), _damaged(fp)
    config = GuardConfig(images=2, metric="fid", fid_images=12, fid_resamples=2)
    kept, report = guard_distillation(fp, good, bad, scheduler_config, teacher_steps=4, student_steps=2,
                                      config=config, seed=0, device="cpu")
    assert report["metric"] == "fid" and report["fid_images"] == 12 and report["fid_resamples"] == 2
    assert report["fid_gain"] == pytest.approx(report["fid_undistilled"] - report["fid_distilled"])
    assert report["fid_undistilled"] > report["fid_distilled"] + 10, report
    assert report["fid_gain"] > 2 * report["fid_gain_standard_error"] > 0, report
    assert report["kept"] == "distilled" and kept is good
    assert report["psnr_distilled_db"] > report["psnr_undistilled_db"] + 1.0


def test_auto_is_fid_on_a_gpu_with_the_weights_and_psnr_otherwise(tmp_path, monkeypatch):
    """--guard auto never fails for want of weights (it notes the fallback); --guard fid does, at once."""
    from pqcad_deploy.distill.guard import resolve_guard_metric
    from pqcad_deploy.eval.errors import WeightsNotFoundError

    weights = tmp_path / "default_1.pt"
    weights.write_bytes(b"the file's presence is what auto checks")
    monkeypatch.setenv("PQCAD_FID_WEIGHTS", str(weights))
    assert resolve_guard_metric("auto", "cuda") == ("fid", None)
    assert resolve_guard_metric("auto", "cpu") == ("psnr", None)
    assert resolve_guard_metric("psnr", "cuda") == ("psnr", None)
    assert resolve_guard_metric("fid", "cpu") == ("fid", None)
    monkeypatch.setenv("PQCAD_FID_WEIGHTS", str(tmp_path / "missing.pt"))
    metric, note = resolve_guard_metric("auto", "cuda")
    assert metric == "psnr" and "FID weights" in note and "missing.pt" in note
    with pytest.raises(WeightsNotFoundError, match="missing.pt"):
        resolve_guard_metric("fid", "cuda")
