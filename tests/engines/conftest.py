"""Shared fixtures of the engines tests: a tiny hand-made ONNX carrying our manifest.

Helpers are handed out as fixtures (not imported from this file) so the tests work whatever
pytest import mode or sibling conftest files the rest of the project uses.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from pqcad_deploy.engines.manifest import OnnxManifest, output_name_for, write_onnx_manifest

IMAGE_SHAPE = (3, 8, 8)
SCHEDULER_CONFIG = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "clip_sample": True,
    "set_alpha_to_one": True,
    "steps_offset": 0,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}


def _make_manifest(prediction_type: str = "epsilon", timesteps: tuple[int, ...] = (900, 600, 300, 0), **kw) -> OnnxManifest:
    fields = dict(
        precision="fp32",  # the tiny graph is float: build-engine and sample check the claim against it
        image_shape=IMAGE_SHAPE,
        scheduler_config={**SCHEDULER_CONFIG, "prediction_type": prediction_type},
        prediction_type=prediction_type,
        teacher_steps=100,
        student_timesteps=timesteps,
        artifact_sha256="ab" * 32,
        weight_bits={"8": 3, "4": 1},
        act_bits={"8": 4},
    )
    fields.update(kw)
    return OnnxManifest(**fields)


def _tiny_model(output_name: str = "noise_pred") -> onnx.ModelProto:
    """out = sample * 0.5 + reshape(timestep, [-1, 1, 1, 1]) * 0.001, batch dynamic."""
    c, h, w = IMAGE_SHAPE
    nodes = [
        helper.make_node("Mul", ["sample", "half"], ["scaled"]),
        helper.make_node("Reshape", ["timestep", "shape4"], ["t4"]),
        helper.make_node("Mul", ["t4", "milli"], ["tscaled"]),
        helper.make_node("Add", ["scaled", "tscaled"], [output_name]),
    ]
    inits = [
        helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
        helper.make_tensor("milli", TensorProto.FLOAT, [], [0.001]),
        helper.make_tensor("shape4", TensorProto.INT64, [4], [-1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch", c, h, w]),
         helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["batch"])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", c, h, w])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _tiny_reference(sample: np.ndarray, timestep: np.ndarray) -> np.ndarray:
    return sample * np.float32(0.5) + timestep.reshape(-1, 1, 1, 1) * np.float32(0.001)


@pytest.fixture
def make_tiny_onnx(tmp_path: Path) -> Callable[..., Path]:
    def make(prediction_type: str = "epsilon", name: str = "tiny.onnx", **kw) -> Path:
        manifest = _make_manifest(prediction_type, **kw)
        model = write_onnx_manifest(_tiny_model(output_name_for(prediction_type)), manifest)
        path = tmp_path / name
        onnx.save(model, str(path))
        return path

    return make


@pytest.fixture
def foreign_onnx(tmp_path: Path) -> Path:
    path = tmp_path / "foreign.onnx"
    onnx.save(_tiny_model(), str(path))
    return path


@pytest.fixture
def make_manifest() -> Callable[..., OnnxManifest]:
    return _make_manifest


@pytest.fixture
def tiny_reference() -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    return _tiny_reference


@pytest.fixture
def tiny_model() -> Callable[..., onnx.ModelProto]:
    return _tiny_model
