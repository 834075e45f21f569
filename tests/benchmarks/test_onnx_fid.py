"""benchmarks/onnx_fid.py: the row syntax (its sampling is tested in tests/engines, beside the tiny ONNX fixture)."""

from __future__ import annotations

import pytest

from benchmarks.onnx_fid import parse_model


def test_parse_model() -> None:
    assert parse_model("ort=alt/x.onnx") == ("ort", "alt/x.onnx", False)
    assert parse_model("ours=w8a8.onnx@own") == ("ours", "w8a8.onnx", True)
    with pytest.raises(SystemExit, match="expected NAME=PATH"):
        parse_model("w8a8.onnx")
