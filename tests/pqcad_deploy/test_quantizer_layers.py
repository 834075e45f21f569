"""Stateful quantizers, quantized layers and the registry swap on a real diffusers UNet."""

from __future__ import annotations


import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pqcad_deploy.errors import ConfigError
from pqcad_deploy.quant import primitives as P
from pqcad_deploy.quant.layers import QuantConv2d, QuantLinear
from pqcad_deploy.quant.quantizer import ActivationQuantizer, WeightQuantizer
from pqcad_deploy.quant.replace import LayerBits, quant_layers, quantizable_layers, swap_in_quant_layers


# ----------------------------------------------------------------------------- WeightQuantizer
@pytest.mark.parametrize("bad_shape", [(3,), (5,), (4, 1), (1, 4), ()])
def test_weight_quantizer_refuses_wrong_shape(bad_shape):
    wq = WeightQuantizer(4, 8)
    with pytest.raises(ValueError, match=r"weight scale shape .* != \(4,\)"):
        wq.set_scale(torch.full(bad_shape, 0.5))
    assert wq.scale.tolist() == [1.0] * 4  # unchanged


@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan"), -float("inf")])
def test_weight_quantizer_refuses_non_positive_scale(bad):
    wq = WeightQuantizer(3, 4)
    scale = torch.tensor([0.5, bad, 0.25])
    with pytest.raises(ValueError, match="positive"):
        wq.set_scale(scale)
    assert wq.scale.tolist() == [1.0, 1.0, 1.0]


def test_weight_quantizer_set_scale_codes_and_forward():
    wq = WeightQuantizer(2, 4)
    assert wq.bits == 4 and wq.scale.dtype == torch.float32 and not wq.scale.requires_grad
    wq.set_scale(torch.tensor([0.5, 2.0], dtype=torch.float64))  # converted, not rejected
    assert wq.scale.dtype == torch.float32 and wq.scale.tolist() == [0.5, 2.0]
    w = torch.tensor([[0.26, -0.75, 10.0], [3.0, -1.0, -100.0]])
    assert wq.codes(w).tolist() == [[1, -2, 7], [2, 0, -7]]  # 0.52->1, -1.5->-2, 0.5->0 (half-even)
    assert wq.codes(w).dtype == torch.int8
    assert wq(w).tolist() == [[0.5, -1.0, 3.5], [4.0, 0.0, -14.0]]


@pytest.mark.parametrize("bad", [0, 1, 9, 16])
def test_quantizers_refuse_unsupported_bits(bad):
    with pytest.raises(ConfigError, match="one of 8, 6, 4"):
        WeightQuantizer(4, bad)
    with pytest.raises(ConfigError, match="one of 8, 4"):
        ActivationQuantizer(bad)


# ----------------------------------------------------------------------------- ActivationQuantizer
def test_activation_quantizer_refuses_bad_scales():
    aq = ActivationQuantizer(8)
    for bad in (torch.tensor([0.5]), torch.ones(2)):
        with pytest.raises(ValueError, match="scalar"):
            aq.set_scale(bad)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="positive"):
            aq.set_scale(bad)
    assert aq.scale.item() == 1.0
    aq.set_scale(0.25)
    assert aq.scale.item() == 0.25 and aq.scale.dim() == 0


def test_activation_quantizer_observing_records_running_max_and_is_identity():
    aq = ActivationQuantizer(8)
    aq.set_scale(100.0)  # would crush everything to 0 if it quantized
    aq.observing = True
    assert aq.observed_amax.item() == 0.0
    xs = [torch.tensor([0.3, -2.5, 1.0]), torch.tensor([[1.5, 0.1]]), torch.tensor([-7.25, 2.0]),
          torch.tensor([0.01])]
    expected = [2.5, 2.5, 7.25, 7.25]
    for x, amax in zip(xs, expected):
        out = aq(x)
        assert torch.equal(out, x)
        assert aq.observed_amax.item() == amax
    # observed_amax is a buffer (travels with state_dict), the scale is untouched by observing
    assert "observed_amax" in dict(aq.named_buffers())
    assert aq.scale.item() == 100.0
    aq.observing = False
    x = torch.tensor([-260.0, 49.0, 51.0, 150.0, 1e5])
    assert aq(x).tolist() == [-300.0, 0.0, 100.0, 200.0, 12700.0]  # round(-2.6)=-3, 0.49->0, 0.51->1, 1.5->2, sat 127
    aq.enabled = False
    assert torch.equal(aq(x), x)


# ----------------------------------------------------------------------------- layers
def _minmax(layer, x, weight_bits, act_bits=8):
    layer.weight_quantizer.set_scale(P.minmax_weight_scale(layer.weight, weight_bits))
    layer.input_quantizer.set_scale(P.minmax_activation_scale(x.abs().max(), act_bits))


# Relative output error ||y_q - y|| / ||y|| measured with these seeds (torch 2.13 CPU):
# conv W8A8 0.0101, linear W8A8 0.0077, conv W4A8 0.0705, linear W4A8 0.0745.
REL_ERR_BOUNDS = {("conv", 8): (0.005, 0.02), ("linear", 8): (0.004, 0.015),
                  ("conv", 4): (0.04, 0.12), ("linear", 4): (0.04, 0.12)}


@pytest.mark.parametrize("bits", [8, 4])
def test_quant_conv2d_from_float(bits):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    x = torch.randn(2, 8, 12, 12)
    q = QuantConv2d.from_float(conv, bits, 8)
    assert isinstance(q, nn.Conv2d) and q.weight_bits == bits and q.act_bits == 8
    assert torch.equal(q.weight, conv.weight) and torch.equal(q.bias, conv.bias)
    assert (q.stride, q.padding, q.dilation, q.groups) == (conv.stride, conv.padding, conv.dilation, conv.groups)
    assert q.weight_quantizer.scale.shape == (16,)
    _minmax(q, x, bits)
    with torch.no_grad():
        y, yq = conv(x), q(x)
        codes = q.weight_codes()
        assert codes.dtype == torch.int8 and codes.shape == conv.weight.shape
        assert int(codes.abs().max()) == P.weight_qmax(bits)
        ref = F.conv2d(P.fake_quantize_activation(x, q.input_quantizer.scale, 8),
                       P.dequantize_weight(codes, q.weight_quantizer.scale), conv.bias, 1, 1)
    assert torch.equal(yq, ref)
    rel = float((yq - y).norm() / y.norm())
    lo, hi = REL_ERR_BOUNDS[("conv", bits)]
    assert lo < rel < hi, rel


@pytest.mark.parametrize("bits", [8, 4])
def test_quant_linear_from_float(bits):
    torch.manual_seed(0)
    nn.Conv2d(8, 16, 3, padding=1)  # same RNG stream as the measurement
    torch.randn(2, 8, 12, 12)
    lin = nn.Linear(32, 24)
    x = torch.randn(5, 32)
    q = QuantLinear.from_float(lin, bits, 8)
    assert isinstance(q, nn.Linear) and q.weight_quantizer.scale.shape == (24,)
    assert torch.equal(q.weight, lin.weight) and torch.equal(q.bias, lin.bias)
    _minmax(q, x, bits)
    with torch.no_grad():
        y, yq = lin(x), q(x)
        ref = F.linear(P.fake_quantize_activation(x, q.input_quantizer.scale, 8),
                       P.dequantize_weight(q.weight_codes(), q.weight_quantizer.scale), lin.bias)
    assert torch.equal(yq, ref)
    rel = float((yq - y).norm() / y.norm())
    lo, hi = REL_ERR_BOUNDS[("linear", bits)]
    assert lo < rel < hi, rel


def test_quant_layers_without_bias_and_strided():
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
    q = QuantConv2d.from_float(conv, 8, 4)
    x = torch.randn(1, 4, 9, 9)
    _minmax(q, x, 8, 4)
    assert q.bias is None
    with torch.no_grad():
        ref = F.conv2d(P.fake_quantize_activation(x, q.input_quantizer.scale, 4),
                       P.dequantize_weight(q.weight_codes(), q.weight_quantizer.scale), None, 2, 1)
        assert torch.equal(q(x), ref)
    assert q(x).shape == conv(x).shape == (1, 6, 5, 5)


def test_quant_conv_refuses_non_zero_padding_mode():
    with pytest.raises(ValueError, match="padding_mode 'reflect'"):
        QuantConv2d.from_float(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), 8, 8)


def test_gradients_flow_to_latent_weight():
    torch.manual_seed(2)
    q = QuantLinear.from_float(nn.Linear(6, 3), 4, 8)
    x = torch.randn(4, 6)
    _minmax(q, x, 4)
    q(x).sum().backward()
    assert q.weight.grad is not None and torch.isfinite(q.weight.grad).all()
    # STE: inside the grid the gradient equals the float layer's, i.e. sum over the batch of the
    # (fake-quantized) input
    xq = P.fake_quantize_activation(x, q.input_quantizer.scale, 8)
    torch.testing.assert_close(q.weight.grad, xq.sum(0).expand(3, 6), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- registry swap
@pytest.fixture(scope="module")
def small_unet(small_unet_dir):
    from diffusers import UNet2DModel

    return UNet2DModel.from_pretrained(str(small_unet_dir)).eval()


def _float_layer_names(model: nn.Module) -> list[str]:
    """Every Conv2d / Linear, counted independently of the registry."""
    return [n for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and not isinstance(m, (QuantConv2d, QuantLinear))]


def test_swap_in_quant_layers_on_real_unet(small_unet):
    import copy

    model = copy.deepcopy(small_unet)
    names = _float_layer_names(model)
    assert len(names) == 51  # c1_32_attn1_default: 25 Conv2d + 26 Linear
    assert sum(isinstance(model.get_submodule(n), nn.Conv2d) for n in names) == 25
    assert list(quantizable_layers(model)) == names
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    plan = {n: LayerBits(4 if i % 3 == 0 else 8, 8 if i % 2 == 0 else 4) for i, n in enumerate(names)}
    swapped = swap_in_quant_layers(model, plan)
    assert list(swapped) == names
    assert _float_layer_names(model) == []  # nothing left un-swapped
    qlayers = quant_layers(model)
    assert list(qlayers) == names
    for n, layer in qlayers.items():
        float_layer = small_unet.get_submodule(n)
        expected_type = QuantConv2d if isinstance(float_layer, nn.Conv2d) else QuantLinear
        assert type(layer) is expected_type
        assert (layer.weight_bits, layer.act_bits) == (plan[n].weight_bits, plan[n].act_bits)
        assert torch.equal(layer.weight, originals[n])
        assert layer.weight_quantizer.scale.shape == (float_layer.weight.shape[0],)
    # with quantizers neutralised the swapped UNet is the float UNet, to the bit
    for layer in qlayers.values():
        layer.input_quantizer.enabled = False
        layer.weight_quantizer.forward = lambda w: w
    torch.manual_seed(0)
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([10.0, 900.0])
    with torch.no_grad():
        assert torch.equal(model(x, t).sample, small_unet(x, t).sample)
    # already quantized layers are refused
    with pytest.raises(ValueError, match="cannot be quantized"):
        swap_in_quant_layers(model, {names[0]: LayerBits(8, 8)})
    assert quantizable_layers(model) == {}


def test_swap_refuses_non_quantizable_layer(small_unet):
    import copy

    model = copy.deepcopy(small_unet)
    norm_name = next(n for n, m in model.named_modules() if isinstance(m, nn.GroupNorm))
    with pytest.raises(ValueError, match=f"layer '{norm_name}' \\(GroupNorm\\) cannot be quantized"):
        swap_in_quant_layers(model, {norm_name: LayerBits(8, 8)})
    assert len(_float_layer_names(model)) == 51  # nothing swapped
