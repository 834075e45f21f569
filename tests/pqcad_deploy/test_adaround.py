"""AdaRound soft rounding: the pure functions and the WeightQuantizer's soft mode and hardening."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pqcad_deploy.quant import adaround as A
from pqcad_deploy.quant import primitives as P
from pqcad_deploy.quant.layers import QuantConv2d
from pqcad_deploy.quant.quantizer import WeightQuantizer

SETTINGS = settings(max_examples=30, deadline=None)
SHAPES = [(4, 1), (5, 3), (6, 2, 3, 3)]


def _weight_and_scale(seed: int, shape: tuple[int, ...], bits: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape[0], generator=g).add(0.1).reshape(
        (-1,) + (1,) * (len(shape) - 1))
    return w, P.minmax_weight_scale(w, bits)


# ----------------------------------------------------------------------------- pure functions
@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), shape=st.sampled_from(SHAPES), bits=st.sampled_from([8, 4]))
def test_init_makes_h_equal_the_fractional_part(seed, shape, bits):
    w, s = _weight_and_scale(seed, shape, bits)
    v = A.init_rounding_logits(w, s)
    x = w / P.per_channel_view(s, w)
    frac = x - torch.floor(x)
    assert v.shape == w.shape and v.dtype == torch.float32 and torch.isfinite(v).all()
    assert (A.rectified_sigmoid(v) - frac).abs().max().item() <= 1e-5
    # the soft weight is then the float weight (inside the clamp range): floor + frac = w / s
    soft = A.soft_fake_quantize_weight(w, s, v, bits)
    qmax = P.weight_qmax(bits)
    expected = torch.clamp(x, -qmax, qmax) * P.per_channel_view(s, w)
    assert torch.allclose(soft, expected, atol=2e-5 * float(s.max()))
    # hardening the initial logits is round-half-up of w / s, i.e. round to nearest off ties
    codes = A.hard_rounding_codes(w, s, v, bits)
    nearest = torch.clamp(torch.floor(x + 0.5), -qmax, qmax).to(torch.int8)
    assert torch.equal(codes, nearest)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), shape=st.sampled_from(SHAPES), bits=st.sampled_from([8, 4]),
       spread=st.floats(0.1, 50.0))
def test_hardened_codes_stay_in_the_narrow_range(seed, shape, bits, spread):
    w, s = _weight_and_scale(seed, shape, bits)
    g = torch.Generator().manual_seed(seed + 1)
    v = torch.randn(shape, generator=g) * spread  # any logits, including saturated ones
    w = w * 3.0  # beyond the grid: the clamp must hold
    codes = A.hard_rounding_codes(w, s, v, bits)
    qmax = P.weight_qmax(bits)
    assert codes.dtype == torch.int8
    assert int(codes.min()) >= -qmax and int(codes.max()) <= qmax
    up = (A.rectified_sigmoid(v) >= 0.5).to(torch.float32)
    expected = torch.clamp(torch.floor(w / P.per_channel_view(s, w)) + up, -qmax, qmax)
    assert torch.equal(codes.float(), expected)


def test_rectified_sigmoid_reaches_0_and_1_exactly():
    h = A.rectified_sigmoid(torch.tensor([-30.0, -4.0, 0.0, 4.0, 30.0]))
    assert h[0].item() == 0.0 and h[-1].item() == 1.0 and h[1].item() == 0.0 and h[3].item() == 1.0
    assert h[2].item() == pytest.approx(0.5)


@pytest.mark.parametrize("beta", [2.0, 5.0, 20.0])
def test_regularizer_zero_at_hard_values_and_largest_at_one_half(beta):
    hard = torch.tensor([-30.0, 30.0, -10.0, 10.0])  # h exactly 0 or 1
    assert A.rounding_regularizer(hard, beta).item() == 0.0
    half = torch.zeros(3)  # h = 0.5
    assert A.rounding_regularizer(half, beta).item() == pytest.approx(3.0)
    assert A.rounding_regularizer(half, beta, "mean").item() == pytest.approx(1.0)
    grid = torch.linspace(-6, 6, 241)
    per = 1.0 - (2.0 * A.rectified_sigmoid(grid) - 1.0).abs().pow(beta)
    assert per[120].item() == pytest.approx(1.0) and per.max().item() == per[120].item()  # V = 0: h = 0.5
    assert per.min().item() == 0.0
    h = A.rectified_sigmoid(grid)
    left, right = per[h <= 0.5], per[h >= 0.5]  # rises towards h = 0.5 from both sides
    assert (left.diff() >= 0).all() and (right.diff() <= 0).all()
    with pytest.raises(ValueError, match="reduction"):
        A.rounding_regularizer(half, beta, "max")


def test_beta_schedule_warmup_then_linear_decay():
    assert A.beta_schedule(0, 100, 0.2, 20.0, 2.0) == (20.0, False)
    assert A.beta_schedule(19, 100, 0.2, 20.0, 2.0) == (20.0, False)
    assert A.beta_schedule(20, 100, 0.2, 20.0, 2.0) == (20.0, True)
    beta, on = A.beta_schedule(60, 100, 0.2, 20.0, 2.0)
    assert on and beta == pytest.approx(11.0)
    assert A.beta_schedule(100, 100, 0.2, 20.0, 2.0)[0] == pytest.approx(2.0)
    assert A.beta_schedule(0, 10, 0.0)[1]


@pytest.mark.parametrize("bits", [8, 4])
def test_mse_scale_is_never_worse_than_minmax(bits):
    w, _ = _weight_and_scale(3, (16, 8, 3, 3), bits)
    w[0, 0, 0, 0] = 8.0  # an outlier channel
    s_mm = P.minmax_weight_scale(w, bits)
    s = A.mse_weight_scale(w, bits)
    assert s.shape == s_mm.shape and (s > 0).all() and (s <= s_mm * (1 + 1e-6)).all()
    err = ((P.fake_quantize_weight(w, s, bits) - w) ** 2).flatten(1).sum(1)
    err_mm = ((P.fake_quantize_weight(w, s_mm, bits) - w) ** 2).flatten(1).sum(1)
    assert (err <= err_mm * (1 + 1e-5)).all()
    if bits == 4:
        assert err.sum() < 0.9 * err_mm.sum()  # measured 0.87


# ----------------------------------------------------------------------------- WeightQuantizer soft mode
def test_default_quantizer_unchanged_and_has_no_logits_in_state():
    wq = WeightQuantizer(3, 4)
    assert not wq.adaround_enabled and wq.round_v is None
    assert set(wq.state_dict()) == {"scale"}


@pytest.mark.parametrize("bits", [8, 4])
def test_enable_train_harden_write_back(bits):
    w, s = _weight_and_scale(7, (6, 4, 3, 3), bits)
    wq = WeightQuantizer(6, bits)
    wq.set_scale(s)
    wq.enable_adaround(w)
    assert wq.adaround_enabled and wq.round_v.requires_grad and "round_v" in dict(wq.named_parameters())
    # forward is the soft weight; gradients reach V and (LSQ) the scale. At the initial logits the
    # soft weight is the float weight inside the grid, so the scale gradient, sum g * (h - frac), is
    # about 0; after the logits move away it is not.
    with torch.no_grad():
        wq.round_v.add_(torch.randn_like(w))
    wq.scale.requires_grad_(True)
    target = torch.randn_like(w)
    ((wq(w) - target) ** 2).sum().backward()
    assert wq.round_v.grad is not None and wq.round_v.grad.abs().sum() > 0
    assert wq.scale.grad is not None and wq.scale.grad.abs().sum() > 0
    wq.scale.requires_grad_(False)
    with torch.no_grad():  # move the logits somewhere arbitrary
        wq.round_v.add_(torch.randn_like(w) * 3.0)
    codes = wq.harden(w)
    assert torch.equal(wq.codes(w), codes)  # soft mode: codes() = what it would harden to
    latent = torch.nn.Parameter(w.clone())
    returned = wq.harden_(latent)
    assert torch.equal(returned, codes)
    assert not wq.adaround_enabled and set(wq.state_dict()) == {"scale"}
    assert torch.equal(latent.detach(), P.dequantize_weight(codes, wq.scale))
    assert torch.equal(wq.codes(latent), codes)  # round to nearest reproduces the hardened codes
    assert torch.equal(wq(latent), P.dequantize_weight(codes, wq.scale))


def test_soft_mode_refusals_and_set_bits():
    wq = WeightQuantizer(4, 8)
    w = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="not enabled"):
        wq.harden(w)
    with pytest.raises(RuntimeError, match="not enabled"):
        wq.rounding_regularizer(2.0)
    with pytest.raises(ValueError, match="output channels"):
        wq.enable_adaround(torch.randn(5, 3))
    wq.enable_adaround(w)
    with pytest.raises(ValueError, match="rounding logits shape"):
        wq(torch.randn(4, 2))
    with pytest.raises(RuntimeError, match="before changing"):
        wq.set_bits(4)
    wq.disable_adaround()
    wq.set_bits(4)
    assert wq.bits == 4
    assert "adaround" not in repr(wq)


def test_quant_layer_codes_after_hardening_match_artifact_path():
    conv = torch.nn.Conv2d(3, 5, 3)
    q = QuantConv2d.from_float(conv, 4, 8)
    q.weight_quantizer.set_scale(A.mse_weight_scale(q.weight, 4))
    q.weight_quantizer.enable_adaround(q.weight)
    with torch.no_grad():
        q.weight_quantizer.round_v.copy_(torch.randn_like(q.weight) * 2)
    codes = q.weight_quantizer.harden_(q.weight)
    assert torch.equal(q.weight_codes(), codes)
    assert float((q.quantized_weight() - q.weight).detach().abs().max()) == 0.0
    assert np.abs(codes.numpy()).max() <= 7
