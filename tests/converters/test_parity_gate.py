"""Export's parity gate (pass / fail with the reason; a failing export writes nothing), the
`onnxruntime` default target's choice, and byte-reproducible ONNX and engine directories."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import pqcad_deploy.converters.export_onnx as export_module
from pqcad_deploy.converters.export_onnx import ParityGateError, export_onnx, resolve_target
from pqcad_deploy.converters.parity import (EXACT_REL_TOL, FLIP_FRACTION_TOL, LayerFlips, ParityReport, parity_verdict)
from pqcad_deploy.engines.build import build_onnxruntime_engine

NAME = "c1_32_attn1_default"


def _report(rel=(1e-7, 2e-7, 3e-7, 1e-7), first=None, clean=(0, 1, 2, 3), non_finite=None) -> ParityReport:
    return ParityReport(sample_rel_errors=list(rel), first_divergence=first, samples_without_flips=list(clean),
                        non_finite=non_finite)


def test_the_gate_applies_the_stated_tolerances():
    assert EXACT_REL_TOL == 1e-5 and FLIP_FRACTION_TOL == 1e-3  # README "Parity, and its tolerance"
    ok = parity_verdict(_report())
    assert ok.passed and str(ok).startswith("pass (4/4 inputs with identical codes") and "no rounding flips" in str(ok)
    flip = LayerFlips("down.0.conv", flipped=3, total=4096, max_code_difference=1)
    ok = parity_verdict(_report(rel=(1e-7, 0.02, 1e-7, 1e-7), first=flip, clean=(0, 2, 3)))
    assert ok.passed and "first flip in down.0.conv: 3/4096" in ok.reason
    ok = parity_verdict(_report(rel=(0.02, 0.03, 0.01, 0.2), first=flip, clean=()))
    assert ok.passed and ok.reason.startswith("every input had a rounding flip")  # the codes decide
    cases = [
        (_report(rel=(3e-5, 1e-7, 1e-7, 1e-7)), "relative error 3.00e-05", "threshold 1e-05"),
        (_report(first=LayerFlips("a", 10, 4096, 1), clean=(0,)), "differs in 2.44e-03 of its codes", "threshold 1e-03"),
        (_report(first=LayerFlips("a", 1, 4096, 2), clean=(0,)), "differ by up to 2 steps", "threshold 1"),
        (_report(non_finite="ONNX Runtime output has 7 nan/inf values"), "7 nan/inf values", "must be finite"),
    ]
    for report, measured, threshold in cases:
        verdict = parity_verdict(report)
        assert not verdict.passed and str(verdict).startswith("fail (")
        assert measured in verdict.reason and threshold in verdict.reason, verdict.reason


def test_onnxruntime_target_resolves_by_activation_bits():
    a8 = {"conv_in": None, "down.conv": 8, "attn.to_q": 8}
    assert resolve_target("onnxruntime", a8)[0] == "ort-qlinear"
    assert resolve_target("onnxruntime", a8, "int4") == ("qdq", "--weight-storage int4 is a qdq layout")
    assert resolve_target("onnxruntime", {**a8, "up.conv": 4})[0] == "qdq"
    assert resolve_target("onnxruntime", a8, fp=True)[0] == "qdq"
    assert resolve_target("ort-x86", a8) == ("ort-x86", "")


def _broken_tidy(change):
    """Wrap _tidy_graph so the written graph carries an export bug (`change` edits the initializers)."""
    tidy = export_module._tidy_graph

    def broken(model, layer_bits):
        tidy(model, layer_bits)
        inits = {i.name: i for i in model.graph.initializer}
        for name, fn in change.items():
            inits[name].CopyFrom(numpy_helper.from_array(fn(numpy_helper.to_array(inits[name])), name))
    return broken


@pytest.mark.parametrize("change, fragment", [
    ({"down_blocks.0.resnets.0.conv1.act_scale": lambda a: a * np.float32(1.5)}, "of its codes"),
    ({"conv_out.bias": lambda a: np.full_like(a, np.inf)}, "nan/inf values"),
])
def test_a_failing_export_writes_nothing(artifacts, tmp_path, monkeypatch, change, fragment):
    art = artifacts[(NAME, 8)]
    monkeypatch.setattr(export_module, "_tidy_graph", _broken_tidy(change))
    out = tmp_path / "m.onnx"
    with pytest.raises(ParityGateError) as info:
        export_onnx(art, out, target="qdq", parity=True)
    msg = str(info.value)
    assert msg.startswith("parity vs PyTorch failed: ") and fragment in msg and "--no-parity-gate" in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the ONNX nor its temporary file
    written = export_onnx(art, out, target="qdq", parity=True, parity_gate=False)
    assert not written.parity.passed and fragment in written.parity.reason and out.is_file()


@pytest.mark.parametrize("wbits", [8, 4])
def test_default_target_passes_the_gate(artifacts, tmp_path, wbits):
    result = export_onnx(artifacts[(NAME, wbits)], tmp_path / "m.onnx", target="onnxruntime", parity=True)
    assert result.requested_target == "onnxruntime" and result.target == "ort-qlinear"
    assert result.parity.passed, result.parity


def _tree_bytes(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_same_artifact_same_bytes(artifacts, tmp_path):
    """Same artifact + same options -> byte-identical ONNX; same ONNX -> byte-identical engine directory."""
    art = artifacts[(NAME, 8)]
    a = export_onnx(art, tmp_path / "a.onnx", target="onnxruntime").path
    b = export_onnx(art, tmp_path / "b.onnx", target="onnxruntime").path
    assert a.read_bytes() == b.read_bytes()
    assert not [p for p in onnx.load(str(a)).metadata_props if "created" in p.value or "time" in p.key]
    build_onnxruntime_engine(a, tmp_path / "ea")
    build_onnxruntime_engine(a, tmp_path / "eb")
    ea, eb = _tree_bytes(tmp_path / "ea"), _tree_bytes(tmp_path / "eb")
    assert {"engine.json", "model.onnx"} <= set(ea) and ea == eb
