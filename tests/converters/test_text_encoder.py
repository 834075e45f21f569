"""The text encoder ONNX (converters/text_encoder.py) on the SD-1.5-shaped pipeline of tests/_pipelines.py.

Parity is ONNX Runtime (CPU) against transformers' ``CLIPTextModel(input_ids).last_hidden_state``, within
TEXT_ENCODER_PARITY_TOLERANCE (1e-5; measured 2.8e-7 at most over seeds 0-9, batch 3). The batch test
feeds ids from the torch-free tokenizer (engines/tokenizer.py), the path `sample --prompt` will take.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from pqcad_deploy.converters.pipeline_parts import read_part_metadata
from pqcad_deploy.converters.text_encoder import (TEXT_ENCODER_PARITY_TOLERANCE, export_text_encoder,
                                                  load_text_encoder, text_encoder_parity)
from pqcad_deploy.engines.ort_session import ort_session
from pqcad_deploy.engines.tokenizer import load_clip_tokenizer
from pqcad_deploy.errors import ModelLoadError, OutputPathError

from _pipelines import SD_MAX_TOKENS, SD_TEXT_WIDTH


@pytest.fixture(scope="module")
def pipeline(sd_pipeline_dir) -> Path:
    return sd_pipeline_dir


@pytest.fixture(scope="module")
def exported(pipeline, tmp_path_factory):
    return export_text_encoder(pipeline, tmp_path_factory.mktemp("te_onnx") / "text_encoder.onnx")


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


def test_parity_with_transformers_within_the_tolerance(pipeline, exported) -> None:
    parity = text_encoder_parity(pipeline, exported.path, batch=2, seed=0)
    assert parity.passed and parity.non_finite == 0 and parity.batch == 2
    assert parity.tolerance == TEXT_ENCODER_PARITY_TOLERANCE == 1e-5 and parity.rel_l2 <= 1e-5
    assert str(parity).startswith("pass (text_encoder fp32, batch 2: relative L2 ")


def test_tokenised_prompts_at_batch_1_and_3(pipeline, exported) -> None:
    """One file serves any batch; each row is its own prompt's encoding, as StableDiffusionPipeline's."""
    tokenizer = load_clip_tokenizer(pipeline / "tokenizer")
    model = load_text_encoder(pipeline)
    session = ort_session(exported.path)
    ids = tokenizer(["the cat", "", "a dog 7 " * 30])  # short, empty (guidance's unconditional half), truncated
    assert ids.shape == (3, SD_MAX_TOKENS)
    for batch in (ids[:1], ids):
        states = session.run(["encoder_hidden_states"], {"input_ids": batch})[0]
        assert states.shape == (len(batch), SD_MAX_TOKENS, SD_TEXT_WIDTH) and states.dtype == np.float32
        with torch.no_grad():
            reference = model(torch.from_numpy(batch)).last_hidden_state.numpy()
        assert _rel(states, reference) <= TEXT_ENCODER_PARITY_TOLERANCE
    states = session.run(["encoder_hidden_states"], {"input_ids": ids})[0]
    assert _rel(states[0], states[1]) > 0.01  # the prompt reaches the output


def test_graph_interface_and_metadata(exported) -> None:
    model = onnx.load(str(exported.path))
    (inp,), (out,) = model.graph.input, model.graph.output
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert (inp.name, inp.type.tensor_type.elem_type, dims(inp)) == ("input_ids", TensorProto.INT64,
                                                                     ["batch", SD_MAX_TOKENS])
    assert (out.name, out.type.tensor_type.elem_type, dims(out)) == ("encoder_hidden_states", TensorProto.FLOAT,
                                                                     ["batch", SD_MAX_TOKENS, SD_TEXT_WIDTH])
    assert read_part_metadata(exported.path) == {"kind": "text_encoder", "precision": "fp32",
                                                 "max_length": SD_MAX_TOKENS, "hidden_size": SD_TEXT_WIDTH,
                                                 "vocab_size": exported.vocab_size}
    assert (exported.opset, exported.max_length, exported.hidden_size) == (17, SD_MAX_TOKENS, SD_TEXT_WIDTH)


def test_refusals_are_one_clear_line(pipeline, exported, tmp_path) -> None:
    with pytest.raises(ModelLoadError, match=rf"^{tmp_path} has no text_encoder/config\.json; pass a diffusers "
                                             r"pipeline folder"):
        export_text_encoder(tmp_path, tmp_path / "out.onnx")
    other = tmp_path / "pipe"
    (other / "text_encoder").mkdir(parents=True)
    config = json.loads((pipeline / "text_encoder" / "config.json").read_text())
    (other / "text_encoder" / "config.json").write_text(json.dumps({**config, "architectures": ["T5EncoderModel"]}))
    with pytest.raises(ModelLoadError, match=r"/text_encoder/config\.json describes \['T5EncoderModel'\]; pqcad-deploy "
                                             r"takes a text_encoder/ of class CLIPTextModel only\.$"):
        export_text_encoder(other, tmp_path / "out.onnx")
    with pytest.raises(OutputPathError, match=rf"^{exported.path} already exists; pass --overwrite"):
        export_text_encoder(pipeline, exported.path)
    assert not (tmp_path / "out.onnx").exists()
