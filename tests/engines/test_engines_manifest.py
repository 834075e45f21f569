"""The ONNX and engine manifests: round trips, refusals and their messages, engine verification."""

from __future__ import annotations

import json
import re
from pathlib import Path

import onnx
import pytest

from pqcad_deploy.engines.errors import EngineDirectoryError, ManifestError
from pqcad_deploy.engines.manifest import (
    METADATA_KEY,
    OUTPUT_NAMES,
    PREDICTION_TYPES,
    V1_COPIES,
    EngineManifest,
    OnnxManifest,
    TensorRTBuildInfo,
    output_name_for,
    read_engine_manifest,
    read_onnx_manifest,
    sha256_file,
    verify_engine,
    write_engine_manifest,
)


def test_output_names() -> None:
    assert OUTPUT_NAMES == {"epsilon": "noise_pred", "sample": "sample_pred", "v_prediction": "v_pred"}
    assert set(OUTPUT_NAMES) == set(PREDICTION_TYPES)
    with pytest.raises(ManifestError, match="prediction_type 'x0' is not one of epsilon, sample, v_prediction"):
        output_name_for("x0")


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_onnx_manifest_json_round_trip(prediction_type: str, make_manifest) -> None:
    m = make_manifest(prediction_type)
    assert m.output_name == OUTPUT_NAMES[prediction_type]
    text = m.to_json()
    data = json.loads(text)
    assert list(data) == sorted(data)  # sorted JSON
    assert data["format"] == "pqcad-onnx" and data["version"] == 2
    assert data["image_shape"] == [3, 8, 8]
    assert not set(V1_COPIES) & set(data)  # version 2 stores no copy of a derived value
    assert (m.student_steps, m.input_names) == (4, ("sample", "timestep"))
    assert OnnxManifest.from_json(text) == m


def _as_version_1(m: OnnxManifest) -> dict:
    """The version 1 manifest export wrote for ``m``: the same keys plus its three copies."""
    return {**m.to_dict(), "version": 1, "student_steps": len(m.student_timesteps),
            "input_names": ["sample", "timestep"], "output_name": OUTPUT_NAMES[m.prediction_type]}


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_version_1_manifest_is_read_and_gives_the_same_values(prediction_type: str, make_manifest) -> None:
    m = make_manifest(prediction_type)
    old = OnnxManifest.from_dict(_as_version_1(m), source="old.onnx")
    assert old == m and old.version == 2
    assert (old.student_steps, old.input_names, old.output_name) == (4, ("sample", "timestep"), OUTPUT_NAMES[prediction_type])
    assert not set(V1_COPIES) & set(old.to_dict())  # written again, it is version 2


@pytest.mark.parametrize(("name", "value", "derived"), [
    ("student_steps", 3, "4"),
    ("output_name", "v_pred", "'noise_pred'"),
    ("input_names", ["x", "t"], "['sample', 'timestep']"),
])
def test_version_1_copy_that_disagrees_is_refused(name: str, value: object, derived: str, make_manifest) -> None:
    data = {**_as_version_1(make_manifest()), name: value}
    with pytest.raises(ManifestError) as info:
        OnnxManifest.from_dict(data, source="old.onnx")
    assert str(info.value) == (f"old.onnx: the version 1 manifest's {name} is {value!r}, but its other fields give "
                               f"{derived}; the manifest was edited: re-export the ONNX (or rebuild the engine).")


def test_version_2_manifest_with_a_copy_is_refused(make_manifest) -> None:
    data = {**make_manifest().to_dict(), "student_steps": 4}
    with pytest.raises(ManifestError, match=r"unknown manifest keys \['student_steps'\]"):
        OnnxManifest.from_dict(data)


def test_onnx_manifest_in_metadata(make_tiny_onnx, make_manifest) -> None:
    path = make_tiny_onnx("v_prediction")
    m = read_onnx_manifest(path)
    assert m == make_manifest("v_prediction")
    assert m.student_timesteps == (900, 600, 300, 0)
    keys = [p.key for p in onnx.load(str(path)).metadata_props]
    assert keys == [METADATA_KEY]


def test_foreign_onnx_refused(foreign_onnx: Path) -> None:
    with pytest.raises(ManifestError) as info:
        read_onnx_manifest(foreign_onnx)
    assert str(info.value) == f"{foreign_onnx} is not an ONNX written by pqcad-deploy export (no pqcad.manifest metadata)."


def test_corrupt_and_missing_files_refused(make_tiny_onnx, tmp_path: Path) -> None:
    good = make_tiny_onnx()
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(good.read_bytes()[:57])
    with pytest.raises(ManifestError, match=re.escape(f"{bad} is not a readable ONNX file")):
        read_onnx_manifest(bad)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\xff\xfe not a protobuf at all \x00\x01")
    with pytest.raises(ManifestError, match=re.escape(str(junk))):
        read_onnx_manifest(junk)
    with pytest.raises(ManifestError, match="does not exist or is not a file"):
        read_onnx_manifest(tmp_path / "nope.onnx")


def _with_metadata(path: Path, text: str) -> Path:
    model = onnx.load(str(path))
    model.metadata_props[0].value = text
    onnx.save(model, str(path))
    return path


def test_unknown_format_newer_version_and_bad_json(make_tiny_onnx, make_manifest) -> None:
    data = json.loads(make_manifest().to_json())
    p = _with_metadata(make_tiny_onnx(), json.dumps({**data, "format": "other-onnx"}))
    with pytest.raises(ManifestError, match="unknown manifest format 'other-onnx' \\(expected 'pqcad-onnx'\\)"):
        read_onnx_manifest(p)
    p = _with_metadata(make_tiny_onnx(name="v3.onnx"), json.dumps({**data, "version": 3}))
    with pytest.raises(ManifestError, match="manifest version 3 is newer than this runtime reads \\(2\\); upgrade pqcad-deploy"):
        read_onnx_manifest(p)
    p = _with_metadata(make_tiny_onnx(name="v1.onnx"), json.dumps(_as_version_1(make_manifest())))
    assert read_onnx_manifest(p) == make_manifest()  # an ONNX exported before version 2
    p = _with_metadata(make_tiny_onnx(name="bad.onnx"), "{not json")
    with pytest.raises(ManifestError, match="the manifest is not valid JSON"):
        read_onnx_manifest(p)


def test_unknown_and_missing_keys(make_manifest) -> None:
    data = json.loads(make_manifest().to_json())
    with pytest.raises(ManifestError, match=r"unknown manifest keys \['surprise'\]"):
        OnnxManifest.from_dict({**data, "surprise": 1})
    del data["student_timesteps"]
    with pytest.raises(ManifestError, match=r"lacks required keys \['student_timesteps'\]"):
        OnnxManifest.from_dict(data)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"precision": "w2a2"}, "precision='w2a2' is not one of w8a8, w4a8, w4a4, fp32, mixed"),
        ({"image_shape": (3, 8)}, "image_shape must be three positive integers"),
        ({"student_timesteps": (0, 300, 600, 900)}, "student_timesteps must be strictly descending"),
        ({"student_timesteps": (1500, 600, 300, 0)}, "beyond num_train_timesteps=1000"),
        ({"weight_bits": {"eight": 3}}, "weight_bits must map bit widths"),
        ({"scheduler_config": {"prediction_type": "sample"}}, "disagrees with scheduler_config's 'sample'"),
    ],
)
def test_invalid_fields(change: dict, message: str, make_manifest) -> None:
    with pytest.raises(ManifestError, match=re.escape(message)):
        make_manifest(**change)


def _float_graph(shape: tuple[int, int, int] = (3, 8, 8), output: str = "noise_pred",
                 quantized: bool = False) -> onnx.ModelProto:
    """sample -> (QuantizeLinear -> DequantizeLinear ->) Identity -> output; timestep an unused input."""
    from onnx import TensorProto, helper

    nodes, inits, x = [], [], "sample"
    if quantized:
        inits = [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]), helper.make_tensor("z", TensorProto.INT8, [], [0])]
        nodes = [helper.make_node("QuantizeLinear", ["sample", "s", "z"], ["q"]),
                 helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"])]
        x = "dq"
    nodes.append(helper.make_node("Identity", [x], [output]))
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch", *shape]),
         helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["batch"])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", *shape])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def _engine(tmp_path: Path, make_manifest) -> tuple[Path, EngineManifest]:
    d = tmp_path / "engine"
    d.mkdir()
    onnx.save(_float_graph(), str(d / "model.onnx"))
    m = EngineManifest(backend="onnxruntime", model_file="model.onnx", model_sha256=sha256_file(d / "model.onnx"),
                       source_onnx_sha256="cd" * 32, onnx=make_manifest())
    write_engine_manifest(d, m)
    return d, m


def test_engine_manifest_round_trip_and_flat_json(tmp_path: Path, make_manifest) -> None:
    d, m = _engine(tmp_path, make_manifest)
    data = json.loads((d / "engine.json").read_text())
    assert data["format"] == "pqcad-engine" and data["version"] == 3 and data["backend"] == "onnxruntime"
    assert "tensorrt" not in data  # an onnxruntime engine has no TensorRT build record
    # every key of the ONNX manifest sits next to the engine keys
    assert set(json.loads(m.onnx.to_json())) <= set(data) and not set(V1_COPIES) & set(data)
    assert read_engine_manifest(d) == m
    assert verify_engine(d) == m


def test_version_1_engine_json_is_read(tmp_path: Path, make_manifest) -> None:
    """An engine built before version 2: its flattened ONNX manifest keys are version 1's, copies included."""
    d, m = _engine(tmp_path, make_manifest)
    engine_keys = {k: v for k, v in m.to_dict().items() if k in ("backend", "model_file", "model_sha256", "source_onnx_sha256")}
    old = {**_as_version_1(m.onnx), **engine_keys, "format": "pqcad-engine", "version": 1}
    (d / "engine.json").write_text(json.dumps(old))
    assert verify_engine(d) == m and verify_engine(d).onnx.output_name == "noise_pred"
    (d / "engine.json").write_text(json.dumps({**old, "output_name": "sample_pred"}))
    with pytest.raises(ManifestError, match=re.escape(f"{d / 'engine.json'}: the version 1 manifest's output_name is "
                                                      "'sample_pred', but its other fields give 'noise_pred'")):
        verify_engine(d)
    (d / "engine.json").write_text(json.dumps({**old, "version": 2}))  # version 2 has no copies
    with pytest.raises(ManifestError, match=re.escape("unknown manifest keys ['input_names', 'output_name', 'student_steps']")):
        verify_engine(d)


ORIN_BUILD = {"tensorrt_version": "10.3.0", "gpu_name": "Orin", "compute_capability": "8.7",
              "trtexec_command": "trtexec --onnx=a.onnx --stronglyTyped"}


def _tensorrt_engine(tmp_path: Path, make_manifest) -> tuple[Path, EngineManifest]:
    """A tensorrt engine directory; the plan is stand-in bytes (verify_engine checks its checksum only)."""
    d = tmp_path / "trt-engine"
    d.mkdir()
    (d / "model.plan").write_bytes(b"serialized plan bytes")
    m = EngineManifest(backend="tensorrt", model_file="model.plan", model_sha256=sha256_file(d / "model.plan"),
                       source_onnx_sha256="cd" * 32, onnx=make_manifest(), tensorrt=TensorRTBuildInfo(**ORIN_BUILD))
    write_engine_manifest(d, m)
    return d, m


def test_tensorrt_engine_json_records_where_the_plan_was_built(tmp_path: Path, make_manifest) -> None:
    d, m = _tensorrt_engine(tmp_path, make_manifest)
    data = json.loads((d / "engine.json").read_text())
    assert data["version"] == 3 and data["backend"] == "tensorrt" and data["tensorrt"] == ORIN_BUILD
    assert verify_engine(d) == m and verify_engine(d).tensorrt.compute_capability == "8.7"


def test_version_2_tensorrt_engine_json_is_read_without_a_build_record(tmp_path: Path, make_manifest) -> None:
    d, m = _tensorrt_engine(tmp_path, make_manifest)
    data = json.loads((d / "engine.json").read_text())
    del data["tensorrt"]
    (d / "engine.json").write_text(json.dumps({**data, "version": 2}))
    old = verify_engine(d)
    assert old.tensorrt is None and old.version == 3 and old.onnx == m.onnx
    (d / "engine.json").write_text(json.dumps({**data, "version": 3}))  # version 3 requires it
    with pytest.raises(ManifestError) as info:
        verify_engine(d)
    assert str(info.value) == (f"{d / 'engine.json'}: the tensorrt engine manifest lacks its tensorrt object (the "
                               "TensorRT version and GPU that built the plan); rebuild the engine.")
    (d / "engine.json").write_text(json.dumps({**data, "version": 2, "tensorrt": ORIN_BUILD}))  # not a version 2 key
    with pytest.raises(ManifestError, match=re.escape("unknown manifest keys ['tensorrt']")):
        verify_engine(d)


@pytest.mark.parametrize(("change", "message"), [
    ({"compute_capability": "sm_87"}, "tensorrt.compute_capability must be \"major.minor\" like \"8.7\", got 'sm_87'"),
    ({"gpu_name": ""}, "tensorrt.gpu_name must be a non-empty string, got ''"),
    ({"tensorrt_version": None}, "tensorrt.tensorrt_version must be a non-empty string, got None"),
    ({"built_on": "Thor"}, "unknown manifest keys ['built_on']"),
])
def test_tensorrt_build_record_is_checked(tmp_path: Path, make_manifest, change: dict, message: str) -> None:
    d, _ = _tensorrt_engine(tmp_path, make_manifest)
    data = json.loads((d / "engine.json").read_text())
    data["tensorrt"] = {**data["tensorrt"], **change}
    (d / "engine.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=re.escape(message)):
        verify_engine(d)


def test_build_record_belongs_to_tensorrt_engines(make_manifest) -> None:
    with pytest.raises(ManifestError, match=re.escape("Engine manifest field tensorrt belongs to backend tensorrt "
                                                      "(a TensorRTBuildInfo), not 'onnxruntime'")):
        EngineManifest(backend="onnxruntime", model_file="model.onnx", model_sha256="ab" * 32,
                       source_onnx_sha256="cd" * 32, onnx=make_manifest(), tensorrt=TensorRTBuildInfo(**ORIN_BUILD))


def test_sha256_file_pinned(tmp_path: Path) -> None:
    p = tmp_path / "abc"
    p.write_bytes(b"abc")
    assert sha256_file(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_engine_missing_manifest(tmp_path: Path, make_manifest) -> None:
    d, _ = _engine(tmp_path, make_manifest)
    (d / "engine.json").unlink()
    with pytest.raises(EngineDirectoryError) as info:
        verify_engine(d)
    assert str(info.value) == f"{d} has no engine.json; it is not an engine built by pqcad-deploy build-engine (rebuild it)."


def test_engine_edited_model(tmp_path: Path, make_manifest) -> None:
    d, _ = _engine(tmp_path, make_manifest)
    (d / "model.onnx").write_bytes(b"model bytes, edited")
    with pytest.raises(EngineDirectoryError, match=r"model.onnx does not match the checksum in engine.json .*rebuild it"):
        verify_engine(d)


def test_engine_missing_model(tmp_path: Path, make_manifest) -> None:
    d, _ = _engine(tmp_path, make_manifest)
    (d / "model.onnx").unlink()
    with pytest.raises(EngineDirectoryError, match=r"model.onnx is missing; the engine directory is incomplete"):
        verify_engine(d)


def test_engine_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(EngineDirectoryError, match="is not a directory"):
        verify_engine(tmp_path / "nothing")


def test_engine_format_and_version_refused(tmp_path: Path, make_manifest) -> None:
    d, m = _engine(tmp_path, make_manifest)
    data = m.to_dict()
    (d / "engine.json").write_text(json.dumps({**data, "version": 7}))
    with pytest.raises(ManifestError, match="engine version 7 is newer than this runtime reads \\(3\\); upgrade pqcad-deploy"):
        verify_engine(d)
    (d / "engine.json").write_text(json.dumps({**data, "format": "pqcad-onnx"}))
    with pytest.raises(ManifestError, match="unknown engine format 'pqcad-onnx'"):
        verify_engine(d)
    (d / "engine.json").write_text(json.dumps({**data, "model_file": "../elsewhere.onnx"}))
    with pytest.raises(ManifestError, match="model_file must be a plain file name"):
        verify_engine(d)
    (d / "engine.json").write_text("[1, 2")
    with pytest.raises(ManifestError, match="is not valid JSON"):
        verify_engine(d)


# ----------------------------------------------------------------------------- manifest vs graph
def _engine_with(tmp_path: Path, make_manifest, model: onnx.ModelProto, **manifest_kw) -> Path:
    d = tmp_path / "engine"
    d.mkdir()
    onnx.save(model, str(d / "model.onnx"))
    m = EngineManifest(backend="onnxruntime", model_file="model.onnx", model_sha256=sha256_file(d / "model.onnx"),
                       source_onnx_sha256="cd" * 32, onnx=make_manifest(**manifest_kw))
    write_engine_manifest(d, m)
    return d


def _edit_engine_json(d: Path, **changes) -> None:
    data = json.loads((d / "engine.json").read_text())
    data.update(changes)
    (d / "engine.json").write_text(json.dumps(data))


@pytest.mark.parametrize("change, fragment", [
    ({"image_shape": [3, 16, 16]}, "the graph's 'sample' input has shape ['batch', 3, 8, 8]"
                                   .replace("'batch'", "?") + ", but engine.json claims image_shape [3, 16, 16]"),
    ({"image_shape": [1, 8, 8]}, "claims image_shape [1, 8, 8]"),
    ({"precision": "w4a4"}, "engine.json claims precision w4a4, but the graph has no QuantizeLinear / DequantizeLinear"),
    ({"precision": "mixed"}, "engine.json claims precision mixed, but the graph has no QuantizeLinear"),
    ({"prediction_type": "sample", "scheduler_config": None}, "the graph's outputs are ['noise_pred'], but engine.json promises 'sample_pred'"),
])
def test_engine_json_that_disagrees_with_its_model_is_refused(tmp_path: Path, make_manifest, change, fragment) -> None:
    d = _engine_with(tmp_path, make_manifest, _float_graph())
    assert verify_engine(d).onnx.precision == "fp32"
    if change.get("scheduler_config", 0) is None:
        data = json.loads((d / "engine.json").read_text())
        change["scheduler_config"] = {**data["scheduler_config"], "prediction_type": "sample"}
    _edit_engine_json(d, **change)
    with pytest.raises(ManifestError) as info:
        verify_engine(d)
    msg = str(info.value)
    assert fragment in msg and str(d / "model.onnx") in msg and "\n" not in msg


def test_fp32_claim_on_a_quantized_graph_is_refused(tmp_path: Path, make_manifest) -> None:
    d = _engine_with(tmp_path, make_manifest, _float_graph(quantized=True), precision="w8a8")
    assert verify_engine(d).onnx.precision == "w8a8"
    _edit_engine_json(d, precision="fp32")
    with pytest.raises(ManifestError, match=re.escape("claims precision fp32, but the graph holds quantized nodes "
                                                      "(DequantizeLinear, QuantizeLinear)")):
        verify_engine(d)


def test_graph_inputs_must_be_the_manifests(tmp_path: Path, make_manifest) -> None:
    from pqcad_deploy.engines.manifest import check_graph

    model = _float_graph()
    model.graph.input[1].name = "t"
    with pytest.raises(ManifestError, match=re.escape("the graph's inputs are ['sample', 't'], but its manifest "
                                                      "promises ['sample', 'timestep']")):
        check_graph(model, make_manifest(), "x.onnx")


def test_build_engine_checks_the_onnx_manifest_against_its_graph(make_tiny_onnx, tmp_path: Path) -> None:
    """A manifest claiming w4a4 on the float tiny graph (or another image shape) is refused before any build."""
    from pqcad_deploy.engines.build import build_onnxruntime_engine

    for kw, fragment in (({"precision": "w4a4"}, "its manifest claims precision w4a4, but the graph has no"),
                         ({"image_shape": (3, 16, 16)}, "but its manifest claims image_shape [3, 16, 16]")):
        onnx_path = make_tiny_onnx(name=f"{kw}.onnx".replace(" ", ""), **kw)
        with pytest.raises(ManifestError) as info:
            build_onnxruntime_engine(onnx_path, tmp_path / "engine")
        assert fragment in str(info.value) and str(onnx_path) in str(info.value)
        assert not (tmp_path / "engine").exists()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".engine")] == []
