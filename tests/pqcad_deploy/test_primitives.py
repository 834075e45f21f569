"""Quantization primitives pinned bit-exactly against an independent NumPy reference.

The reference implements docs/CONTRACTS.md section 1 directly: symmetric grids, zero-point 0,
weights on the narrow range [-qmax, qmax] per output channel (dim 0), activations on the range ONNX
QuantizeLinear saturates to ([-128, 127] / [-8, 7]) per tensor, rounding half to even (np.round,
like torch.round and ONNX). All arithmetic is float32, as in the torch code, so results must match
bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pqcad_deploy.errors import ConfigError
from pqcad_deploy.quant import primitives as P

BITS = (8, 4)
WEIGHT_QMAX = {8: 127, 4: 7}
ACT_RANGE = {8: (-128, 127), 4: (-8, 7)}
BAD_BITS = (0, 1, 2, 3, 5, 7, 9, 16, 32)

# derandomize: CI on a fresh clone must see the same examples every run (no example database there)
SETTINGS = settings(max_examples=50, deadline=None, derandomize=True)


# ----------------------------------------------------------------------------- NumPy reference
def np_channel_view(scale: np.ndarray, ndim: int) -> np.ndarray:
    return scale.reshape((-1,) + (1,) * (ndim - 1))


def np_weight_codes(w: np.ndarray, s: np.ndarray, bits: int) -> np.ndarray:
    q = WEIGHT_QMAX[bits]
    return np.clip(np.round(w / np_channel_view(s, w.ndim)), -q, q).astype(np.int8)


def np_dequantize(codes: np.ndarray, s: np.ndarray) -> np.ndarray:
    return codes.astype(np.float32) * np_channel_view(s, codes.ndim)


def np_fake_weight(w: np.ndarray, s: np.ndarray, bits: int) -> np.ndarray:
    q = WEIGHT_QMAX[bits]
    sv = np_channel_view(s, w.ndim)
    return (np.clip(np.round(w / sv), -q, q) * sv).astype(np.float32)


def np_fake_act(x: np.ndarray, s: np.float32, bits: int) -> np.ndarray:
    lo, hi = ACT_RANGE[bits]
    return (np.clip(np.round(x / s), lo, hi) * s).astype(np.float32)


def np_minmax_weight_scale(w: np.ndarray, bits: int) -> np.ndarray:
    amax = np.abs(w).reshape(w.shape[0], -1).max(axis=1)
    return np.maximum(amax / np.float32(WEIGHT_QMAX[bits]), np.float32(1e-12)).astype(np.float32)


# ----------------------------------------------------------------------------- strategies
finite32 = dict(allow_nan=False, allow_infinity=False, allow_subnormal=False, width=32)


@st.composite
def weight_and_scale(draw, min_dims: int = 1):
    """A weight of shape [out], [out, in] or [out, in, kh, kw] and a positive per-channel scale."""
    out = draw(st.integers(1, 8))
    rests = [(), (draw(st.integers(1, 6)),),
             (draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 3)))]
    rest = draw(st.sampled_from([r for r in rests if 1 + len(r) >= min_dims]))
    shape = (out, *rest)
    w = draw(hnp.arrays(np.float32, shape, elements=st.floats(-50, 50, **finite32)))
    s = draw(hnp.arrays(np.float32, (out,), elements=st.floats(2.0**-10, 4.0, **finite32)))
    return w, s


@st.composite
def activation_and_scale(draw):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5))
    x = draw(hnp.arrays(np.float32, shape, elements=st.floats(-100, 100, **finite32)))
    s = np.float32(draw(st.floats(2.0**-10, 4.0, **finite32)))
    return x, s


# ----------------------------------------------------------------------------- grids
def test_qmax_and_act_range_pinned():
    assert P.weight_qmax(8) == 127 and P.weight_qmax(4) == 7
    assert P.act_qrange(8) == (-128, 127) and P.act_qrange(4) == (-8, 7)


# ----------------------------------------------------------------------------- weights
@SETTINGS
@given(ws=weight_and_scale(), bits=st.sampled_from(BITS))
def test_weight_codes_match_reference(ws, bits):
    w, s = ws
    codes = P.quantize_weight_codes(torch.from_numpy(w), torch.from_numpy(s), bits)
    assert codes.dtype == torch.int8
    assert tuple(codes.shape) == w.shape
    np.testing.assert_array_equal(codes.numpy(), np_weight_codes(w, s, bits))
    q = WEIGHT_QMAX[bits]
    assert int(codes.min()) >= -q and int(codes.max()) <= q


@SETTINGS
@given(ws=weight_and_scale(), bits=st.sampled_from(BITS))
def test_dequantize_and_fake_quantize_weight_match_reference(ws, bits):
    w, s = ws
    wt, st_ = torch.from_numpy(w), torch.from_numpy(s)
    codes = P.quantize_weight_codes(wt, st_, bits)
    deq = P.dequantize_weight(codes, st_)
    assert deq.dtype == torch.float32
    np.testing.assert_array_equal(deq.numpy(), np_dequantize(codes.numpy(), s))
    fake = P.fake_quantize_weight(wt, st_, bits)
    np.testing.assert_array_equal(fake.numpy(), np_fake_weight(w, s, bits))
    # fake quantization is exactly dequantize(quantize(w)): one grid, one rounding
    np.testing.assert_array_equal(fake.numpy(), deq.numpy())


@SETTINGS
@given(ws=weight_and_scale(min_dims=2), bits=st.sampled_from(BITS))
def test_minmax_weight_scale_maps_channel_max_to_qmax(ws, bits):
    w, _ = ws
    scale = P.minmax_weight_scale(torch.from_numpy(w), bits)
    assert scale.dtype == torch.float32 and tuple(scale.shape) == (w.shape[0],)
    np.testing.assert_array_equal(scale.numpy(), np_minmax_weight_scale(w, bits))
    codes = P.quantize_weight_codes(torch.from_numpy(w), scale, bits).numpy()
    q = WEIGHT_QMAX[bits]
    flat_w = np.abs(w.reshape(w.shape[0], -1))
    flat_c = codes.reshape(w.shape[0], -1)
    for ch in range(w.shape[0]):
        if flat_w[ch].max() < q * 1e-12:
            # zero (or denormal-small) channel: the scale floor 1e-12 keeps it finite
            assert scale[ch].item() == np.float32(1e-12)
            # codes stay on the grid and dequantize to within half a step of the weight
            assert np.abs(flat_c[ch]).max() <= q
            err = np.abs(flat_c[ch].astype(np.float64) * 1e-12 - w.reshape(w.shape[0], -1)[ch].astype(np.float64))
            assert err.max() <= 0.5e-12 * (1 + 1e-6)
            continue
        j = int(flat_w[ch].argmax())
        # the largest |w| of the channel lands exactly on +-qmax, with its sign
        assert abs(int(flat_c[ch, j])) == q
        assert np.sign(flat_c[ch, j]) == np.sign(w.reshape(w.shape[0], -1)[ch, j])
        assert np.abs(flat_c[ch]).max() == q


@pytest.mark.parametrize("bits", BITS)
def test_zero_channel_gives_no_nan(bits):
    w = torch.zeros(3, 2, 3, 3)
    w[1] = torch.linspace(-1.0, 1.0, 18).reshape(2, 3, 3)
    scale = P.minmax_weight_scale(w, bits)
    assert float(scale[0]) == pytest.approx(1e-12) and float(scale[2]) > 0
    assert float(scale[1]) == np.float32(1.0) / np.float32(WEIGHT_QMAX[bits])
    codes = P.quantize_weight_codes(w, scale, bits)
    fake = P.fake_quantize_weight(w, scale, bits)
    deq = P.dequantize_weight(codes, scale)
    for t in (codes.float(), fake, deq):
        assert torch.isfinite(t).all()
    assert (codes[0] == 0).all() and (fake[0] == 0).all() and (fake[2] == 0).all()


@pytest.mark.parametrize("bits", BITS)
def test_weight_saturates_to_narrow_range(bits):
    q = WEIGHT_QMAX[bits]
    w = torch.tensor([[-1e6, -(q + 3.0), -q - 0.49, 0.0, q + 0.49, q + 3.0, 1e6]])
    codes = P.quantize_weight_codes(w, torch.ones(1), bits)
    assert codes.tolist() == [[-q, -q, -q, 0, q, q, q]]


def test_weight_rounding_is_half_to_even():
    w = torch.tensor([[0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 0.49999997, 2.5000002]])
    codes = P.quantize_weight_codes(w, torch.ones(1), 8)
    assert codes.tolist() == [[0, 2, 2, 4, 0, -2, -2, 0, 3]]
    # with a power-of-two scale the ties stay exact ties
    codes = P.quantize_weight_codes(w * 0.25, torch.tensor([0.25]), 8)
    assert codes.tolist() == [[0, 2, 2, 4, 0, -2, -2, 0, 3]]


# ----------------------------------------------------------------------------- activations
@SETTINGS
@given(xs=activation_and_scale(), bits=st.sampled_from(BITS))
def test_fake_quantize_activation_matches_reference(xs, bits):
    x, s = xs
    out = P.fake_quantize_activation(torch.from_numpy(x), torch.tensor(s), bits)
    assert out.dtype == torch.float32 and tuple(out.shape) == x.shape
    np.testing.assert_array_equal(out.numpy(), np_fake_act(x, s, bits))
    lo, hi = ACT_RANGE[bits]
    codes = np.round(out.numpy() / s)
    assert codes.min() >= lo and codes.max() <= hi


@pytest.mark.parametrize("bits", BITS)
def test_activation_saturates_to_onnx_range(bits):
    lo, hi = ACT_RANGE[bits]
    s = torch.tensor(0.5)
    x = torch.tensor([-1e6, (lo - 5) * 0.5, lo * 0.5, 0.0, hi * 0.5, (hi + 5) * 0.5, 1e6])
    out = P.fake_quantize_activation(x, s, bits)
    assert out.tolist() == [lo * 0.5, lo * 0.5, lo * 0.5, 0.0, hi * 0.5, hi * 0.5, hi * 0.5]
    # asymmetric: the most negative code is reachable, its mirror image is not
    assert P.fake_quantize_activation(torch.tensor([lo * 1.0]), torch.tensor(1.0), bits).item() == lo
    assert P.fake_quantize_activation(torch.tensor([-lo * 1.0]), torch.tensor(1.0), bits).item() == hi


def test_activation_rounding_is_half_to_even():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -127.5])
    out = P.fake_quantize_activation(x, torch.tensor(1.0), 8)
    assert out.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 126.0, -128.0]


@pytest.mark.parametrize("bits", BITS)
def test_minmax_activation_scale(bits):
    _, hi = ACT_RANGE[bits]
    s = P.minmax_activation_scale(3.0, bits)
    assert s.dtype == torch.float32 and s.dim() == 0
    assert s.item() == np.float32(3.0) / np.float32(hi)
    assert P.fake_quantize_activation(torch.tensor([3.0, -3.0]), s, bits).tolist() == pytest.approx(
        [3.0, -3.0], rel=1e-6)
    assert P.minmax_activation_scale(torch.tensor(0.0), bits).item() > 0


# ----------------------------------------------------------------------------- gradients
def test_round_ste_value_and_unit_gradient():
    x = torch.tensor([-2.5, -1.2, -0.5, 0.0, 0.3, 0.5, 1.5, 7.7], requires_grad=True)
    y = P.round_ste(x)
    assert y.tolist() == torch.round(x.detach()).tolist()
    (y * torch.arange(1.0, 9.0)).sum().backward()
    assert x.grad.tolist() == list(range(1, 9))  # d round_ste / dx == 1 element-wise


@pytest.mark.parametrize("bits", BITS)
def test_fake_quant_gradient_is_straight_through_inside_range(bits):
    lo, hi = ACT_RANGE[bits]
    x = torch.tensor([lo - 3.0, lo + 0.2, -0.7, 0.0, 0.4, hi - 0.2, hi + 3.0], requires_grad=True)
    P.fake_quantize_activation(x, torch.tensor(1.0), bits).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    q = WEIGHT_QMAX[bits]
    w = torch.tensor([[-q - 3.0, -0.7, 0.4, q + 3.0]], requires_grad=True)
    P.fake_quantize_weight(w, torch.ones(1), bits).sum().backward()
    assert w.grad.tolist() == [[0.0, 1.0, 1.0, 0.0]]


# ----------------------------------------------------------------------------- bad bits
def _assert_lists_allowed(exc: pytest.ExceptionInfo, bad: int) -> None:
    msg = str(exc.value)
    # weights also hold PQ's 6-bit ladder level; activations are 8 or 4
    assert "8, 6, 4" in msg or "8, 4" in msg, msg
    assert f"got {bad!r}" in msg, msg


@pytest.mark.parametrize("bad", BAD_BITS)
def test_unsupported_bits_raise_config_error(bad):
    w, s, x = torch.ones(2, 3), torch.ones(2), torch.ones(4)
    calls = [
        lambda: P.weight_qmax(bad),
        lambda: P.act_qrange(bad),
        lambda: P.quantize_weight_codes(w, s, bad),
        lambda: P.fake_quantize_weight(w, s, bad),
        lambda: P.fake_quantize_activation(x, torch.tensor(1.0), bad),
        lambda: P.minmax_weight_scale(w, bad),
        lambda: P.minmax_activation_scale(1.0, bad),
    ]
    for call in calls:
        with pytest.raises(ConfigError) as exc:
            call()
        _assert_lists_allowed(exc, bad)
    with pytest.raises(ConfigError, match="weight bits must be one of 8, 6, 4"):
        P.weight_qmax(bad)
    with pytest.raises(ConfigError, match="activation bits must be one of 8, 4"):
        P.act_qrange(bad)


@pytest.mark.parametrize("bad", [8.0, 4.0, True])
def test_bits_must_be_int_not_just_equal(bad):
    # 8.0 == 8, but a float would be written into the artifact as 8.0
    with pytest.raises(ConfigError, match="weight bits must be one of 8, 6, 4"):
        P.weight_qmax(bad)
    with pytest.raises(ConfigError, match="activation bits must be one of 8, 4"):
        P.act_qrange(bad)
