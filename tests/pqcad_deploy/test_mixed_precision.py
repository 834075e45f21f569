"""Sensitivity-driven mixed precision: kurtosis, the budgeted allocator, and compress end to end."""

from __future__ import annotations

import dataclasses
import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

from pqcad_deploy.errors import ConfigError
from pqcad_deploy.quant.mixed_precision import (
    allocate_weight_bits, average_weight_bits, channel_kurtosis, layer_outlier_scores, mixed_precision_plan,
)
from pqcad_deploy.quant.replace import LayerBits


def _kurtosis_reference(rows: np.ndarray) -> np.ndarray:
    """Pearson kurtosis per row from the textbook formula, in float64 numpy."""
    out = []
    for row in rows.astype(np.float64):
        d = row - row.mean()
        m2, m4 = (d ** 2).mean(), (d ** 4).mean()
        out.append(0.0 if m2 == 0 else m4 / m2 ** 2)
    return np.array(out)


# ----------------------------------------------------------------------------- kurtosis

@pytest.mark.parametrize("shape", [(6, 3, 3, 3), (5, 40), (4, 1, 3, 3)])
def test_channel_kurtosis_matches_the_formula(shape):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g)
    w.view(shape[0], -1)[1, 0] = 25.0  # one outlier-heavy channel
    got = channel_kurtosis(w).numpy()
    want = _kurtosis_reference(w.reshape(shape[0], -1).numpy())
    np.testing.assert_allclose(got, want, rtol=1e-10)
    assert got.argmax() == 1 and got.dtype == np.float64


def test_channel_kurtosis_pinned_values():
    w = torch.zeros(3, 200)
    w[0] = torch.linspace(-1, 1, 200)   # uniform: 9/5 (slightly above for a finite grid)
    w[1] = 2.0                          # constant channel: no outliers, 0 by definition
    w[2, :2] = torch.tensor([1.0, -1.0])  # two spikes among zeros: m4 / m2^2 = n / 2 = 100
    k = channel_kurtosis(w)
    assert abs(float(k[0]) - 1.8) < 0.01 and float(k[1]) == 0.0 and abs(float(k[2]) - 100.0) < 1e-9
    gauss = torch.randn(1, 400_000, generator=torch.Generator().manual_seed(1))
    assert abs(float(channel_kurtosis(gauss)[0]) - 3.0) < 0.05


def test_layer_scores_are_the_mean_over_channels():
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(8, 3))
    scores = layer_outlier_scores(model)
    assert list(scores) == ["0", "2"]
    conv_rows = model[0].weight.detach().reshape(4, -1).numpy()
    assert scores["0"] == pytest.approx(float(_kurtosis_reference(conv_rows).mean()))
    assert scores["2"] == pytest.approx(float(_kurtosis_reference(model[2].weight.detach().numpy()).mean()))
    assert list(layer_outlier_scores(model, ["2"])) == ["2"]


# ----------------------------------------------------------------------------- allocator

def _exact_average(bits: dict[str, int], params: dict[str, int]) -> Fraction:
    return Fraction(sum(b * params[n] for n, b in bits.items()), sum(params[n] for n in bits))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("budget", [4.0 + 1e-9, 4.1, 4.25, 4.5, 5.0, 6.3, 7.999, 8.0])
def test_allocator_respects_the_budget_and_uses_it(seed, budget):
    rng = np.random.default_rng(seed)
    names = [f"l{i}" for i in range(30)]
    params = {n: int(p) for n, p in zip(names, rng.integers(10, 5000, size=30))}
    scores = {n: float(s) for n, s in zip(names, rng.uniform(1.5, 20.0, size=30))}
    forced = ["l0", "l29"]
    total = sum(params.values())
    if 4 + Fraction(4 * (params["l0"] + params["l29"]), total) > Fraction(repr(budget)):
        with pytest.raises(ConfigError, match="at least"):
            allocate_weight_bits(scores, params, 4, budget, forced)
        return
    bits = allocate_weight_bits(scores, params, 4, budget, forced)
    assert list(bits) == names and set(bits.values()) <= {4, 8}
    assert bits["l0"] == bits["l29"] == 8
    assert _exact_average(bits, params) <= Fraction(repr(budget))
    assert average_weight_bits(bits, params) <= budget
    # nothing left at 4 bits would still fit: the budget is used
    spare = (Fraction(repr(budget)) - _exact_average(bits, params)) * total
    assert all(4 * params[n] > spare for n, b in bits.items() if b == 4)
    if budget == 8.0:
        assert set(bits.values()) == {8}


def test_allocator_raises_the_highest_scores_first_at_equal_size():
    scores = {"a": 3.0, "b": 9.0, "c": 5.0, "d": 7.0, "e": 1.0}
    params = dict.fromkeys(scores, 100)
    # 5 layers of 100 weights: budget 5.6 allows two raises (4 * 200 / 500 = 1.6 extra bits)
    assert allocate_weight_bits(scores, params, 4, 5.6) == {"a": 4, "b": 8, "c": 4, "d": 8, "e": 4}
    # one more raise needs 6.4
    assert allocate_weight_bits(scores, params, 4, 6.4) == {"a": 4, "b": 8, "c": 8, "d": 8, "e": 4}
    # ties keep the given order
    assert allocate_weight_bits(dict.fromkeys("xyz", 2.0), dict.fromkeys("xyz", 10), 4, 5.34) == \
        {"x": 8, "y": 4, "z": 4}


def test_allocator_ranks_by_score_per_weight_and_skips_what_does_not_fit():
    scores = {"big": 10.0, "small": 4.0, "mid": 6.0}
    params = {"big": 1500, "small": 100, "mid": 400}
    # per weight: small 0.04 > mid 0.015 > big 0.0067; raising small costs 4 * 100 / 2000 = 0.2 bits
    assert allocate_weight_bits(scores, params, 4, 4.2) == {"big": 4, "small": 8, "mid": 4}
    # mid does not fit after small (needs 5.0): skipped; nothing else fits either
    assert allocate_weight_bits(scores, params, 4, 4.9) == {"big": 4, "small": 8, "mid": 4}
    assert allocate_weight_bits(scores, params, 4, 5.0) == {"big": 4, "small": 8, "mid": 8}
    # a big layer that does not fit is skipped, and smaller ones later in the order are still raised
    scores = {"huge": 1e6, "x": 1.0, "y": 2.0}
    params = {"huge": 10_000, "x": 10, "y": 10}
    assert allocate_weight_bits(scores, params, 4, 4.01) == {"huge": 4, "x": 8, "y": 8}


def test_forced_layers_stay_at_8_and_unknown_forced_names_are_ignored():
    scores = {"conv_in": 0.0, "mid": 100.0, "conv_out": 0.0}
    params = {"conv_in": 10, "mid": 1000, "conv_out": 10}
    bits = allocate_weight_bits(scores, params, 4, 4.1, forced=("conv_in", "conv_out", "not_there"))
    assert bits == {"conv_in": 8, "mid": 4, "conv_out": 8}


@pytest.mark.parametrize("budget, fragment", [
    (3.9, "[4, 8]"), (8.5, "[4, 8]"), (float("nan"), "[4, 8]"), (float("inf"), "[4, 8]"), (True, "[4, 8]"),
    ("4.5", "[4, 8]"),
])
def test_allocator_refuses_budgets_out_of_range(budget, fragment):
    with pytest.raises(ConfigError) as exc:
        allocate_weight_bits({"a": 1.0}, {"a": 10}, 4, budget)
    assert str(exc.value).startswith("--avg-weight-bits must be a number in [4, 8]") and repr(budget) in str(exc.value)


def test_allocator_refuses_a_budget_the_forced_layers_exceed():
    scores = {"conv_in": 1.0, "body": 1.0, "conv_out": 1.0}
    params = {"conv_in": 100, "body": 700, "conv_out": 200}
    # the forced layers alone: 4 + 4 * 300 / 1000 = 5.2 average bits
    with pytest.raises(ConfigError) as exc:
        allocate_weight_bits(scores, params, 4, 5.0, forced=("conv_in", "conv_out"))
    assert str(exc.value) == ("--avg-weight-bits 5.0 is below what the layers kept at 8 bits need on their own "
                              "(conv_in, conv_out: an average of 5.2000 weight bits); pass at least 5.2.")
    assert allocate_weight_bits(scores, params, 4, 5.2, forced=("conv_in", "conv_out"))["body"] == 4


def test_allocator_refuses_an_8_bit_target():
    with pytest.raises(ConfigError, match="below 8"):
        allocate_weight_bits({"a": 1.0}, {"a": 1}, 8, 8.0)
    with pytest.raises(ConfigError, match="--weight-bits must be one of 8, 4"):
        allocate_weight_bits({"a": 1.0}, {"a": 1}, 6, 7.0)


def test_mixed_precision_plan_keeps_activation_bits_and_reports(small_unet_dir):
    from pqcad_deploy.compress import uniform_plan
    from pqcad_deploy.models import load_model

    unet = load_model(str(small_unet_dir)).unet
    plan = uniform_plan(unet, 4, 4)
    mixed = mixed_precision_plan(unet, plan, 4.5)
    assert list(mixed.plan) == list(plan)
    assert {b.act_bits for b in mixed.plan.values()} == {4}
    assert mixed.plan["conv_in"].weight_bits == mixed.plan["conv_out"].weight_bits == 8
    assert {b.weight_bits for b in mixed.plan.values()} == {4, 8}
    assert mixed.average_bits <= 4.5 and mixed.forced == ("conv_in", "conv_out")
    report = json.loads(json.dumps(mixed.report()))
    assert report["budget_avg_weight_bits"] == 4.5 and report["avg_weight_bits"] == mixed.average_bits
    assert set(report["raised"]) == {n for n, b in mixed.plan.items() if b.weight_bits == 8} - {"conv_in", "conv_out"}
    assert all(math.isfinite(r["score"]) and r["params"] > 0 for r in report["layers"].values())
    # layers already at 8 bits in the plan stay there and count as forced; activation bits are kept
    name = "down_blocks.0.resnets.0.conv1"
    given = mixed_precision_plan(unet, {**plan, name: LayerBits(8, 8)}, 4.5, forced=())
    assert given.forced == (name,) and given.plan[name] == LayerBits(8, 8)
    with pytest.raises(ConfigError, match="one target weight bit-width below 8"):
        mixed_precision_plan(unet, uniform_plan(unet, 8, 8), 8.0)


# ----------------------------------------------------------------------------- compress end to end

@pytest.fixture(scope="module")
def mixed_artifact(small_unet_dir, tmp_path_factory):
    from pqcad_deploy.compress import compress
    from pqcad_deploy.config import CompressConfig

    out = tmp_path_factory.mktemp("mixed") / "art"
    compress(CompressConfig(model=str(small_unet_dir), method="minmax", distill=False, weight_bits=4, act_bits=8,
                            teacher_steps=10, preset="fast", avg_weight_bits=4.5), out, progress=False)
    return out


def test_compress_writes_a_mixed_artifact_within_the_budget(mixed_artifact):
    from pqcad_deploy.artifact import load_artifact

    artifact = load_artifact(mixed_artifact)
    manifest, report = artifact.manifest, artifact.report
    assert manifest.options["avg_weight_bits"] == 4.5
    bits = {n: r.weight_bits for n, r in manifest.layers.items()}
    assert set(bits.values()) == {4, 8} and bits["conv_in"] == bits["conv_out"] == 8
    params = {n: math.prod(r.weight_shape) for n, r in manifest.layers.items()}
    assert _exact_average(bits, params) <= Fraction(4.5)
    mp = report["mixed_precision"]
    assert {n: r["weight_bits"] for n, r in mp["layers"].items()} == bits
    assert {n: r["params"] for n, r in mp["layers"].items()} == params
    assert mp["avg_weight_bits"] == pytest.approx(float(_exact_average(bits, params)))
    for name, record in manifest.layers.items():  # codes on each layer's own grid
        qmax = 2 ** (record.weight_bits - 1) - 1
        assert int(artifact.student_tensors[f"{name}.weight_codes"].abs().max()) <= qmax
        assert report["layers"][name]["weight_bits"] == record.weight_bits


def test_mixed_artifact_exports_with_parity(mixed_artifact, tmp_path):
    from pqcad_deploy.converters.export_onnx import export_onnx
    from pqcad_deploy.converters.parity import parity_report
    from pqcad_deploy.engines.manifest import read_onnx_manifest

    result = export_onnx(mixed_artifact, tmp_path / "mixed.onnx")
    assert result.precision == "mixed"
    manifest = read_onnx_manifest(result.path)
    layers = json.loads((mixed_artifact / "artifact.json").read_text())["layers"]
    n8 = sum(r["weight_bits"] == 8 for r in layers.values())
    assert manifest.weight_bits == {"4": len(layers) - n8, "8": n8} and manifest.act_bits == {"8": len(layers)}
    report = parity_report(mixed_artifact, result.path, n=8, seed=1)
    assert report.samples_without_flips and report.max_rel_error_without_flips < 1e-5
    if report.first_divergence is not None:
        assert report.first_divergence.fraction <= 1e-3 and report.first_divergence.max_code_difference == 1


def test_pq_runs_blocks_that_mix_8_and_4_bit_layers(small_unet_dir, tmp_path, monkeypatch):
    """PQ walks each layer down its own ladder: in a mixed block the 8-bit layers stay at 8."""
    from pqcad_deploy.compress import compress, layer_plan
    from pqcad_deploy.config import CompressConfig
    from pqcad_deploy.models import load_model
    from pqcad_deploy.presets import PRESETS, CalibrationConfig, ReconstructionConfig, TransitionRule

    # Which levels each layer visits is under test, not how well they reconstruct: every level is
    # recorded however few iterations it runs, so a few on a few calibration pairs are enough.
    monkeypatch.setitem(PRESETS, "fast", dataclasses.replace(
        PRESETS["fast"], calibration=CalibrationConfig(num_trajectories=2, timesteps_kept=3, batch_size=2),
        reconstruction=ReconstructionConfig(iters=6, act_iters=3, batch_size=4),
        pq_rule=TransitionRule(min_iters=2, max_iters=5)))
    config = CompressConfig(model=str(small_unet_dir), method="pqcad", weight_bits=4, act_bits=8, teacher_steps=10,
                            preset="fast", avg_weight_bits=4.5, distill=False)  # PQ only: CAD added 26 s
    plan, _ = layer_plan(load_model(str(small_unet_dir)).unet, config)
    blocks = {n.rsplit(".", 1)[0] for n in plan if n.count(".") >= 2}
    mixed_blocks = [b for b in blocks if len({plan[n].weight_bits for n in plan if n.startswith(b + ".")}) == 2]
    assert mixed_blocks, "the fixture plan should mix bits inside a block"
    compress(config, tmp_path / "art", progress=False)
    manifest = json.loads((tmp_path / "art" / "artifact.json").read_text())
    assert {n: r["weight_bits"] for n, r in manifest["layers"].items()} == {n: b.weight_bits for n, b in plan.items()}
    report = json.loads((tmp_path / "art" / "report.json").read_text())
    levels = [(w["level"], w["bits"]) for w in report["pq"]["weights"] if w["name"] in mixed_blocks]
    assert {(0, 8), (1, 6), (2, 4)} <= set(levels)
