"""First/last-layer precision policies and float-input layers through artifact, export and parity."""

from __future__ import annotations

import pytest
import torch

from pqcad_deploy.errors import ConfigError
from pqcad_deploy.layer_precision import apply_first_last, default_first_last
from pqcad_deploy.quant.layers import QuantConv2d
from pqcad_deploy.quant.replace import LayerBits

PLAN = {"conv_in": LayerBits(4, 8), "mid.conv": LayerBits(4, 8), "conv_out": LayerBits(4, 8)}


def test_w8_fp_input_keeps_first_and_last_inputs_in_float():
    plan = apply_first_last(PLAN, "w8-fp-input")
    assert plan == {"conv_in": LayerBits(8, None), "mid.conv": LayerBits(4, 8), "conv_out": LayerBits(8, None)}
    assert PLAN["conv_in"] == LayerBits(4, 8)  # the input plan is not modified


def test_w8a8_and_target_policies():
    assert apply_first_last(PLAN, "w8a8")["conv_out"] == LayerBits(8, 8)
    assert apply_first_last(PLAN, "target") == PLAN


def test_unknown_policy_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match="--first-last must be one of w8-fp-input, w8a8, target; got 'fp'"):
        apply_first_last(PLAN, "fp")


def test_defaults_per_method():
    assert default_first_last("minmax") == "target"
    assert default_first_last("brecq") == default_first_last("pqcad") == "w8-fp-input"


def test_float_input_layer_is_exactly_the_float_conv_on_its_input():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 3, 3, padding=1)
    q = QuantConv2d.from_float(conv, 8, None)
    q.input_quantizer.observing = True  # a float input observes nothing and never quantizes
    x = torch.randn(2, 2, 8, 8) * 5
    w = q.quantized_weight()
    expected = torch.nn.functional.conv2d(x, w, conv.bias, padding=1)
    assert torch.equal(q(x), expected)
    assert float(q.input_quantizer.observed_amax) == 0.0
    assert not q.input_quantizer.quantizes and q.act_bits is None
