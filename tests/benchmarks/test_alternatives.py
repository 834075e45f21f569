"""benchmarks/alternatives.py: ONNX Runtime's static quantizer on our FP32 ONNX, through our functions.

One small end-to-end pass on the embedded model (tiny calibration: 2 FP DDIM trajectories x 4 kept
timesteps on a 20-step grid): the result must be a valid ONNX that ONNX Runtime runs, hold Q/DQ nodes,
be smaller on disk than the FP32 ONNX, and predict noise close to the FP32 ONNX on held-out
trajectory inputs (another seed). Tolerance: SQNR > 10 dB for the Conv/MatMul/Gemm recipe (measured
about 13 dB with this tiny calibration set). ORT's default op set also quantizes the timestep
embedding (t in [0, 1000] through int8), measured at about 5.5 dB here; that row only has to run.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("onnxruntime.quantization", reason="onnxruntime.quantization (ONNX Runtime's quantizer) is not installed")

from benchmarks.alternatives import (  # noqa: E402
    ORT_CONFIGS, TrajectoryDataReader, calibration_inputs, ort_quantize, preprocess, qdq_node_counts, run_model,
    session, size_mb, sqnr_db,
)

STEPS = 20


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory):
    import torch

    from pqcad_deploy.converters.export_onnx import export_onnx
    from pqcad_deploy.compress import compress
    from pqcad_deploy.config import CompressConfig
    from pqcad_deploy.presets import PRESETS, CalibrationConfig

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("alternatives")
    art = root / "art"
    # Only the FP teacher is exported (fp=True): the student's calibration set is unused, so one pair.
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PRESETS, "fast", dataclasses.replace(
            PRESETS["fast"], calibration=CalibrationConfig(num_trajectories=1, timesteps_kept=1, batch_size=1)))
        compress(CompressConfig(method="minmax", preset="fast", teacher_steps=STEPS, distill=False), art,
                 progress=False)
    out = root / "fp32.onnx"
    export_onnx(art, out, fp=True)
    return out


@pytest.fixture(scope="module")
def preprocessed(fp32_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "fp32_pre.onnx"
    info = preprocess(fp32_onnx, out)
    assert info["attempts"][-1]["ok"]
    return out


@pytest.fixture(scope="module")
def calibration():
    inputs, desc = calibration_inputs(num_trajectories=2, timesteps_kept=4, seed=0, steps=STEPS)
    held_out, _ = calibration_inputs(num_trajectories=2, timesteps_kept=4, seed=1, steps=STEPS)
    assert inputs["sample"].shape == (8, 1, 32, 32) and inputs["timestep"].shape == (8,)
    assert desc["source"] == "fp_ddim_trajectories"
    return inputs, held_out


def test_reader_batches_and_ranges():
    inputs = {"sample": np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1), "timestep": np.arange(10, dtype=np.float32)}
    reader = TrajectoryDataReader(inputs, batch_size=4)
    assert len(reader) == 3
    sizes = []
    while (batch := reader.get_next()) is not None:
        sizes.append(len(batch["timestep"]))
    assert sizes == [4, 4, 2]
    reader.set_range(1, 2)
    assert reader.get_next()["timestep"].tolist() == [4, 5, 6, 7]
    assert reader.get_next() is None


@pytest.mark.parametrize("name", ["ort_s8s8_minmax_convmatmul", "ort_s8s8_minmax"])
def test_quantize_static_gives_a_smaller_qdq_model_close_to_fp32(name, fp32_onnx, preprocessed, calibration, tmp_path):
    import onnx

    inputs, held_out = calibration
    out = tmp_path / f"{name}.onnx"
    info = ort_quantize(preprocessed, out, ORT_CONFIGS[name], inputs, batch_size=4, threads=1)
    assert info["settings"]["quant_format"] == "QDQ" and info["settings"]["per_channel"] is True

    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    counts = qdq_node_counts(out)
    assert counts["QuantizeLinear"] > 0 and counts["DequantizeLinear"] > 0, counts
    assert size_mb(out) < size_mb(fp32_onnx)

    reference = run_model(session(fp32_onnx, threads=1), held_out)
    quantized = run_model(session(out, threads=1), held_out)
    assert quantized.shape == reference.shape and np.isfinite(quantized).all()
    if name == "ort_s8s8_minmax_convmatmul":
        assert sqnr_db(reference, quantized) > 10.0
