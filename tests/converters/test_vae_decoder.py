"""The VAE decoder ONNX (converters/vae_decoder.py) on the SD-1.5-shaped pipeline of tests/_pipelines.py.

Parity is ONNX Runtime (CPU) against diffusers' ``vae.decode(latents / scaling_factor).sample`` on seeded
latents, within VAE_PARITY_TOLERANCES (fp32 1e-5, fp16 1e-2; measured 2.1e-6 and 1.3e-3 at most over
seeds 0-9, batch 3: the constant's docstring).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from pqcad_deploy.converters.pipeline_parts import PART_METADATA_KEY, read_part_metadata
from pqcad_deploy.converters.vae_decoder import (VAE_PARITY_TOLERANCES, export_vae_decoder, load_vae,
                                                 vae_decoder_parity)
from pqcad_deploy.engines.ort_session import ort_session
from pqcad_deploy.errors import ExportError, ModelLoadError, OutputPathError

from _pipelines import SD_LATENT_SIZE, SD_VAE_CONFIG, SD_VAE_SCALE

IMAGE_SIZE = SD_LATENT_SIZE * SD_VAE_SCALE


@pytest.fixture(scope="module")
def pipeline(sd_pipeline_dir) -> Path:
    return sd_pipeline_dir


@pytest.fixture(scope="module")
def exported(pipeline, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vae_onnx")
    return {p: export_vae_decoder(pipeline, root / f"vae_{p}.onnx", precision=p).path for p in ("fp32", "fp16")}


def _latents(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 4, SD_LATENT_SIZE, SD_LATENT_SIZE)).astype(np.float32)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_parity_with_diffusers_within_the_tolerance(pipeline, exported, precision) -> None:
    parity = vae_decoder_parity(pipeline, exported[precision], batch=2, seed=0)
    assert parity.passed and parity.non_finite == 0 and parity.batch == 2
    assert parity.tolerance == VAE_PARITY_TOLERANCES[precision] == {"fp32": 1e-5, "fp16": 1e-2}[precision]
    assert parity.rel_l2 <= parity.tolerance
    if precision == "fp16":  # FP16 is really computed: its error is FP16's, far above FP32's
        assert parity.rel_l2 > 1e-4
    assert str(parity).startswith(f"pass (vae_decoder {precision}, batch 2: relative L2 ")


def test_a_tighter_tolerance_fails_the_fp16_graph(pipeline, exported) -> None:
    parity = vae_decoder_parity(pipeline, exported["fp16"], batch=1, seed=3, tolerance=1e-5)
    assert not parity.passed
    assert str(parity).startswith("fail (vae_decoder fp16, batch 1: relative L2 ") and "> 1e-05" in str(parity)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_one_file_decodes_batch_1_and_3(pipeline, exported, precision) -> None:
    """The batch axis is dynamic; each row is the decode of its own latents (no batch mixing), and the
    graph divides by the VAE's scaling_factor itself (decoding the raw latents is far off)."""
    vae, config = load_vae(pipeline)
    session = ort_session(exported[precision])
    tolerance = VAE_PARITY_TOLERANCES[precision]
    three = _latents(3, seed=11)
    for latents in (three[1:2], three):
        images = session.run(["images"], {"latents": latents})[0]
        assert images.shape == (len(latents), 3, IMAGE_SIZE, IMAGE_SIZE) and images.dtype == np.float32
        assert images.min() >= -1.0 and images.max() <= 1.0
        with torch.no_grad():
            reference = vae.decode(torch.from_numpy(latents) / config["scaling_factor"]).sample.clamp(-1, 1).numpy()
            unscaled = vae.decode(torch.from_numpy(latents)).sample.clamp(-1, 1).numpy()
        assert _rel(images, reference) <= tolerance
        assert _rel(images, unscaled) > 0.05
    single = session.run(["images"], {"latents": three[1:2]})[0]
    batched = session.run(["images"], {"latents": three})[0]
    assert _rel(batched[1:2], single) <= tolerance


def test_graph_interface_and_fp16_storage(exported) -> None:
    for precision, path in exported.items():
        model = onnx.load(str(path))
        (inp,), (out,) = model.graph.input, model.graph.output
        dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
        assert (inp.name, inp.type.tensor_type.elem_type, dims(inp)) == (
            "latents", TensorProto.FLOAT, ["batch", 4, SD_LATENT_SIZE, SD_LATENT_SIZE])
        assert (out.name, out.type.tensor_type.elem_type, dims(out)) == (
            "images", TensorProto.FLOAT, ["batch", 3, IMAGE_SIZE, IMAGE_SIZE])
        float_types = {i.data_type for i in model.graph.initializer} - {TensorProto.INT64}
        conv_weights = [i for i in model.graph.initializer if len(i.dims) == 4]
        assert len(conv_weights) >= 30  # every convolution's weight is an initializer
        if precision == "fp32":
            assert float_types == {TensorProto.FLOAT}
        else:  # every float weight is FP16; only the boundary Casts touch float32
            assert float_types == {TensorProto.FLOAT16}
            first, last = model.graph.node[0], model.graph.node[-1]
            assert (first.op_type, list(first.input)) == ("Cast", ["latents"])
            assert first.attribute[0].i == TensorProto.FLOAT16
            assert (last.op_type, list(last.output), last.attribute[0].i) == ("Cast", ["images"], TensorProto.FLOAT)
        assert read_part_metadata(path) == {"kind": "vae_decoder", "precision": precision, "scaling_factor": 0.18215,
                                            "latent_channels": 4, "downsampling": SD_VAE_SCALE}
        assert model.opset_import[0].version == 17 and model.producer_name == "pqcad-deploy"
    assert exported["fp16"].stat().st_size < 0.7 * exported["fp32"].stat().st_size


def test_latent_size_sets_the_graphs_spatial_axes(pipeline, tmp_path) -> None:
    """The spatial axes are fixed at export (like the UNet's image shape); latent_size chooses them."""
    result = export_vae_decoder(pipeline, tmp_path / "vae4.onnx", latent_size=4)
    assert (result.latent_size, result.downsampling) == (4, SD_VAE_SCALE)
    parity = vae_decoder_parity(pipeline, result.path, batch=1, seed=5)  # at the graph's own side
    assert parity.passed
    images = ort_session(result.path).run(["images"], {"latents": _latents(1, 5)[:, :, :4, :4]})[0]
    assert images.shape == (1, 3, 4 * SD_VAE_SCALE, 4 * SD_VAE_SCALE)


def test_overwrite_replaces_only_our_vae_decoder(pipeline, exported, tmp_path) -> None:
    target = tmp_path / "vae.onnx"
    shutil.copy(exported["fp32"], target)
    with pytest.raises(OutputPathError, match=rf"^{target} already exists; pass --overwrite to replace it, or choose "
                                              r"another path\.$"):
        export_vae_decoder(pipeline, target)
    result = export_vae_decoder(pipeline, target, precision="fp16", overwrite=True)
    assert read_part_metadata(target)["precision"] == "fp16" and result.size_bytes == target.stat().st_size
    foreign = tmp_path / "foreign.onnx"
    model = onnx.load(str(exported["fp32"]))
    onnx.helper.set_model_props(model, {PART_METADATA_KEY: json.dumps({"kind": "text_encoder"})})
    onnx.save(model, str(foreign))
    with pytest.raises(OutputPathError, match=rf"^{foreign} was not written by pqcad-deploy \(it is not a pqcad-deploy "
                                              r"vae_decoder ONNX\); --overwrite replaces only"):
        export_vae_decoder(pipeline, foreign, overwrite=True)
    assert not list(tmp_path.glob(".*.tmp"))  # nothing half-written left beside the outputs


def _vae_folder_with(tmp_path: Path, pipeline: Path, **config_changes) -> Path:
    root = tmp_path / "pipe"
    (root / "vae").mkdir(parents=True)
    config = json.loads((pipeline / "vae" / "config.json").read_text())
    (root / "vae" / "config.json").write_text(json.dumps({**config, **config_changes}))
    return root


def test_refusals_are_one_clear_line(pipeline, tmp_path) -> None:
    with pytest.raises(ModelLoadError, match=rf"^{tmp_path} has no vae/config\.json; pass a diffusers pipeline "
                                             r"folder \(model_index\.json, unet/, vae/, \.\.\.\)"):
        export_vae_decoder(tmp_path, tmp_path / "out.onnx")
    with pytest.raises(ExportError, match=r"^the VAE decoder precision must be one of fp32, fp16; got 'int8'\.$"):
        export_vae_decoder(pipeline, tmp_path / "out.onnx", precision="int8")
    with pytest.raises(ExportError, match=r"^latent_size must be a positive integer; got 0\.$"):
        export_vae_decoder(pipeline, tmp_path / "out.onnx", latent_size=0)
    sd3 = _vae_folder_with(tmp_path, pipeline, shift_factor=0.0609)
    with pytest.raises(ModelLoadError, match=r"/vae/config\.json sets shift_factor; pqcad-deploy decodes latents the "
                                             r"way StableDiffusionPipeline does \(divided by scaling_factor only\)"):
        export_vae_decoder(sd3, tmp_path / "out.onnx")
    shutil.rmtree(sd3)
    tiny = _vae_folder_with(tmp_path, pipeline, _class_name="AutoencoderTiny")
    with pytest.raises(ModelLoadError, match=r"/vae/config\.json describes 'AutoencoderTiny'; pqcad-deploy takes a "
                                             r"vae/ of class AutoencoderKL only\.$"):
        export_vae_decoder(tiny, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()
    assert SD_VAE_CONFIG["scaling_factor"] == 0.18215  # the fixture's, which the metadata test pins
