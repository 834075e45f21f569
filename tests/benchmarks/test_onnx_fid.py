"""benchmarks/onnx_fid.py: the row syntax (its sampling is tested in tests/engines, beside the tiny ONNX fixture)."""

from __future__ import annotations

import pytest

from benchmarks.onnx_fid import main, parse_model


def test_parse_model() -> None:
    assert parse_model("ort=alt/x.onnx") == ("ort", "alt/x.onnx", False)
    assert parse_model("ours=w8a8.onnx@own") == ("ours", "w8a8.onnx", True)
    with pytest.raises(SystemExit, match="expected NAME=PATH"):
        parse_model("w8a8.onnx")


def test_bad_inputs_are_refused_before_any_work(tmp_path) -> None:
    with pytest.raises(SystemExit, match="missing.onnx does not exist"):
        main(["--fp32", str(tmp_path / "missing.onnx"), "--model", "x=y.onnx", "--out", str(tmp_path / "o")])
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"")
    with pytest.raises(SystemExit, match="--n must be a positive integer, got 0"):
        main(["--fp32", str(onnx_file), "--model", f"x={onnx_file}", "--n", "0", "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
