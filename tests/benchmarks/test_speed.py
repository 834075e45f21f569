"""benchmarks/speed.py: its pure helpers on tiny given inputs (no model, no timing run)."""

from __future__ import annotations

import pytest

from benchmarks.speed import (
    MODELS, add_ratios, models, pending_stages, per_second, ratio, size_on_disk, stages, summarize, time_calls,
)


def test_summarize_median_min_max():
    s = summarize([0.3, 0.1, 0.2, 0.5, 0.4])
    assert s == {"median_s": 0.3, "min_s": 0.1, "max_s": 0.5, "reps": 5}
    assert summarize([2.0, 4.0])["median_s"] == 3.0  # even count: mean of the middle two
    with pytest.raises(ValueError):
        summarize([])


def test_time_calls_warms_up_then_times_reps():
    calls = []
    s = time_calls(lambda: calls.append("run"), 4, warmup=lambda: calls.append("warm"), warmup_calls=2)
    assert calls == ["warm", "warm", "run", "run", "run", "run"]
    assert s["reps"] == 4 and 0 <= s["min_s"] <= s["median_s"] <= s["max_s"]
    with pytest.raises(ValueError):
        time_calls(lambda: None, 0)


def test_ratio_and_throughput():
    assert ratio(6.0, 2.0) == 3.0
    assert ratio(None, 2.0) is None and ratio(1.0, None) is None and ratio(1.0, 0.0) is None
    t = per_second(8, {"median_s": 2.0, "min_s": 1.0, "max_s": 4.0})
    assert t == {"per_s": 4.0, "per_s_best": 8.0, "per_s_worst": 2.0}


def test_add_ratios_against_reference_rows():
    rows = [{"label": "diffusers", "images_per_s": 2.0}, {"label": "ort", "images_per_s": 5.0},
            {"label": "int8", "images_per_s": 10.0}, {"label": "broken", "error": "x"}]
    out = add_ratios(rows, "images_per_s", {"diffusers": rows[0], "ort": rows[1], "missing": None})
    assert [r["images_per_s_vs_diffusers"] for r in out] == [1.0, 2.5, 5.0, None]
    assert [r["images_per_s_vs_ort"] for r in out] == [0.4, 1.0, 2.0, None]
    assert all(r["images_per_s_vs_missing"] is None for r in out)
    assert "images_per_s_vs_ort" not in rows[0]  # the input rows are not modified


def test_size_on_disk(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    sub = tmp_path / "d"
    sub.mkdir()
    (sub / "b.bin").write_bytes(b"y" * 23)
    (sub / "e").mkdir()
    (sub / "e" / "c.bin").write_bytes(b"z" * 7)
    assert size_on_disk(tmp_path / "a.bin") == 100
    assert size_on_disk(sub) == 30
    assert size_on_disk(tmp_path) == 130
    assert size_on_disk(tmp_path / "nope") is None


def test_stages_cover_every_engine_and_resume(tmp_path):
    outputs = [s.output for s in stages()]
    assert len(outputs) == len(set(outputs))
    for m in MODELS:  # every timed engine is built from an ONNX that an earlier stage writes
        assert outputs.index(m.onnx) < outputs.index(m.engine)
        assert outputs.index(m.artifact) < outputs.index(m.onnx)
    assert [s.output for s in pending_stages(tmp_path)] == outputs
    (tmp_path / "fp_art").mkdir()
    (tmp_path / "fp32.onnx").write_bytes(b"")
    assert [s.output for s in pending_stages(tmp_path)] == outputs[2:]
    by_out = {s.output: s.argv for s in stages()}
    assert "--fp" in by_out["fp32.onnx"] and ("--weight-bits", "4") == by_out["w4a8"][3:5]
    assert by_out["w4a8_int4.onnx"][-2:] == ("--opset", "21")
    assert by_out["w8a8_ort-x86.onnx"][-2:] == ("--target", "ort-x86")
    assert by_out["w4a8_ort-qlinear.onnx"][-2:] == ("--target", "ort-qlinear")


def test_no_w4a8_leaves_out_its_stages_and_engines():
    outs = [s.output for s in stages(include_w4a8=False)]
    assert not [o for o in outs if "w4a8" in o]
    assert {m.engine for m in models(False)} == {"eng_fp32", "eng_w8a8", "eng_w8a8_ort-x86", "eng_w8a8_ort-qlinear"}
    assert len(models()) == len(MODELS) == 8
