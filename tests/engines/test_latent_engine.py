"""Latent engines, torch-free (issue 17): the parts a cross-attention UNet needs (engines.parts) listed in the
manifests and carried by build-engine, their checksums, the ``embedding`` conditioning kind (prompts through
the text encoder part, or class-table rows), the VAE decode after the DDIM loop, sample's --prompt /
--prompt-file / --class refusals, the TensorRT profile of ``encoder_hidden_states``, and the sample path
without torch. On tiny hand-made graphs written as export lays them out (``m.onnx`` + ``m.parts/``):

- the UNet: ``noise_pred = 0.5 sample + 0.001 t + mean(encoder_hidden_states)`` (the mean over tokens and
  width, broadcast over the latent), so each condition moves the sample by a known amount;
- the VAE decoder: a 1x1 convolution 4 -> 3 channels, a nearest 2x upsampling, clamped to [-1, 1];
- the text encoder: a lookup of each token id in a seeded [vocab, width] table;
- the class table: a seeded float32 [3 classes + the null row, 2 tokens, width].

The real pipelines (export, parity, and the engine's images against PyTorch's) are in
tests/converters/test_export_latent.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from _cli_runner import run_cli
from _pipelines import _write_tokenizer_files, tokenizer_vocab
from pqcad_deploy.engines.build import build_onnxruntime_engine
from pqcad_deploy.engines.conditioning import conditioning_from_dict, sample_conditions
from pqcad_deploy.engines.ddim import DDIMSampler
from pqcad_deploy.engines.errors import ConfigError, EngineDirectoryError, ManifestError
from pqcad_deploy.engines.generate import open_runner
from pqcad_deploy.engines.guidance import Guidance, guided_ddim
from pqcad_deploy.engines.images import nchw_to_nhwc, to_uint8
from pqcad_deploy.engines.latent_parts import EngineParts
from pqcad_deploy.engines.manifest import (OnnxManifest, read_engine_manifest, read_onnx_manifest, sha256_file,
                                           verify_engine, write_onnx_manifest)
from pqcad_deploy.engines.onnx_check import check_onnx
from pqcad_deploy.engines.ort_session import ort_session
from pqcad_deploy.engines.parts import PartFile
from pqcad_deploy.engines.sampler import initial_noise, sample_images, sampling_timesteps
from pqcad_deploy.engines.tensorrt_options import TensorRTBuildOptions, trtexec_command

LATENT, IMAGE, WIDTH = (4, 4, 4), (3, 8, 8), 4
CLASSES, CLASS_TOKENS, TEXT_TOKENS = 3, 2, 77
TABLE = np.random.default_rng(0).standard_normal((CLASSES + 1, CLASS_TOKENS, WIDTH)).astype(np.float32)
CLASS_ENTRY = {"kind": "embedding", "source": "class_embeddings", "tokens": CLASS_TOKENS, "width": WIDTH,
               "guidance_scale": 2.0, "has_null": True, "num_classes": CLASSES}
TEXT_ENTRY = {"kind": "embedding", "source": "prompts", "tokens": TEXT_TOKENS, "width": WIDTH,
              "guidance_scale": 3.0, "has_null": True, "num_classes": None}


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _unet(tokens: int, ehs_dims: tuple[int, int] | None = None) -> onnx.ModelProto:
    nodes = [
        helper.make_node("Mul", ["sample", "half"], ["scaled"]),
        helper.make_node("Reshape", ["timestep", "shape4"], ["t4"]),
        helper.make_node("Mul", ["t4", "milli"], ["tscaled"]),
        helper.make_node("Add", ["scaled", "tscaled"], ["xt"]),
        helper.make_node("ReduceMean", ["encoder_hidden_states"], ["mean"], axes=[1, 2], keepdims=1),
        helper.make_node("Reshape", ["mean", "shape4"], ["mean4"]),
        helper.make_node("Add", ["xt", "mean4"], ["noise_pred"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_latent_unet",
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, ["batch", *LATENT]),
         helper.make_tensor_value_info("timestep", TensorProto.FLOAT, ["batch"]),
         helper.make_tensor_value_info("encoder_hidden_states", TensorProto.FLOAT,
                                       ["batch", *(ehs_dims or (tokens, WIDTH))])],
        [helper.make_tensor_value_info("noise_pred", TensorProto.FLOAT, ["batch", *LATENT])],
        initializer=[helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
                     helper.make_tensor("milli", TensorProto.FLOAT, [], [0.001]),
                     helper.make_tensor("shape4", TensorProto.INT64, [4], [-1, 1, 1, 1])])
    return _model(graph)


def _vae_decoder() -> onnx.ModelProto:
    weight = np.random.default_rng(1).standard_normal((3, LATENT[0], 1, 1)).astype(np.float32) * 0.3
    nodes = [helper.make_node("Conv", ["latents", "w"], ["rgb"]),
             helper.make_node("Resize", ["rgb", "", "scales"], ["up"], mode="nearest"),
             helper.make_node("Clip", ["up", "lo", "hi"], ["images"])]
    graph = helper.make_graph(
        nodes, "tiny_vae_decoder",
        [helper.make_tensor_value_info("latents", TensorProto.FLOAT, ["batch", *LATENT])],
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", *IMAGE])],
        initializer=[onnx.numpy_helper.from_array(weight, "w"),
                     helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2]),
                     helper.make_tensor("lo", TensorProto.FLOAT, [], [-1.0]),
                     helper.make_tensor("hi", TensorProto.FLOAT, [], [1.0])])
    return _model(graph)


def _text_encoder() -> onnx.ModelProto:
    vocab = len(tokenizer_vocab()[0])
    table = np.random.default_rng(2).standard_normal((vocab, WIDTH)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "input_ids"], ["encoder_hidden_states"])], "tiny_text_encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", TEXT_TOKENS])],
        [helper.make_tensor_value_info("encoder_hidden_states", TensorProto.FLOAT, ["batch", TEXT_TOKENS, WIDTH])],
        initializer=[onnx.numpy_helper.from_array(table, "table")])
    return _model(graph)


def _write_export(folder: Path, entry: dict, make_manifest, table: np.ndarray = TABLE, name: str = "m") -> Path:
    """``name.onnx`` and ``name.parts/`` as converters.export_parts writes them."""
    parts = folder / f"{name}.parts"
    parts.mkdir(parents=True)
    onnx.save(_vae_decoder(), str(parts / "vae_decoder.onnx"))
    if entry["source"] == "prompts":
        onnx.save(_text_encoder(), str(parts / "text_encoder.onnx"))
        _write_tokenizer_files(parts / "tokenizer")
        roles = {"vae_decoder.onnx": "vae_decoder", "text_encoder.onnx": "text_encoder",
                 "tokenizer/vocab.json": "tokenizer", "tokenizer/merges.txt": "tokenizer"}
    else:
        np.save(parts / "class_table.npy", table)
        roles = {"vae_decoder.onnx": "vae_decoder", "class_table.npy": "class_table"}
    files = tuple(PartFile(role, f"{parts.name}/{n}", sha256_file(parts / n)) for n, role in roles.items())
    manifest = make_manifest(image_shape=LATENT, conditioning=entry, parts=files, decoded_image_shape=IMAGE)
    path = folder / f"{name}.onnx"
    onnx.save(write_onnx_manifest(_unet(entry["tokens"]), manifest), str(path))
    return path


@pytest.fixture
def latent_export(tmp_path: Path, make_manifest):
    def make(entry: dict = CLASS_ENTRY, name: str = "m", **kw) -> Path:
        return _write_export(tmp_path / f"{name}_export", entry, make_manifest, name=name, **kw)
    return make


@pytest.fixture
def latent_engine(latent_export, tmp_path: Path):
    def make(entry: dict = CLASS_ENTRY, name: str = "engine", **kw) -> Path:
        build_onnxruntime_engine(latent_export(entry, name=name, **kw), tmp_path / name)
        return tmp_path / name
    return make


# ----------------------------------------------------------------------------------------- manifests
def test_the_manifests_list_the_parts_and_build_engine_carries_them(latent_export, tmp_path: Path,
                                                                      make_manifest) -> None:
    onnx_path = latent_export(TEXT_ENTRY)
    m = read_onnx_manifest(onnx_path)
    assert [(i.name, i.dtype, i.dims) for i in m.graph_inputs] == [
        ("sample", "float32", LATENT), ("timestep", "float32", ()), ("encoder_hidden_states", "float32", (77, 4))]
    assert [(p.role, p.file) for p in m.parts] == [
        ("vae_decoder", "m.parts/vae_decoder.onnx"), ("text_encoder", "m.parts/text_encoder.onnx"),
        ("tokenizer", "m.parts/tokenizer/merges.txt"), ("tokenizer", "m.parts/tokenizer/vocab.json")]
    assert (m.decoded_image_shape, m.output_image_shape) == (IMAGE, IMAGE)
    data = json.loads(m.to_json())
    assert data["conditioning"] == TEXT_ENTRY and data["decoded_image_shape"] == list(IMAGE)
    assert data["parts"][0] == {"role": "vae_decoder", "file": "m.parts/vae_decoder.onnx",
                                "sha256": sha256_file(onnx_path.parent / "m.parts" / "vae_decoder.onnx")}
    assert OnnxManifest.from_json(m.to_json()) == m
    plain = make_manifest().to_dict()  # a pixel model's manifest has neither key, as before parts existed
    assert "parts" not in plain and "decoded_image_shape" not in plain

    built = build_onnxruntime_engine(onnx_path, tmp_path / "engine")
    engine_json = json.loads((tmp_path / "engine" / "engine.json").read_text())
    assert [p["file"] for p in engine_json["parts"]] == ["vae_decoder.onnx", "text_encoder.onnx",
                                                         "tokenizer/merges.txt", "tokenizer/vocab.json"]
    for entry, source in zip(engine_json["parts"], m.parts):  # the same bytes, now inside the engine
        assert entry["sha256"] == source.sha256 == sha256_file(tmp_path / "engine" / entry["file"])
    assert read_engine_manifest(tmp_path / "engine") == built == verify_engine(tmp_path / "engine")


def _entry_error(make_manifest, **fields) -> str:
    with pytest.raises(ManifestError) as info:
        make_manifest(**{"image_shape": LATENT, "conditioning": CLASS_ENTRY, "decoded_image_shape": IMAGE, **fields})
    return str(info.value)


VAE = PartFile("vae_decoder", "m.parts/vae_decoder.onnx", "a" * 64)
CLASS_TABLE = PartFile("class_table", "m.parts/class_table.npy", "b" * 64)


def test_a_manifest_lists_exactly_the_parts_its_model_needs(make_manifest) -> None:
    assert _entry_error(make_manifest, parts=(VAE,)) == (
        "Manifest field parts lacks the class table (float32 [classes + null row, tokens, width]) (class_table), "
        "which its embedding conditioning needs; re-export the ONNX.")
    assert _entry_error(make_manifest, parts=(CLASS_TABLE,)) == (
        "Manifest field parts lacks the VAE decoder ONNX (latents -> images in [-1, 1]) (vae_decoder), which "
        "decoded_image_shape needs; re-export the ONNX.")
    assert _entry_error(make_manifest, parts=(VAE, CLASS_TABLE), decoded_image_shape=None) == (
        "Manifest field parts lists a vae_decoder part this model does not use; re-export the ONNX.")
    tokenizer = PartFile("tokenizer", "m.parts/tokenizer/vocab.json", "c" * 64)
    text = PartFile("text_encoder", "m.parts/text_encoder.onnx", "d" * 64)
    assert _entry_error(make_manifest, conditioning=TEXT_ENTRY, parts=(VAE, text, tokenizer)) == (
        "Manifest field parts lacks tokenizer/merges.txt of the tokenizer; re-export the ONNX.")
    assert _entry_error(make_manifest, parts=(VAE, CLASS_TABLE), decoded_image_shape=(3, 8)) == (
        "Manifest field decoded_image_shape must be three positive integers [C, H, W] or absent, got (3, 8).")


@pytest.mark.parametrize("entry, message", [
    ({"role": "vae_decoder", "file": "../vae_decoder.onnx", "sha256": "a" * 64},
     "Manifest field parts: vae_decoder file '../vae_decoder.onnx' must be a relative path inside the manifest's "
     "folder ending with vae_decoder.onnx."),
    ({"role": "vae_decoder", "file": "m.parts/vae.onnx", "sha256": "a" * 64},
     "Manifest field parts: vae_decoder file 'm.parts/vae.onnx' must be a relative path inside the manifest's folder "
     "ending with vae_decoder.onnx."),
    ({"role": "unet", "file": "m.onnx", "sha256": "a" * 64},
     "Manifest field parts: role 'unet' is not one of vae_decoder, text_encoder, tokenizer, class_table."),
    ({"role": "class_table", "file": "class_table.npy", "sha256": "ABC"},
     "Manifest field parts: class_table.npy needs a 64-character lowercase sha256 hex digest, got 'ABC'."),
    ({"role": "class_table", "file": "class_table.npy"},
     "Manifest field parts: every entry must be an object with exactly the keys role, file and sha256, got "
     "{'role': 'class_table', 'file': 'class_table.npy'}."),
])
def test_a_bad_parts_entry_is_refused_with_the_file_named(make_manifest, entry: dict, message: str) -> None:
    data = {**make_manifest(image_shape=LATENT, conditioning=CLASS_ENTRY, parts=(VAE, CLASS_TABLE),
                            decoded_image_shape=IMAGE).to_dict(), "parts": [VAE.to_dict(), entry]}
    with pytest.raises(ManifestError) as info:
        OnnxManifest.from_dict(data, source="m.onnx")
    assert str(info.value) == f"m.onnx: {message}"


@pytest.mark.parametrize("change, message", [
    ({"source": "prompts"}, "Manifest field conditioning: a prompt-conditioned model has no num_classes and always "
                            "has a null (the empty prompt), got num_classes 3, has_null True."),
    ({"num_classes": 0}, "Manifest field conditioning.num_classes must be a positive integer for class embeddings, "
                         "got 0."),
    ({"has_null": False}, "Manifest field conditioning.guidance_scale 2 needs has_null true (the unconditional half "
                          "of guidance); got false."),
    ({"source": "text"}, "Manifest field conditioning.source 'text' is not one of prompts, class_embeddings."),
    ({"tokens": 0}, "Manifest field conditioning.tokens must be a positive integer, got 0."),
])
def test_a_bad_embedding_entry_is_refused(change: dict, message: str) -> None:
    with pytest.raises(ManifestError) as info:
        conditioning_from_dict({**CLASS_ENTRY, **change})
    assert str(info.value) == message


def test_every_part_is_checked_before_building_and_before_sampling(latent_export, latent_engine,
                                                                   tmp_path: Path) -> None:
    onnx_path = latent_export(name="edited")
    (onnx_path.parent / "edited.parts" / "class_table.npy").write_bytes(b"not the table")
    with pytest.raises(EngineDirectoryError, match=r"edited\.parts/class_table\.npy does not match its recorded "
                                                   r"checksum \(sha256 [0-9a-f]{12}\.\.\. != [0-9a-f]{12}\.\.\.\); it "
                                                   r"was modified or copied incompletely: export edited\.onnx again "
                                                   r"\(its parts folder must travel with it\)\.$"):
        build_onnxruntime_engine(onnx_path, tmp_path / "never")
    assert not (tmp_path / "never").exists()
    engine = latent_engine()
    (engine / "vae_decoder.onnx").unlink()
    result = run_cli("sample", engine, "-n", "1", "-o", tmp_path / "out")
    assert (result.code, result.err) == (1, f"error: {engine / 'vae_decoder.onnx'} (the VAE decoder ONNX (latents -> "
                                            "images in [-1, 1])) is missing; rebuild it with pqcad-deploy "
                                            "build-engine.\n")


# ------------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_class_embedding_sampling_is_guided_ddim_then_the_vae_decoder(latent_engine, scale: float) -> None:
    """sample's loop feeds image i the class table's row i % 3 (the null row as the unconditional half),
    equal value for value to engines.guidance.guided_ddim (pinned against diffusers), then the VAE decoder."""
    engine = latent_engine()
    runner, manifest = open_runner(engine, threads=1)
    parts = EngineParts(engine, manifest, threads=1)
    conditions = sample_conditions(manifest.onnx.conditioning, parts=parts, guidance_scale=scale)
    ours = sample_images(runner, manifest, 5, seed=4, batch_size=3, progress=False, conditions=conditions,
                         decode=parts.decoder()).images
    timesteps = sampling_timesteps(manifest.onnx)
    with runner:
        def model(x, t, cond):
            return runner.infer({"sample": x, "timestep": np.full((len(x),), t, np.float32),
                                 "encoder_hidden_states": cond})["noise_pred"]

        rows = TABLE[np.arange(5) % CLASSES]
        null = np.broadcast_to(TABLE[CLASSES], rows.shape)
        latents = guided_ddim(model, DDIMSampler({**manifest.onnx.scheduler_config, "prediction_type": "epsilon"}),
                              timesteps, initial_noise(5, LATENT, 4), rows, null, Guidance(scale))
    decoded = ort_session(engine / "vae_decoder.onnx").run(["images"], {"latents": latents})[0]
    assert ours.shape == (5, 8, 8, 3)
    np.testing.assert_array_equal(ours, nchw_to_nhwc(to_uint8(decoded)))
    again = sample_images(runner, manifest, 5, seed=4, batch_size=5, progress=False, conditions=conditions,
                          decode=parts.decoder()).images
    np.testing.assert_array_equal(ours, again)  # the batch size does not change the images
    with pytest.raises(ConfigError, match=r"^this engine's model is latent: its samples are latents, which its VAE "
                                          r"decoder part turns into images; pass decode="):
        sample_images(runner, manifest, 1, seed=0, progress=False, conditions=conditions)


def test_each_distinct_prompt_is_encoded_once_and_the_empty_prompt_is_the_null(latent_engine) -> None:
    engine = latent_engine(TEXT_ENTRY)
    manifest = read_engine_manifest(engine)

    class RecordingParts(EngineParts):  # the real parts, with their calls written down
        calls: list = []

        def embed_prompts(self, prompts):
            self.calls.append(list(prompts))
            return super().embed_prompts(prompts)

    parts = RecordingParts(engine, manifest)
    conditions = sample_conditions(manifest.onnx.conditioning, parts=parts, prompts=["the cat", "a dog", "the cat"])
    assert parts.calls == [["the cat", "a dog"], [""]]
    embedded = EngineParts(engine, manifest).embed_prompts(["the cat", "a dog", ""])
    rows = conditions.conditions(np.arange(4))
    for i, expected in enumerate([0, 1, 0, 0]):  # image i gets prompt i % 3
        np.testing.assert_array_equal(rows[i], embedded[expected])
    np.testing.assert_array_equal(conditions.null(2), np.stack([embedded[2]] * 2))
    assert conditions.describe() == "prompt i mod 3, guidance scale 3"
    assert conditions.to_record() == {"kind": "embedding", "source": "prompts",
                                      "prompts": ["the cat", "a dog", "the cat"], "guidance_scale": 3.0}
    assert np.abs(embedded[0] - embedded[1]).max() > 0.1  # the prompt reaches the embedding
    parts.calls.clear()
    sample_conditions(manifest.onnx.conditioning, parts=parts, prompts=["a dog"], guidance_scale=1)
    assert parts.calls == [["a dog"]]  # no guidance: no empty prompt


def test_sample_cli_on_text_and_class_embedding_engines(latent_engine, tmp_path: Path) -> None:
    text = latent_engine(TEXT_ENTRY, name="text")
    (tmp_path / "prompts.txt").write_text("the cat\n\n  a dog  \n", encoding="utf-8")
    first = run_cli("sample", text, "-n", "3", "-o", tmp_path / "a", "--prompt-file", tmp_path / "prompts.txt",
                    "--quiet")
    assert first.code == 0, first.err
    assert "(4 DDIM steps, prompt i mod 2, guidance scale 3, " in first.out
    record = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert record["conditioning"] == {"kind": "embedding", "source": "prompts", "prompts": ["the cat", "a dog"],
                                      "guidance_scale": 3.0}
    assert record["image_shape"] == [8, 8, 3]
    again = run_cli("sample", text, "-n", "3", "-o", tmp_path / "b", "--prompt", "the cat", "--prompt", "a dog",
                    "--quiet", "--batch-size", "1")
    assert again.code == 0, again.err
    for i in range(3):  # the same seeds and prompts give the same bytes, whatever the batch size
        assert (tmp_path / "a" / f"{i:05d}.png").read_bytes() == (tmp_path / "b" / f"{i:05d}.png").read_bytes()
    classes = run_cli("sample", latent_engine(name="classes"), "-n", "2", "-o", tmp_path / "c", "--class", "2",
                      "--guidance-scale", "1", "--quiet")
    assert classes.code == 0, classes.err
    assert "(4 DDIM steps, class 2, guidance scale 1, " in classes.out
    assert json.loads((tmp_path / "c" / "samples.json").read_text())["conditioning"] == {
        "kind": "embedding", "source": "class_embeddings", "class_labels": [2], "guidance_scale": 1.0}


@pytest.mark.parametrize("engine, args, code, message", [
    ("text", (), 1, "this text-conditional engine samples from prompts: pass --prompt TEXT (repeatable) or "
                    "--prompt-file FILE (one prompt per line); image i gets prompt i mod count."),
    ("text", ("--class", "1"), 1, "--class does not apply to a text-conditional engine (its images are conditioned "
                                  "on prompts: pass --prompt or --prompt-file); drop it."),
    ("classes", ("--prompt", "a cat"), 1, "--prompt does not apply to a class-embedding engine (its images are "
                                          "conditioned on its 3 classes: pass --class); drop it."),
    ("classes", ("--class", "0,3"), 1, "--class labels must be classes of this model, 0 .. 2; got 3; 3 is the null "
                                       "class, which guidance uses itself."),
    ("no_null", ("--guidance-scale", "2"), 1, "--guidance-scale 2 needs the model's unconditional embedding (the null "
                                              "row of its class table, the unconditional half of guidance), and this "
                                              "class-embedding engine has none: use --guidance-scale 1."),
    ("text", ("--prompt", "x", "--prompt-file", "p.txt"), 2, "Invalid value for --prompt-file: give the prompts with "
                                                             "--prompt or with --prompt-file, not both."),
])
def test_sample_cli_refuses_conditions_in_one_line(latent_engine, tmp_path: Path, engine: str, args, code: int,
                                                   message: str) -> None:
    entries = {"text": TEXT_ENTRY, "classes": CLASS_ENTRY,
               "no_null": {**CLASS_ENTRY, "has_null": False, "guidance_scale": 1.0}}
    tables = {"no_null": {"table": TABLE[:CLASSES]}}  # no null row
    path = latent_engine(entries[engine], name=engine, **tables.get(engine, {}))
    result = run_cli("sample", path, "-n", "2", "-o", tmp_path / "out", *args)
    assert (result.code, result.err) == (code, f"error: {message}\n")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_a_class_table_of_the_wrong_shape_is_refused(latent_engine, tmp_path: Path) -> None:
    engine = latent_engine(table=TABLE[:CLASSES])  # the manifest promises a null row the table lacks
    result = run_cli("sample", engine, "-n", "1", "-o", tmp_path / "out")
    assert (result.code, result.err) == (1, "error: the class table is float32 [3, 2, 4], but this class-embedding "
                                            "engine takes float32 [4, 2, 4]; rebuild the engine from a fresh "
                                            "export.\n")


# ------------------------------------------------------------------------------------ TensorRT side
def test_the_tensorrt_profile_covers_encoder_hidden_states_twice_the_batch_when_guiding(make_manifest) -> None:
    options = TensorRTBuildOptions(opt_batch=2, max_batch=4)
    text = conditioning_from_dict(TEXT_ENTRY)
    assert options.profile_shapes(LATENT, text) == {
        "sample": ((1, 4, 4, 4), (4, 4, 4, 4), (8, 4, 4, 4)),
        "timestep": ((1,), (4,), (8,)),
        "encoder_hidden_states": ((1, 77, 4), (4, 77, 4), (8, 77, 4))}
    no_null = conditioning_from_dict({**CLASS_ENTRY, "has_null": False, "guidance_scale": 1.0})
    assert options.profile_shapes(LATENT, no_null)["encoder_hidden_states"] == ((1, 2, 4), (2, 2, 4), (4, 2, 4))
    manifest = make_manifest(image_shape=LATENT, conditioning=TEXT_ENTRY, decoded_image_shape=IMAGE, parts=(
        VAE, PartFile("text_encoder", "m.parts/text_encoder.onnx", "d" * 64),
        PartFile("tokenizer", "m.parts/tokenizer/vocab.json", "c" * 64),
        PartFile("tokenizer", "m.parts/tokenizer/merges.txt", "e" * 64)))
    line = trtexec_command("m.onnx", "eng", manifest, TensorRTBuildOptions(opt_batch=8, max_batch=16))
    assert "--minShapes=sample:1x4x4x4,timestep:1,encoder_hidden_states:1x77x4" in line
    assert "--maxShapes=sample:32x4x4x4,timestep:32,encoder_hidden_states:32x77x4" in line


def test_the_checker_takes_encoder_hidden_states_of_the_manifests_shape(latent_export, make_manifest,
                                                                        tmp_path: Path) -> None:
    onnx_path = latent_export(TEXT_ENTRY)
    assert [f for f in check_onnx(onnx_path, "tensorrt") if f.rule == "trt-input-profile"] == []
    wrong = tmp_path / "wrong.onnx"
    onnx.save(write_onnx_manifest(_unet(TEXT_TOKENS, ehs_dims=(5, WIDTH)), read_onnx_manifest(onnx_path)), str(wrong))
    findings = [(f.node, f.message) for f in check_onnx(wrong, "tensorrt") if f.rule == "trt-input-profile"]
    assert findings == [("encoder_hidden_states", (
        "graph input 'encoder_hidden_states' has shape [?, 5, 4], but its manifest gives it [batch, 77, 4] and the "
        "TensorRT profile is built from it; re-export the ONNX."))]


# ---------------------------------------------------------------------------------------- torch-free
SAMPLE_WITHOUT_TORCH = r"""
import json, sys
sys.path.insert(0, "tests")
from _boundaries import block_imports, is_pytorch_stage

def blocked(name):
    return is_pytorch_stage(name) or name.split(".")[0] in ("transformers", "diffusers", "torch")

block_imports(blocked)
from pqcad_deploy import cli
try:
    cli.main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "loaded": sorted(k for k in sys.modules if blocked(k))}))
"""


def test_sampling_a_text_engine_imports_no_torch(latent_engine, tmp_path: Path) -> None:
    engine = latent_engine(TEXT_ENTRY)
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", SAMPLE_WITHOUT_TORCH, "sample", str(engine), "-n", "2", "-o",
                           str(tmp_path / "imgs"), "--prompt", "the cat", "--quiet"],
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "loaded": []}
    assert sorted(p.name for p in (tmp_path / "imgs").glob("*.png")) == ["00000.png", "00001.png", "grid.png"]
