"""benchmarks/modelopt_agreement.py: the quantized-tensor key, the comparison and the facts.

The key tests build two small graphs by hand that compute the same thing the way the two exporters
write it: ModelOpt's (float weights behind their own Q/DQ, one Q/DQ shared by every reader of a tensor,
Linear as Gemm, FP16 Casts) and ours (int8 weight codes behind a DequantizeLinear, one Q/DQ per reader,
Linear as MatMul + Add). Their keys must agree exactly where the placement agrees. The last test runs
the real comparison on the builtin model and needs ModelOpt (skipped elsewhere, with that reason).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks.modelopt_agreement import (
    DELIBERATE_DIFFERENCES, Deliberate, compare, main, placement_facts, quantized_inputs, quantized_tensors,
)


def _init(name: str, shape: tuple[int, ...], dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ones(shape, dtype=dtype), name)


def _qdq(prefix: str, tensor: str, scale: str, zp: str, out: str) -> list[onnx.NodeProto]:
    return [helper.make_node("QuantizeLinear", [tensor, scale, zp], [f"{prefix}_q"], name=f"{prefix}/Q"),
            helper.make_node("DequantizeLinear", [f"{prefix}_q", scale, zp], [out], name=f"{prefix}/DQ")]


def _model(nodes, inits, inputs=("x",), outputs=("y",)) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(i, TensorProto.FLOAT, None) for i in inputs],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _scales() -> list[onnx.TensorProto]:
    return [_init("s", ()), numpy_helper.from_array(np.zeros((), np.int8), "zp"),
            _init("ws", (4,)), numpy_helper.from_array(np.zeros(4, np.int8), "wzp")]


def modelopt_style() -> onnx.ModelProto:
    """x -> Cast -> Q/DQ (shared by conv1, the residual Add and a Shape) -> conv1 -> Add(residual);
    t -> Q/DQ -> Gemm (float weight behind Q/DQ); attention-like MatMul of two Q/DQ'd activations."""
    nodes = [helper.make_node("Cast", ["x"], ["x16"], to=TensorProto.FLOAT16, name="x_cast_to_fp16")]
    nodes += _qdq("xq", "x16", "s", "zp", "x_dq")
    nodes += _qdq("w1", "down.conv1.weight", "ws", "wzp", "w1_dq")
    nodes[-2].attribute.append(helper.make_attribute("axis", 0))
    nodes += [
        helper.make_node("Cast", ["x_dq"], ["x_dq32"], to=TensorProto.FLOAT, name="x_dq_cast"),
        helper.make_node("Conv", ["x_dq32", "w1_dq"], ["c1"], name="/unet/down/conv1/Conv"),
        helper.make_node("Shape", ["x_dq"], ["shp"], name="/unet/down/norm1/Shape"),
        helper.make_node("Add", ["x_dq", "c1"], ["res"], name="/unet/down/Add_1"),
    ]
    nodes += _qdq("tq", "t", "s", "zp", "t_dq")
    nodes += _qdq("lw", "time_embedding.linear_1.weight", "ws", "wzp", "lw_dq")
    nodes += [helper.make_node("Gemm", ["t_dq", "lw_dq", "time_embedding.linear_1.bias"], ["emb"], transB=1,
                               name="/unet/time_embedding/linear_1/Gemm")]
    nodes += _qdq("aq", "res", "s", "zp", "a_dq")
    nodes += [helper.make_node("MatMul", ["a_dq", "a_dq"], ["y"], name="/unet/down/attentions.0/MatMul")]
    inits = _scales() + [_init("down.conv1.weight", (4, 4, 3, 3)), _init("time_embedding.linear_1.weight", (4, 4)),
                         _init("time_embedding.linear_1.bias", (4,))]
    return _model(nodes, inits, inputs=("x", "t"), outputs=("y", "emb", "shp"))


def ours_style() -> onnx.ModelProto:
    """The same network as our qdq export writes it: int8 codes -> DQ, one Q/DQ per reader, MatMul + Add."""
    nodes = _qdq("down.conv1/input", "x", "s", "zp", "x_dq")
    nodes += [
        helper.make_node("DequantizeLinear", ["down.conv1.weight_codes", "ws", "wzp"], ["w1_dq"], axis=0,
                         name="down.conv1/weight_dequantize"),
        helper.make_node("Conv", ["x_dq", "w1_dq"], ["c1"], name="/unet/down/conv1/Conv"),
        helper.make_node("Shape", ["x"], ["shp"], name="/unet/down/norm1/Shape"),
        helper.make_node("Add", ["x", "c1"], ["res"], name="/unet/down/Add_1"),
    ]
    nodes += _qdq("time_embedding.linear_1/input", "t", "s", "zp", "t_dq")
    nodes += [
        helper.make_node("DequantizeLinear", ["time_embedding.linear_1.weight_codes", "ws", "wzp"], ["lw_dq"], axis=1,
                         name="time_embedding.linear_1/weight_dequantize"),
        helper.make_node("MatMul", ["t_dq", "lw_dq"], ["mm"], name="/unet/time_embedding/linear_1/MatMul"),
        helper.make_node("Add", ["mm", "time_embedding.linear_1.bias"], ["emb"], name="/unet/time_embedding/linear_1/Add"),
        helper.make_node("MatMul", ["res", "res"], ["y"], name="/unet/down/attentions.0/MatMul"),
    ]
    inits = _scales() + [numpy_helper.from_array(np.ones((4, 4, 3, 3), np.int8), "down.conv1.weight_codes"),
                         numpy_helper.from_array(np.ones((4, 4), np.int8), "time_embedding.linear_1.weight_codes"),
                         _init("time_embedding.linear_1.bias", (4,))]
    return _model(nodes, inits, inputs=("x", "t"), outputs=("y", "emb", "shp"))


MODELOPT_KEYS = {
    "Conv down.conv1/Conv[0]", "Conv down.conv1/Conv[1]",
    "Add down/Add_1[0]",
    "Linear time_embedding.linear_1/MatMul[0]", "Linear time_embedding.linear_1/MatMul[1]",
    "BMM down.attentions.0/MatMul[0]", "BMM down.attentions.0/MatMul[1]",
}


def test_modelopt_style_keys_look_through_casts_and_skip_shape_readers():
    assert quantized_tensors(modelopt_style()) == MODELOPT_KEYS


def test_ours_style_keys_match_where_the_placement_matches():
    assert quantized_tensors(ours_style()) == {
        "Conv down.conv1/Conv[0]", "Conv down.conv1/Conv[1]",
        "Linear time_embedding.linear_1/MatMul[0]", "Linear time_embedding.linear_1/MatMul[1]",
    }


def test_roles_and_sources():
    got = {q.key: (q.role, q.source) for q in quantized_inputs(modelopt_style())}
    assert got["Conv down.conv1/Conv[1]"] == ("weight", "down.conv1.weight")  # float weight behind Q/DQ
    assert got["Conv down.conv1/Conv[0]"] == ("activation", "x16")
    ours = {q.key: (q.role, q.source) for q in quantized_inputs(ours_style())}
    assert ours["Linear time_embedding.linear_1/MatMul[1]"] == ("weight", "time_embedding.linear_1.weight_codes")
    # the one shared DequantizeLinear is read by conv1 (through a Cast) and by the Add
    shared = [q.key for q in quantized_inputs(modelopt_style()) if q.dequantize == "x_dq"]
    assert shared == ["Conv down.conv1/Conv[0]", "Add down/Add_1[0]"]


def test_a_dequantize_without_quantize_of_a_computed_tensor_is_not_counted():
    nodes = [helper.make_node("DequantizeLinear", ["x", "s", "zp"], ["x_dq"], name="dq"),
             helper.make_node("Relu", ["x_dq"], ["y"], name="/unet/act/Relu")]
    assert quantized_tensors(_model(nodes, _scales())) == set()


def test_compare_accepts_listed_differences_only():
    listed = (Deliberate("bmm", "modelopt", ("BMM *[0]",), "why"),)
    result = compare(MODELOPT_KEYS, quantized_tensors(ours_style()), listed)
    assert result.common == MODELOPT_KEYS - {"Add down/Add_1[0]", "BMM down.attentions.0/MatMul[0]",
                                             "BMM down.attentions.0/MatMul[1]"}
    assert result.accepted == {"BMM down.attentions.0/MatMul[0]": "bmm"}  # brackets are literal: [1] is not
    assert result.unlisted == {"modelopt": ["Add down/Add_1[0]", "BMM down.attentions.0/MatMul[1]"], "ours": []}
    assert not result.ok
    assert result.per_kind()["BMM"] == {"modelopt": 2, "ours": 0, "common": 0, "only_modelopt": 2, "only_ours": 0,
                                        "accepted": 1, "unlisted": 1}
    # a listed difference on the other side does not accept it
    assert compare({"A x/Add[0]"}, set(), (Deliberate("a", "ours", ("A *",), "why"),)).unused == ("a",)


def test_default_list_covers_the_attention_bmms_and_time_embedding():
    result = compare({"BMM mid_block.attentions.0/MatMul_1[1]", "Mul time_embedding.act/Mul[0]",
                      "Reshape up_blocks.1.resnets.0.norm1/Reshape[0]", "Add up_blocks.1.resnets.0/Add_1[0]"},
                     {"Linear up_blocks.2.resnets.1.time_emb_proj/MatMul[0]"}, DELIBERATE_DIFFERENCES)
    assert result.unlisted == {"modelopt": ["Add up_blocks.1.resnets.0/Add_1[0]"], "ours": []}
    assert all(d.reason for d in DELIBERATE_DIFFERENCES)


def test_placement_facts_counts_sharing_and_adds():
    mo, ours = placement_facts(modelopt_style()), placement_facts(ours_style())
    assert (mo["quantize_nodes"], mo["dequantize_nodes"], mo["activation_qdq_pairs"]) == (5, 5, 3)
    assert mo["one_qdq_per_tensor"] and mo["activation_readers_of_a_shared_dequantize"] == 4  # x_dq: 2, a_dq: 2
    assert mo["weight_storage"] == {"float initializer -> QuantizeLinear -> DequantizeLinear": 2}
    assert ours["weight_storage"] == {"int8 initializer -> DequantizeLinear": 2}
    assert mo["adds"]["residual"] == {"nodes": 1, "with_qdq": 1, "both_inputs_qdq": 0,
                                      "one_input_qdq_other_a_conv_output": 1}
    assert ours["adds"] == {"bias": {"nodes": 1, "with_qdq": 0, "both_inputs_qdq": 0},
                            "residual": {"nodes": 1, "with_qdq": 0, "both_inputs_qdq": 0}}
    assert mo["ops"]["BMM"] == {"nodes": 1, "input_quantized": 1, "output_quantized": 0}
    assert mo["io_casts"] == [{"node": "x_cast_to_fp16", "reads": "x", "writes": "x16", "to": "float16"}]
    assert mo["quantize_scale_dtypes"] == {"float": 5} and mo["opset"] == 17


def test_cli_compare_exit_codes_and_json(tmp_path, capsys):
    mo, ours = tmp_path / "mo.onnx", tmp_path / "ours.onnx"
    onnx.save(modelopt_style(), mo)
    onnx.save(ours_style(), ours)
    report = tmp_path / "r.json"
    assert main(["compare", "--modelopt", str(mo), "--ours", str(ours), "--json", str(report)]) == 1
    out = capsys.readouterr().out
    assert "UNLISTED, quantized only by ModelOpt (1):\n  Add down/Add_1[0]" in out
    data = json.loads(report.read_text())
    assert data["counts"] == {"modelopt": 7, "ours": 4, "common": 4, "only_modelopt": 3, "only_ours": 0,
                              "accepted": 2, "unlisted": 1}
    assert data["accepted"]["attention-bmm"]["keys"] == ["BMM down.attentions.0/MatMul[0]",
                                                         "BMM down.attentions.0/MatMul[1]"]
    assert main(["compare", "--modelopt", str(mo), "--ours", str(ours), "--allow", "modelopt:Add down/Add_1[0]"]) == 0
    assert "agreement: yes" in capsys.readouterr().out
    assert main(["compare", "--modelopt", str(tmp_path / "nope.onnx"), "--ours", str(ours)]) == 2
    assert "nope.onnx does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compare", "--modelopt", str(mo), "--ours", str(ours), "--allow", "both:x"])


@pytest.fixture(scope="module")
def builtin_exports(tmp_path_factory):
    """FP, --target qdq and --target tensorrt ONNX of a minmax W8A8 artifact of the builtin model (tiny
    calibration set)."""
    pytest.importorskip("modelopt.onnx.quantization", reason="nvidia-modelopt (its ONNX PTQ) is not installed")
    import dataclasses

    import torch

    from pqcad_deploy.compress import compress
    from pqcad_deploy.config import CompressConfig
    from pqcad_deploy.converters.export_onnx import export_onnx
    from pqcad_deploy.presets import PRESETS, CalibrationConfig

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("modelopt_agreement")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PRESETS, "fast", dataclasses.replace(
            PRESETS["fast"], calibration=CalibrationConfig(num_trajectories=1, timesteps_kept=2, batch_size=2)))
        compress(CompressConfig(method="minmax", preset="fast", teacher_steps=20, distill=False), root / "art",
                 progress=False)
    export_onnx(root / "art", root / "fp.onnx", fp=True)
    export_onnx(root / "art", root / "qdq.onnx", target="qdq")
    export_onnx(root / "art", root / "tensorrt.onnx", target="tensorrt")
    return root


def test_real_comparison_with_modelopt_on_the_builtin_model(builtin_exports):
    from benchmarks.modelopt_agreement import compare_files, modelopt_quantize

    root = builtin_exports
    info = modelopt_quantize(root / "fp.onnx", root / "mo.onnx", samples=4)
    assert info["call"]["quantize_mode"] == "int8" and "calibration_shapes" not in info["call"]
    report = compare_files(root / "mo.onnx", root / "qdq.onnx")
    # the baseline's known gaps, and nothing else: Q/DQ on the residual Adds' second input (the 11
    # time-embedding Adds are a listed difference) and on the upsamplers' Resize inputs
    assert report["per_kind"]["Conv"]["common"] == 72 and report["per_kind"]["Conv"]["unlisted"] == 0
    assert report["unlisted"]["ours"] == []
    unlisted = report["unlisted"]["modelopt"]
    assert sorted(k for k in unlisted if k.startswith("Add ")) == sorted(k for k in unlisted if k.endswith("/Add_1[0]"))
    assert len([k for k in unlisted if k.startswith("Add ")]) == 11
    assert [k for k in unlisted if not k.startswith("Add ")] == ["Resize up_blocks.0.upsamplers.0/Resize[0]",
                                                                 "Resize up_blocks.1.upsamplers.0/Resize[0]"]
    mo = report["facts"]["modelopt"]
    assert mo["one_qdq_per_tensor"] and not report["facts"]["ours"]["one_qdq_per_tensor"]
    assert mo["adds"]["residual"]["with_qdq"] == 11 and mo["adds"]["time_embedding"]["with_qdq"] == 11
    assert mo["opset"] == 19 and mo["graph_float_dtype"] == {"float16": 119}
    # --target tensorrt closes those gaps: every difference left is a listed, deliberate one
    report = compare_files(root / "mo.onnx", root / "tensorrt.onnx")
    assert report["unlisted"] == {"modelopt": [], "ours": []}
    assert report["facts"]["ours"]["one_qdq_per_tensor"]
    assert report["per_kind"]["Add"]["common"] == 11 and report["per_kind"]["Resize"]["common"] == 2
    assert report["per_kind"]["Add"]["accepted"] == 11  # the time-embedding Adds, left in FP16 on purpose
