"""Bias correction: the arithmetic on layers with a known output error, and the order it corrects in."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from pqcad_deploy.calibration.trajectories import CalibrationSet
from pqcad_deploy.presets import PRESETS, CalibrationConfig
from pqcad_deploy.quant.bias_correction import (
    BiasCorrectionConfig, channel_means, correct_biases, execution_order, mean_output_error,
)


class _TwoConv(nn.Module):
    """x -> conv_a -> conv_b; called like a UNet (x, t) so that the calibration batches fit."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(2, 3, 3, padding=1)
        self.conv_b = nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.conv_b(self.conv_a(x))


def _calibration(n: int = 12) -> CalibrationSet:
    g = torch.Generator().manual_seed(0)
    return CalibrationSet(x=torch.randn(n, 2, 5, 5, generator=g), t=torch.zeros(n), description={})


def test_a_known_constant_error_is_removed_exactly():
    torch.manual_seed(0)
    fp = _TwoConv().eval()
    student = copy.deepcopy(fp)
    shift = torch.tensor([0.5, -0.25, 0.125])
    with torch.no_grad():
        student.conv_a.bias.add_(shift)  # a per-channel output error of exactly `shift`
    cal = _calibration()
    fp_means = channel_means(fp, ["conv_a"], cal, batch_size=5, device="cpu")
    error = mean_output_error(student, "conv_a", fp_means["conv_a"], cal, batch_size=5, device="cpu")
    assert torch.allclose(error.float(), shift, atol=1e-6)

    report = correct_biases(fp, student, ["conv_a", "conv_b"], cal, BiasCorrectionConfig(batch_size=5), progress=False)
    assert torch.allclose(student.conv_a.bias, fp.conv_a.bias, atol=1e-6)
    # conv_b saw the corrected conv_a, so it has nothing left to correct (no double counting)
    assert torch.allclose(student.conv_b.bias, fp.conv_b.bias, atol=1e-6)
    assert report["layers"]["conv_a"]["max_abs_correction"] == pytest.approx(0.5, abs=1e-6)
    assert report["layers"]["conv_b"]["max_abs_correction"] < 1e-6


def test_a_weight_error_is_corrected_in_mean_only():
    """A scaled weight gives an input-dependent error: the mean over the data goes, the rest stays."""
    torch.manual_seed(1)
    fp = _TwoConv().eval()
    student = copy.deepcopy(fp)
    with torch.no_grad():
        student.conv_b.weight.mul_(1.1)
    cal = _calibration(20)
    fp_out = torch.cat([fp(x, t) for x, t, _cond in cal.batches(20)]).detach()
    before = torch.cat([student(x, t) for x, t, _cond in cal.batches(20)]).detach()
    expected = (before - fp_out).transpose(0, 1).reshape(2, -1).double().mean(dim=1)
    correct_biases(fp, student, ["conv_b"], cal, BiasCorrectionConfig(batch_size=7), progress=False)
    after = torch.cat([student(x, t) for x, t, _cond in cal.batches(20)]).detach()
    residual = (after - fp_out).transpose(0, 1).reshape(2, -1)
    assert torch.allclose(residual.double().mean(dim=1), torch.zeros(2, dtype=torch.float64), atol=1e-6)
    assert torch.allclose((before - after).transpose(0, 1).reshape(2, -1)[:, 0].double(), expected, atol=1e-6)
    assert float(residual.abs().max()) > 1e-3  # the input-dependent part is not a bias's to remove


def test_linear_layers_use_the_last_dimension_as_channel_and_bias_free_layers_are_skipped():
    class _Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 3)
            self.nobias = nn.Linear(3, 3, bias=False)

        def forward(self, x, t):
            return self.nobias(self.proj(x.flatten(2).transpose(1, 2)[..., :4]))

    torch.manual_seed(2)
    fp = _Tokens().eval()
    student = copy.deepcopy(fp)
    with torch.no_grad():
        student.proj.bias.add_(torch.tensor([1.0, 2.0, 3.0]))
    cal = CalibrationSet(x=torch.randn(6, 5, 2, 2), t=torch.zeros(6), description={})
    report = correct_biases(fp, student, ["proj", "nobias"], cal, BiasCorrectionConfig(batch_size=4), progress=False)
    assert torch.allclose(student.proj.bias, fp.proj.bias, atol=1e-5)
    assert report["skipped_no_bias"] == ["nobias"]


def test_layers_are_corrected_in_the_order_the_forward_pass_runs_them():
    class _Reversed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.second = nn.Conv2d(3, 2, 1)  # defined first, runs second
            self.first = nn.Conv2d(2, 3, 1)

        def forward(self, x, t):
            return self.second(self.first(x))

    model = _Reversed()
    assert execution_order(model, ["second", "first"], (torch.zeros(1, 2, 3, 3), torch.zeros(1))) == ["first", "second"]


def _compressed(model_dir, out, **options) -> dict:
    """The student tensors and the report of a fast minmax compress of `model_dir` with `options`."""
    import json

    from safetensors.torch import load_file

    from pqcad_deploy.compress import compress
    from pqcad_deploy.config import CompressConfig

    compress(CompressConfig(model=str(model_dir), method="minmax", distill=False, teacher_steps=10, preset="fast",
                            **options), out, progress=False)
    return {"tensors": load_file(str(out / "student.safetensors")),
            "report": json.loads((out / "report.json").read_text())}


@pytest.fixture(scope="module")
def few_calibration_pairs():
    """The fast preset with 8 calibration pairs instead of 32, for this module's compress runs.

    The correction is estimated on the calibration set (or on trajectories of its counts) and costs a
    pass of every layer over it: a quarter of the pairs changes the biases just as surely.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PRESETS, "fast", dataclasses.replace(
            PRESETS["fast"], calibration=CalibrationConfig(num_trajectories=2, timesteps_kept=4, batch_size=2)))
        yield


@pytest.fixture(scope="module")
def uncorrected(small_unet_dir, tmp_path_factory, few_calibration_pairs) -> dict:
    return _compressed(small_unet_dir, tmp_path_factory.mktemp("bc") / "plain")


@pytest.mark.parametrize("data", ["calibration", "fp-uniform", "student"])
def test_compress_estimates_the_correction_on_the_chosen_data(small_unet_dir, uncorrected, tmp_path, data):
    """compress --bias-correction changes the biases (not the codes), on the data the option names."""
    plain = uncorrected
    corrected = _compressed(small_unet_dir, tmp_path / "bc", bias_correction=True, bias_correction_data=data)
    assert "bias_correction" not in plain["report"]
    section = corrected["report"]["bias_correction"]
    assert section["data"] == data and section["samples"] > 0 and "conv_out" in section["layers"]
    calibration = PRESETS["fast"].calibration  # every data choice keeps the calibration set's counts
    assert section["samples"] == calibration.num_trajectories * calibration.timesteps_kept
    biases = [k for k in plain["tensors"] if k.endswith(".bias") and k.rsplit(".", 1)[0] in section["layers"]]
    assert biases and any(not torch.equal(plain["tensors"][k], corrected["tensors"][k]) for k in biases)
    codes = [k for k in plain["tensors"] if k.endswith(".weight_codes")]
    assert all(torch.equal(plain["tensors"][k], corrected["tensors"][k]) for k in codes)


def test_bias_correction_data_needs_bias_correction():
    from pqcad_deploy.config import CompressConfig
    from pqcad_deploy.errors import ConfigError

    with pytest.raises(ConfigError, match="--bias-correction-data only applies with --bias-correction"):
        CompressConfig(bias_correction_data="student")
    with pytest.raises(ConfigError, match="--bias-correction-data must be one of calibration, fp-uniform, student"):
        CompressConfig(bias_correction=True, bias_correction_data="random")
