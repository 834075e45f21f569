"""The precision policy: which layers it matches, what it records, and the graph export writes for it."""

from __future__ import annotations

import json

import onnx
import pytest

from pqcad_deploy.choices import PRECISION_POLICY_NAMES
from pqcad_deploy.errors import ConfigError
from pqcad_deploy.precision_policy import (
    PRECISION_POLICIES, apply_precision_policy, float_layers, layer_macs, precision_policy_report,
)
from pqcad_deploy.quant.replace import LayerBits, quantizable_layers

NAMES = ["conv_in", "time_embedding.linear_1", "time_embedding.linear_2", "down_blocks.0.resnets.0.conv1",
         "down_blocks.0.resnets.0.time_emb_proj", "down_blocks.1.resnets.0.conv_shortcut",
         "down_blocks.1.attentions.0.to_q", "mid_block.attentions.0.to_k", "up_blocks.0.resnets.0.conv_shortcut",
         "conv_out"]


def test_the_registry_and_the_cli_choices_name_the_same_policies():
    assert tuple(PRECISION_POLICIES) == PRECISION_POLICY_NAMES


def test_tensorrt_safe_keeps_the_time_embedding_path_and_the_shortcut_convs_float():
    assert float_layers(NAMES, "tensorrt-safe") == [
        "time_embedding.linear_1", "time_embedding.linear_2", "down_blocks.0.resnets.0.time_emb_proj",
        "down_blocks.1.resnets.0.conv_shortcut", "up_blocks.0.resnets.0.conv_shortcut"]
    assert float_layers(NAMES, "all") == []


def test_user_patterns_add_to_the_policy_and_match_whole_names():
    assert float_layers(NAMES, "all", ["*attentions*", "conv_in"]) == [
        "conv_in", "down_blocks.1.attentions.0.to_q", "mid_block.attentions.0.to_k"]
    both = float_layers(NAMES, "tensorrt-safe", ["mid_block.*"])
    assert "mid_block.attentions.0.to_k" in both and "time_embedding.linear_1" in both


def test_a_pattern_that_matches_nothing_is_refused_with_example_names():
    with pytest.raises(ConfigError, match=r"--keep-float 'conv' matches no quantizable layer.*conv_in"):
        float_layers(NAMES, "all", ["conv"])  # a whole-name pattern: 'conv' alone is no layer
    with pytest.raises(ConfigError, match="--precision-policy must be one of all, tensorrt-safe"):
        float_layers(NAMES, "none")


def test_the_plan_loses_exactly_the_float_layers():
    plan = {n: LayerBits(8, 8) for n in NAMES}
    kept = apply_precision_policy(plan, "tensorrt-safe", ["conv_out"])
    assert set(plan) - set(kept) == set(float_layers(NAMES, "tensorrt-safe", ["conv_out"]))
    assert all(kept[n] == plan[n] for n in kept)


def test_mac_shares_are_measured_on_a_real_forward(small_unet_dir):
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(str(small_unet_dir)).eval()
    macs = layer_macs(unet, (1, 32, 32))
    # conv_in: 32x32 outputs x 16 channels x (1 input channel x 3x3)
    assert macs["conv_in"] == 32 * 32 * 16 * 9
    # the time embedding runs once per image: linear_1 is in_features x out_features MACs
    lin = unet.time_embedding.linear_1
    assert macs["time_embedding.linear_1"] == lin.in_features * lin.out_features
    plan = {n: LayerBits(8, 8) for n in quantizable_layers(unet)}
    report = precision_policy_report(unet, (1, 32, 32), plan, "tensorrt-safe")
    assert report["float_mac_share"] + report["quantized_mac_share"] == pytest.approx(1.0)
    assert 0 < report["float_mac_share"] < 0.2
    assert set(report["float_layers"]) == set(float_layers(plan, "tensorrt-safe"))


def test_compress_and_export_follow_the_policy(small_unet_dir, tmp_path):
    """The artifact records the policy and leaves the float layers out; the ONNX has no Q/DQ on them."""
    from pqcad_deploy.converters.export_onnx import export_onnx
    from pqcad_deploy.compress import compress
    from pqcad_deploy.config import CompressConfig

    art = tmp_path / "art"
    compress(CompressConfig(model=str(small_unet_dir), method="minmax", distill=False, teacher_steps=10,
                            preset="fast", precision_policy="tensorrt-safe", keep_float=("*attentions*",)),
             art, progress=False)
    manifest = json.loads((art / "artifact.json").read_text())
    report = json.loads((art / "report.json").read_text())
    assert manifest["options"]["precision_policy"] == "tensorrt-safe"
    assert manifest["options"]["keep_float"] == ["*attentions*"]
    floats = set(report["precision_policy"]["float_layers"])
    assert "time_embedding.linear_1" in floats and any("attentions" in n for n in floats)
    assert not floats & set(manifest["layers"]), "a float layer was quantized"
    assert "down_blocks.0.resnets.0.conv1" in manifest["layers"]

    onnx_path = export_onnx(art, tmp_path / "m.onnx", target="qdq").path
    graph = onnx.load(str(onnx_path)).graph
    dq_outputs = {o for node in graph.node if node.op_type == "DequantizeLinear" for o in node.output}
    quantized_inputs = {n.name for n in graph.node if n.op_type in ("Conv", "MatMul", "Gemm")
                        and any(i in dq_outputs for i in n.input)}
    float_compute = [n.name for n in graph.node if n.op_type in ("Conv", "MatMul", "Gemm")
                     and not any(i in dq_outputs for i in n.input)]
    assert quantized_inputs, "nothing quantized at all"
    # every float layer's op reads no dequantized tensor; the time embedding Gemm/MatMul among them
    assert any("time_embedding" in name for name in float_compute), float_compute
    assert not any("time_embedding" in name or "conv_shortcut" in name for name in quantized_inputs)
