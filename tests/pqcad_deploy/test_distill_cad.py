"""CAD training on a tiny UNet: the held-out loss falls, scales stay positive, codes stay in range,
and a resumed run equals an uninterrupted one bitwise."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from pqcad_deploy.calibration.trajectories import CalibrationSet
from pqcad_deploy.compress import uniform_plan
from pqcad_deploy.distill.cad import DistillConfig, compute_targets, distill, distill_loss
from pqcad_deploy.errors import ConfigError
from pqcad_deploy.distill.dc import DCConfig, collect_dc
from pqcad_deploy.distill.grid import distill_grid
from pqcad_deploy.distill.target import DDIMCoefficients
from pqcad_deploy.methods.minmax import minmax_quantize
from pqcad_deploy.models import load_model
from pqcad_deploy.quant import primitives as P
from pqcad_deploy.quant.replace import quant_layers

STEPS = 10


@pytest.fixture(scope="module")
def setup(small_unet_dir):
    fp = load_model(str(small_unet_dir))
    teacher = fp.unet.eval()
    cfg = fp.scheduler_config
    grid = distill_grid(cfg, STEPS)
    train = collect_dc(teacher, cfg, grid, (1, 32, 32), DCConfig(size=40, seed=0), progress=False)
    held_out = collect_dc(teacher, cfg, grid, (1, 32, 32), DCConfig(size=16, seed=1), progress=False)
    calib = CalibrationSet(x=train.x, t=train.t.float(), description={})
    student = minmax_quantize(teacher, uniform_plan(teacher, 4, 8), calib, batch_size=20, progress=False)
    return teacher, cfg, grid, train, held_out, student


def _held_out_loss(student, teacher, cfg, grid, held_out) -> float:
    coeffs = DDIMCoefficients.from_config(cfg)
    targets = compute_targets(teacher, held_out, grid, coeffs, batch_size=16)
    with torch.no_grad():
        return float(distill_loss(student, held_out.x, held_out.t, targets, coeffs))


def test_distillation_reduces_held_out_loss(setup):
    teacher, cfg, grid, train, held_out, student0 = setup
    student = copy.deepcopy(student0)
    teacher_before = copy.deepcopy(teacher.state_dict())
    before = _held_out_loss(student, teacher, cfg, grid, held_out)
    config = DistillConfig(iters=30, batch_size=8, lr=1e-3, rdd_weight=0.1)
    student, report = distill(student, teacher, cfg, STEPS, train, config, progress=False)
    after = _held_out_loss(student, teacher, cfg, grid, held_out)
    assert after < 0.8 * before, (before, after)
    assert len(report.losses) == 30 and report.seconds > 0 and report.config["iters"] == 30
    assert report.grid["student"] == list(grid.student)
    for key, value in teacher.state_dict().items():  # the teacher is never touched
        assert torch.equal(value, teacher_before[key]), key
    changed = False
    for name, layer in quant_layers(student).items():
        wq, aq = layer.weight_quantizer, layer.input_quantizer
        assert bool((wq.scale > 0).all()) and (not aq.quantizes or float(aq.scale) > 0), name
        codes = layer.weight_codes()
        assert int(codes.abs().max()) <= P.weight_qmax(wq.bits), name
        # what the artifact stores (codes * scale) is exactly what the student computes with
        assert torch.equal(P.dequantize_weight(codes, wq.scale.detach()), layer.quantized_weight().detach())
        ref = quant_layers(student0)[name]
        changed |= not torch.equal(codes, ref.weight_codes())
    assert changed  # training moved some integer codes
    assert not any(p.requires_grad for p in student.parameters())


def test_resume_equals_uninterrupted_run(setup):
    teacher, cfg, _, train, _, student0 = setup
    config = DistillConfig(iters=6, batch_size=4, lr=1e-3, checkpoint_every=3, rdd_weight=0.1)
    states: list[dict] = []
    full, full_report = distill(copy.deepcopy(student0), teacher, cfg, STEPS, train, config, progress=False,
                                on_checkpoint=states.append)
    assert [s["iteration"] for s in states] == [3, 6]
    resumed, resumed_report = distill(copy.deepcopy(student0), teacher, cfg, STEPS, train, config,
                                      progress=False, resume=states[0])
    assert resumed_report.resumed_from == 3
    assert resumed_report.losses == full_report.losses
    full_state, resumed_state = full.state_dict(), resumed.state_dict()
    assert full_state.keys() == resumed_state.keys()
    for key in full_state:
        assert torch.equal(full_state[key], resumed_state[key]), key


def test_compress_distill_carries_the_student_timesteps_to_the_sampler(small_unet_dir, tmp_path, monkeypatch):
    """compress --distill -> export -> build-engine -> sample runs the N/2 student steps with no flag."""
    import json

    from pqcad_deploy.converters.export_onnx import export_onnx
    from pqcad_deploy.engines.build import build_onnxruntime_engine
    from pqcad_deploy.engines.generate import open_runner
    from pqcad_deploy.engines.sampler import sample_images
    from pqcad_deploy.compress import compress
    from pqcad_deploy.config import CompressConfig
    from pqcad_deploy.distill.grid import distill_grid
    from pqcad_deploy.models import load_model
    from pqcad_deploy.presets import PRESETS

    # The path from compress to the sampler is under test, not how well CAD trains (the tests above train
    # it): 10 iterations on 16 pairs run every stage the fast preset's 100 do (C_DC, the held-out curve,
    # checkpoints, the guard) in a tenth of the time.
    monkeypatch.setitem(PRESETS, "fast", dataclasses.replace(
        PRESETS["fast"], dc=DCConfig(size=16), heldout=DCConfig(size=8),
        distill=DistillConfig(iters=10, batch_size=4, heldout_every=5), distill_checkpoint_every=5))
    art = tmp_path / "art"
    compress(CompressConfig(model=str(small_unet_dir), method="minmax", weight_bits=8, act_bits=8, teacher_steps=10,
                            preset="fast", distill=True), art, progress=False)
    manifest = json.loads((art / "artifact.json").read_text())
    expected = list(distill_grid(load_model(str(small_unet_dir)).scheduler_config, 10).student)
    assert manifest["options"]["distill"] is True and manifest["options"]["teacher_steps"] == 10
    assert len(expected) == 5 and manifest["student_timesteps"] == expected
    report = json.loads((art / "report.json").read_text())
    assert len(report["distillation"]["losses"]) == PRESETS["fast"].distill.iters  # the (patched) preset's
    guard = report["distillation"]["guard"]  # distill.guard ran on the fast preset's images and recorded both
    assert guard["config"] == {"images": 4, "min_z": 2.0, "metric": "psnr", "fid_images": 64, "fid_resamples": 10}
    assert guard["metric"] == "psnr" and guard["student_steps"] == 5
    assert guard["reference_steps"] == 10
    assert guard["psnr_gain_db"] == pytest.approx(guard["psnr_distilled_db"] - guard["psnr_undistilled_db"])
    clear_win = guard["psnr_gain_db"] > max(0.0, 2.0 * guard["psnr_gain_standard_error_db"])
    assert guard["kept"] == ("distilled" if clear_win else "undistilled")
    from PIL import Image

    with Image.open(art / "report.png") as image:  # minmax has no reconstruction: the CAD panel alone
        assert image.format == "PNG" and image.size == (1200, 400)

    onnx_path = tmp_path / "m.onnx"
    export_onnx(art, onnx_path)
    engine_dir = tmp_path / "engine"
    build_onnxruntime_engine(onnx_path, engine_dir)
    runner, engine_manifest = open_runner(engine_dir)
    assert list(engine_manifest.onnx.student_timesteps) == expected
    result = sample_images(runner, engine_manifest, n=2, seed=0, progress=False)
    assert list(result.timesteps) == expected and result.images.shape[0] == 2


def test_report_plot_stacks_reconstruction_and_distillation_panels(tmp_path):
    from PIL import Image

    from pqcad_deploy.report_plot import has_curves, plot_reconstruction_report

    report = {"method": "pqcad",
              "pq": {"weights": [{"name": "b0", "bits": 8, "losses": [1.0, 0.5, 0.4]},
                                 {"name": "b0", "bits": 4, "losses": [0.9, 0.6]}]},
              "distillation": {"losses": [float(v) for v in range(200, 0, -1)],
                               "heldout": [[0, 150.0], [100, 60.0], [200, 20.0]]}}
    assert has_curves(report) and has_curves({"distillation": {"losses": [1.0]}}) and not has_curves({})
    with Image.open(plot_reconstruction_report(report, tmp_path / "r.png")) as image:
        assert image.size == (1200, 800)


def test_learning_rate_schedule_warms_up_then_decays():
    config = DistillConfig(iters=10, warmup_iters=2, lr_decay="cosine")
    factors = [config.lr_factor(i) for i in range(10)]
    assert factors[:2] == [0.5, 1.0] and factors[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[2:], factors[3:])) and factors[-1] < 0.05
    assert DistillConfig(iters=10).lr_factor(7) == 1.0
    with pytest.raises(ConfigError, match="lr_decay"):
        DistillConfig(lr_decay="step")
    with pytest.raises(ConfigError, match="ema_decay"):
        DistillConfig(ema_decay=1.0)


def test_fresh_pairs_ema_and_schedule_resume_bitwise_and_report_the_held_out_curve(setup, small_unet_dir):
    teacher, cfg, grid, _, held_out, student0 = setup
    fresh = collect_dc(teacher, cfg, grid, (1, 32, 32), DCConfig(size=10, seed=0, fresh=True, trajectories=4),
                       progress=False)
    config = DistillConfig(iters=6, batch_size=4, lr=1e-3, checkpoint_every=3, warmup_iters=2, lr_decay="cosine",
                           ema_decay=0.5, heldout_every=2)
    states: list[dict] = []
    full, full_report = distill(copy.deepcopy(student0), teacher, cfg, STEPS, fresh, config, progress=False,
                                on_checkpoint=states.append, heldout=held_out)
    assert [h[0] for h in full_report.heldout] == [0, 2, 4, 6]
    assert all(h[1] > 0 for h in full_report.heldout)
    resumed, resumed_report = distill(copy.deepcopy(student0), teacher, cfg, STEPS, fresh, config, progress=False,
                                      resume=states[0], heldout=held_out)
    assert resumed_report.losses == full_report.losses and resumed_report.heldout == full_report.heldout
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    # the student ends with the EMA, so its held-out loss (same batches) is the curve's last point
    from pqcad_deploy.distill.cad import _heldout_loss

    coeffs = DDIMCoefficients.from_config(cfg)
    targets = compute_targets(teacher, held_out, grid, coeffs, batch_size=4)
    assert _heldout_loss(full, held_out, targets, coeffs, 4, "cpu") == full_report.heldout[-1][1]
