"""Latent artifacts (a pipeline's cross-attention UNet2DConditionModel) through export, build-engine and sample
(issue 17), on the SD-1.5-shaped pipeline (prompts) and the class-embedding latent pipeline of
tests/_pipelines.py.

Each artifact is compressed once (min-max W8A8, no CAD, guided calibration, the converters' 8-pair
calibration set) and exported once per target. The headline check: an --fp export sampled by the ONNX
Runtime engine (its UNet, its text encoder and tokenizer or class table, its VAE decoder; no torch)
gives PyTorch's images (pqcad_deploy.eval.pipeline_sampling.generate_images with the artifact's
conditioning and the pipeline's VAE) on the same noise, at guidance 1 and above.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto

from _cli_runner import run_cli
from _pipelines import CLASS_LATENT_TOKENS, NUM_CLASSES, SD_MAX_TOKENS, SD_TEXT_WIDTH
from pqcad_deploy.converters.export_onnx import export_onnx
from pqcad_deploy.engines.manifest import read_onnx_manifest, sha256_file
from pqcad_deploy.engines.onnx_check import check_onnx

PROMPTS = ("a red car", "the cat", "zebra 12")
SD_SCALE, CLASS_SCALE = 3.0, 2.0
ENTRIES = {
    "sd": {"kind": "embedding", "source": "prompts", "tokens": SD_MAX_TOKENS, "width": SD_TEXT_WIDTH,
           "guidance_scale": SD_SCALE, "has_null": True, "num_classes": None},
    "class": {"kind": "embedding", "source": "class_embeddings", "tokens": CLASS_LATENT_TOKENS,
              "width": SD_TEXT_WIDTH, "guidance_scale": CLASS_SCALE, "has_null": True, "num_classes": NUM_CLASSES},
}
PART_NAMES = {"sd": ["vae_decoder.onnx", "text_encoder.onnx", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
                     "tokenizer/vocab.json"],
              "class": ["vae_decoder.onnx", "class_table.npy"]}
LATENT = {"sd": [4, 8, 8], "class": [4, 8, 8]}
DECODED = {"sd": (3, 64, 64), "class": (3, 16, 16)}
EXPORTS = [("class", t) for t in ("qdq", "ort-x86", "ort-qlinear", "tensorrt", "fp", "fp-tensorrt")] + [
    ("sd", t) for t in ("qdq", "fp")]
"""Every target on the class-embedding pipeline (a second each); the SD pipeline (three times the graph and a text
encoder) on the student's qdq form and the teacher's."""
IMAGE_LEVEL_TOL = 1
"""Engine vs PyTorch, per uint8 value. Measured: the class-embedding pipeline 0 levels at scales 1 and 2; the
SD pipeline at most 1 level, on 2 of 73,728 values at scale 1 and 10 at scale 3 (ONNX Runtime's float sums in the
UNet, the text encoder and the VAE against torch's, on values at a rounding boundary)."""
IMAGE_DIFFERING_TOL = 0.001
"""... on at most this share of the values."""


def _compress(model_dir, out, **options) -> None:
    from pqcad_deploy.compress import compress
    from pqcad_deploy.config import CompressConfig
    from pqcad_deploy.presets import PRESETS, CalibrationConfig

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PRESETS, "fast", dataclasses.replace(
            PRESETS["fast"], calibration=CalibrationConfig(num_trajectories=2, timesteps_kept=4, batch_size=2)))
        compress(CompressConfig(model=str(model_dir), method="minmax", distill=False, teacher_steps=4, preset="fast",
                                **options), out, progress=False)


@pytest.fixture(scope="module")
def artifacts(sd_pipeline_dir, class_latent_dir, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("latent_art")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    _compress(sd_pipeline_dir, root / "sd", guidance_scale=SD_SCALE, prompt_file=str(root / "prompts.txt"))
    _compress(class_latent_dir, root / "class", guidance_scale=CLASS_SCALE)
    return {"sd": root / "sd", "class": root / "class"}


@pytest.fixture(scope="module")
def exports(artifacts, tmp_path_factory) -> dict:
    """(kind, target) -> ExportResult; 'fp' is the teacher (--fp, target qdq). The ONNX Runtime targets and
    the parts pass their parity gates (export raises otherwise); tensorrt's FP16 output parity is not gated
    on random weights (tests/converters/test_tensorrt_target.py says why; the FP16 teacher is checked below)."""
    root = tmp_path_factory.mktemp("latent_onnx")
    made = {}
    for kind, target in EXPORTS:
        options = {"fp": True} if target.startswith("fp") else {"parity": target != "tensorrt"}
        concrete = "tensorrt" if target.endswith("tensorrt") else "qdq" if target == "fp" else target
        made[kind, target] = export_onnx(artifacts[kind], root / f"{kind}_{target}.onnx", target=concrete, **options)
    return made


def _inputs(path) -> list[tuple[str, int, list]]:
    graph = onnx.load(str(path)).graph
    return [(i.name, i.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim])
            for i in graph.input]


@pytest.mark.parametrize("kind, target", EXPORTS)
def test_every_target_takes_the_embeddings_and_writes_the_parts_beside_it(exports, kind: str, target: str) -> None:
    result = exports[kind, target]
    entry = ENTRIES[kind]
    assert _inputs(result.path) == [("sample", TensorProto.FLOAT, ["batch", *LATENT[kind]]),
                                    ("timestep", TensorProto.FLOAT, ["batch"]),
                                    ("encoder_hidden_states", TensorProto.FLOAT, ["batch", entry["tokens"],
                                                                                  entry["width"]])]
    manifest = read_onnx_manifest(result.path)
    assert manifest.conditioning.to_dict() == entry and result.conditioning == manifest.conditioning
    assert manifest.decoded_image_shape == DECODED[kind]
    folder = result.path.with_suffix(".parts")
    assert sorted(p.file for p in manifest.parts) == sorted(f"{folder.name}/{n}" for n in PART_NAMES[kind])
    for part in manifest.parts:  # every file listed with the checksum of what is there
        assert part.sha256 == sha256_file(result.path.parent / part.file)
    marker = json.loads((folder / ".pqcad-deploy.json").read_text())
    assert (marker["kind"], sorted(marker["files"])) == ("parts", sorted(PART_NAMES[kind]))
    vae_precision = "fp16" if target.endswith("tensorrt") else "fp32"
    assert result.parts.vae_precision == vae_precision
    if result.parity is not None:
        assert result.parity.passed, result.parity
    if target not in ("fp", "fp-tensorrt", "tensorrt"):  # the parts' parity runs with the UNet's
        assert [p.kind for p in result.parts.parity] == ["vae_decoder", "text_encoder"][:1 + (kind == "sd")]
        assert all(p.passed for p in result.parts.parity), result.parts.parity


def test_one_graph_serves_any_batch_each_row_its_own_condition(exports) -> None:
    from pqcad_deploy.engines.ort_session import ort_session

    session = ort_session(exports["sd", "fp"].path)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
    t = np.array([751.0, 501.0, 1.0], np.float32)
    ehs = rng.standard_normal((3, SD_MAX_TOKENS, SD_TEXT_WIDTH)).astype(np.float32)
    (three,) = session.run(None, {"sample": x, "timestep": t, "encoder_hidden_states": ehs})
    (one,) = session.run(None, {"sample": x[1:2], "timestep": t[1:2], "encoder_hidden_states": ehs[1:2]})
    np.testing.assert_allclose(three[1:2], one, rtol=1e-4, atol=1e-5)
    (other,) = session.run(None, {"sample": x[1:2], "timestep": t[1:2], "encoder_hidden_states": ehs[:1]})
    assert np.abs(other - one).max() > 100 * np.abs(three[1:2] - one).max()  # the embeddings reach the output


def test_the_tensorrt_form_passes_the_checker_and_its_fp16_teacher_keeps_the_embeddings(artifacts, exports) -> None:
    """The tensorrt target's graphs have no checker error (encoder_hidden_states is covered by the profile and
    cast to FP16 once), and the FP16 teacher graph computes the teacher's prediction with the embeddings."""
    from pqcad_deploy.artifact import load_artifact
    from pqcad_deploy.engines.ort_session import ort_session

    for key in (("class", "tensorrt"), ("class", "fp-tensorrt")):
        assert [f for f in check_onnx(exports[key].path, "tensorrt") if f.severity == "error"] == []
        casts = [n for n in onnx.load(str(exports[key].path)).graph.node
                 if n.op_type == "Cast" and list(n.input) == ["encoder_hidden_states"]]
        assert [n.name for n in casts] == ["encoder_hidden_states/to_fp16"]
    teacher = load_artifact(artifacts["class"]).build_teacher()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 8, 8, generator=generator)
    t = torch.tensor([751.0, 501.0, 251.0, 1.0])
    ehs = torch.randn(4, CLASS_LATENT_TOKENS, SD_TEXT_WIDTH, generator=generator)
    with torch.no_grad():
        reference = teacher(x, t, encoder_hidden_states=ehs).sample.numpy()
        other = teacher(x, t, encoder_hidden_states=ehs.flip(0)).sample.numpy()
    session = ort_session(exports["class", "fp-tensorrt"].path)
    (out,) = session.run(None, {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": ehs.numpy()})
    relative = np.linalg.norm(out - reference) / np.linalg.norm(reference)
    assert relative < 5e-3, relative
    assert np.linalg.norm(other - reference) / np.linalg.norm(reference) > 10 * relative  # the embeddings matter


@pytest.mark.parametrize("kind", ["class", "sd"])
def test_the_engine_samples_pytorchs_images_with_and_without_guidance(artifacts, exports, kind: str,
                                                                       tmp_path) -> None:
    from _engine_vs_torch import EngineAgainstTorch

    from pqcad_deploy.artifact import load_artifact
    from pqcad_deploy.converters.conditions import artifact_conditioning
    from pqcad_deploy.engines.build import build_onnxruntime_engine
    from pqcad_deploy.models import load_model

    art = load_artifact(artifacts[kind])
    loaded = load_model(art.manifest.provenance["source_model"])  # the pipeline: its VAE decodes PyTorch's latents
    build_onnxruntime_engine(exports[kind, "fp"].path, tmp_path / "engine")
    check = EngineAgainstTorch(tmp_path / "engine", art.build_teacher(), art.manifest.scheduler_config,
                               art.manifest.teacher_steps,
                               artifact_conditioning(art.manifest, art.path, report=art.report), loaded.decode)
    prompts = {"prompts": PROMPTS} if kind == "sd" else {}
    n, seed = 6, 3
    images = {}
    for scale in (1.0, ENTRIES[kind]["guidance_scale"]):
        ours, theirs = check.images(n, seed, tuple(LATENT[kind]), scale, batch_size=4, **prompts)
        assert ours.shape == theirs.shape == (n, *DECODED[kind][1:], 3)
        difference = np.abs(ours.astype(int) - theirs.astype(int))
        print(f"{kind} scale {scale}: max {difference.max()} levels, {(difference > 0).sum()} of {difference.size}")
        assert difference.max() <= IMAGE_LEVEL_TOL
        assert (difference > 0).mean() <= IMAGE_DIFFERING_TOL
        images[scale] = ours
    low, high = images.values()
    assert np.abs(low.astype(int) - high.astype(int)).max() > 20  # guidance changed the images


def test_export_build_engine_and_sample_from_the_cli(artifacts, exports, tmp_path) -> None:
    onnx_path = tmp_path / "m.onnx"
    exported = run_cli("export", artifacts["class"], "--onnx", onnx_path, "--target", "qdq")
    assert exported.code == 0, exported.err
    assert exported.err == ""  # no diffusers notice from loading the VAE
    assert (f"class-embedding: 10 classes of 2 x 32 embeddings, a null row, guidance scale {CLASS_SCALE:g}, "
            in exported.out)
    assert "\nparts: m.parts/: vae_decoder (fp32), class_table; images 3x16x16\n" in exported.out
    assert "\nparity of the vae_decoder vs PyTorch: pass (vae_decoder fp32, batch 2: relative L2 " in exported.out
    # the SD export of the fixture, moved elsewhere with its parts folder (the manifest lists sd_qdq.parts/...)
    sd_onnx, moved = exports["sd", "qdq"].path, tmp_path / "moved"
    moved.mkdir()
    shutil.copy(sd_onnx, moved / sd_onnx.name)
    shutil.copytree(sd_onnx.with_suffix(".parts"), moved / "sd_qdq.parts")
    built = run_cli("build-engine", moved / sd_onnx.name, "-o", tmp_path / "engine")
    assert built.code == 0, built.err
    assert (f"(onnxruntime, w8a8, 4 sampling steps, text-conditional: prompt embeddings 77 x 32, guidance scale "
            f"{SD_SCALE:g}, parts: vae_decoder, text_encoder, tokenizer, ") in built.out
    for out, batch in (("a", "16"), ("b", "1")):  # guided calls of 8 and 1 images: the same bytes
        sampled = run_cli("sample", tmp_path / "engine", "-n", "3", "--prompt", "the cat", "--prompt", "a red car",
                          "-o", tmp_path / out, "--quiet", "--batch-size", batch)
        assert sampled.code == 0, sampled.err
        assert f"prompt i mod 2, guidance scale {SD_SCALE:g}" in sampled.out
    for i in range(3):
        assert (tmp_path / "a" / f"{i:05d}.png").read_bytes() == (tmp_path / "b" / f"{i:05d}.png").read_bytes()
    # eval fid's engine source: a text engine has no default prompts (one line); a class-embedding engine samples
    # its defaults and decodes through its VAE part, the images `sample` writes
    from pqcad_deploy.engines.errors import EngineError
    from pqcad_deploy.eval.fid_sources import images_from_source

    with pytest.raises(EngineError, match="prompt"):
        images_from_source(tmp_path / "engine", n=2, progress=False)
    assert run_cli("build-engine", exports["class", "fp"].path, "-o", tmp_path / "class_engine").code == 0
    assert run_cli("sample", tmp_path / "class_engine", "-n", "2", "-o", tmp_path / "c", "--quiet",
                   "--npz", tmp_path / "c.npz").code == 0
    scored, _ = images_from_source(tmp_path / "class_engine", n=2, progress=False)
    assert scored.shape == (2, 16, 16, 3) and np.array_equal(scored, np.load(tmp_path / "c.npz")["images"])
    record = json.loads((tmp_path / "a" / "samples.json").read_text())
    assert record["conditioning"]["prompts"] == ["the cat", "a red car"] and record["image_shape"] == [64, 64, 3]
    # --overwrite replaces the ONNX and its parts folder, which export wrote; not a folder holding anything else
    again = run_cli("export", artifacts["class"], "--onnx", onnx_path, "--fp", "--overwrite")
    assert again.code == 0, again.err
    assert read_onnx_manifest(onnx_path).precision == "fp32"
    (tmp_path / "m.parts" / "notes.txt").write_text("mine")
    refused = run_cli("export", artifacts["class"], "--onnx", onnx_path, "--fp", "--overwrite")
    assert (refused.code, refused.err) == (1, f"error: {tmp_path / 'm.parts'} holds files pqcad-deploy did not write "
                                              "(notes.txt); --overwrite will not delete them: move them away or choose "
                                              "another directory.\n")


def test_export_finds_the_pipeline_or_refuses_in_one_line(artifacts, class_latent_dir, sd_pipeline_dir,
                                                         tmp_path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(artifacts["class"], moved)
    manifest = json.loads((moved / "artifact.json").read_text())
    manifest["provenance"]["source_model"] = str(tmp_path / "gone")
    (moved / "artifact.json").write_text(json.dumps(manifest, sort_keys=True, indent=1))
    result = run_cli("export", moved, "--onnx", tmp_path / "a.onnx", "--fp")
    assert (result.code, result.err) == (1, (
        f"error: {moved} is a latent model, and export writes its VAE decoder and the text encoder or class table "
        f"its conditioning reads beside the UNet, from the pipeline folder it was compressed from: {tmp_path / 'gone'} "
        "is not a folder here; pass --pipeline DIR (the pipeline folder the artifact was compressed from).\n"))
    result = run_cli("export", moved, "--onnx", tmp_path / "a.onnx", "--fp", "--pipeline", sd_pipeline_dir)
    assert (result.code, result.err) == (1, (
        f"error: {sd_pipeline_dir} is not the pipeline {moved} was compressed from: its "
        "unet/diffusion_pytorch_model.safetensors differs (the artifact records sha256 "
        f"{manifest['provenance']['source_weights_sha256']['diffusion_pytorch_model.safetensors'][:12]}...); pass "
        "--pipeline with the pipeline folder it was compressed from.\n"))
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "a.parts").exists()
    # the same UNet beside another class table: refused by the table's hash, which compress recorded
    retabled = shutil.copytree(class_latent_dir, tmp_path / "retabled")
    table = retabled / "class_embeddings" / "embeddings.safetensors"
    recorded = manifest["provenance"]["source_parts_sha256"]["class_embeddings/embeddings.safetensors"]
    table.write_bytes(table.read_bytes()[:-4] + b"\x00\x00\x80\x3f")
    result = run_cli("export", moved, "--onnx", tmp_path / "a.onnx", "--fp", "--pipeline", retabled)
    assert (result.code, result.err) == (1, (
        f"error: {retabled} is not the pipeline {moved} was compressed from: its "
        f"class_embeddings/embeddings.safetensors differs (the artifact records sha256 {recorded[:12]}...); pass "
        "--pipeline with the pipeline folder it was compressed from.\n"))
    assert sorted(manifest["provenance"]["source_parts_sha256"]) == [
        "class_embeddings/config.json", "class_embeddings/embeddings.safetensors", "vae/config.json",
        "vae/diffusion_pytorch_model.safetensors"]
    result = run_cli("export", moved, "--onnx", tmp_path / "a.onnx", "--fp", "--pipeline", class_latent_dir,
                     "--vae-precision", "fp16")
    assert result.code == 0, result.err
    assert "parts: a.parts/: vae_decoder (fp16), class_table; images 3x16x16" in result.out


def test_latent_options_are_refused_for_a_pixel_artifact(small_unet_dir, class_latent_dir, tmp_path) -> None:
    _compress(small_unet_dir, tmp_path / "pixel")
    for flags, named in ((("--pipeline", class_latent_dir), "--pipeline applies"),
                         (("--vae-precision", "fp16"), "--vae-precision applies"),
                         (("--pipeline", class_latent_dir, "--vae-precision", "fp32"),
                          "--pipeline and --vae-precision apply")):
        result = run_cli("export", tmp_path / "pixel", "--onnx", tmp_path / "p.onnx", *flags)
        pronoun = "them" if " and " in named else "it"
        assert (result.code, result.err) == (1, (
            f"error: {named} to latent artifacts (a pipeline's UNet with a VAE); {tmp_path / 'pixel'} is a "
            f"pixel-space model: drop {pronoun}.\n"))
        assert not (tmp_path / "p.onnx").exists()


def test_the_cli_vae_precisions_are_the_converters() -> None:
    from pqcad_deploy import cli
    from pqcad_deploy.converters.export_parts import VAE_PRECISION_CHOICES

    assert cli._VAE_PRECISIONS == VAE_PRECISION_CHOICES
