"""Latent pipelines conditioned through cross-attention in the PyTorch stage (issue 17): the SD-1.5-shaped
text pipeline and the class-embedding pipeline (scripts/train_latent_reference.py's layout), against diffusers'
StableDiffusionPipeline on the same noise, and compress end to end with one error line per bad option."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _cli_runner import run_cli  # tests/, on sys.path through tests/conftest.py
from _pipelines import CLASS_LATENT_TOKENS, NULL_CLASS, NUM_CLASSES, SD_TEXT_WIDTH
from pqcad_deploy.conditioning import EmbeddingConditioning, conditioning_for, read_prompt_file
from pqcad_deploy.errors import ConfigError

PROMPTS = ("a red car", "the cat", "zebra 12")


@pytest.fixture(scope="module")
def sd(sd_pipeline_dir):
    from pqcad_deploy.models import load_model

    return load_model(str(sd_pipeline_dir))


@pytest.fixture(scope="module")
def class_latent(class_latent_dir):
    from pqcad_deploy.models import load_model

    return load_model(str(class_latent_dir))


@pytest.fixture
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n", encoding="utf-8")
    return path


def test_latent_pipelines_load_with_their_parts(sd, class_latent) -> None:
    assert sd.kind == "text-conditional-latent" and sd.text_encoder is not None and sd.class_table is None
    assert class_latent.kind == "class-embedding-latent" and class_latent.text_encoder is None
    table = class_latent.class_table
    assert table.embeddings.shape == (NUM_CLASSES + 1, CLASS_LATENT_TOKENS, SD_TEXT_WIDTH)
    assert (table.num_classes, table.null_class) == (NUM_CLASSES, NULL_CLASS)
    for loaded in (sd, class_latent):
        assert loaded.vae is not None and loaded.decode is not None
        assert all(p.dtype == torch.float32 for p in loaded.unet.parameters())


def test_class_table_conditioning_draws_class_rows_and_the_null_row(class_latent) -> None:
    cond = conditioning_for(class_latent, guidance_scale=2.0)
    table = class_latent.class_table.embeddings
    drawn = cond.draw(torch.arange(23))["encoder_hidden_states"]
    assert drawn.shape == (23, CLASS_LATENT_TOKENS, SD_TEXT_WIDTH)
    for i in (0, 9, 10, 22):  # sample i gets class i % 10, the class-conditional rule
        assert torch.equal(drawn[i], table[i % NUM_CLASSES])
    assert torch.equal(cond.null(3)["encoder_hidden_states"], table[NULL_CLASS].expand(3, -1, -1))
    assert cond.to_dict()["source"] == "class_embeddings" and cond.to_dict()["rows"] == NUM_CLASSES


def test_text_conditioning_is_stable_diffusions_encode_prompt(sd, sd_pipeline_dir) -> None:
    from diffusers import StableDiffusionPipeline

    cond = conditioning_for(sd, guidance_scale=3.0, prompts=PROMPTS)
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_pipeline_dir), safety_checker=None)
    embeds, negative = pipe.encode_prompt(list(PROMPTS), "cpu", 1, True, negative_prompt=None)
    assert torch.allclose(cond.table, embeds, atol=1e-6)
    assert torch.allclose(cond.null(3)["encoder_hidden_states"], negative, atol=1e-6)


def test_guided_latent_sampler_matches_stable_diffusion_pipeline_on_the_same_noise(sd, sd_pipeline_dir) -> None:
    """generate_images (our conditional DDIM loop, guidance, VAE decode) against StableDiffusionPipeline
    with a DDIMScheduler of the same config, on image i's noise from seed + i: at scale 1 and 4."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from pqcad_deploy.eval.pipeline_sampling import generate_images

    pipe = StableDiffusionPipeline.from_pretrained(str(sd_pipeline_dir), safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(sd.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    shape = (4, 8, 8)
    noise = torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(5 + i)) for i in range(3)])
    for scale in (1.0, 4.0):
        ours = generate_images(sd.unet, sd.scheduler_config, 3, 4, seed=5, progress=False,
                               conditioning=conditioning_for(sd, scale, prompts=PROMPTS), decode=sd.decode).images
        theirs = pipe(list(PROMPTS), num_inference_steps=4, guidance_scale=scale, latents=noise.clone(), eta=0.0,
                      output_type="np").images
        theirs = np.round(np.clip(theirs, 0, 1) * 255).astype(np.uint8)
        assert ours.shape == theirs.shape == (3, 64, 64, 3)
        assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1, scale  # float32 rounding at the byte edge


def test_conditioning_options_that_do_not_apply_are_refused(sd, class_latent) -> None:
    with pytest.raises(ConfigError, match="pass --prompt-file FILE"):
        conditioning_for(sd)
    with pytest.raises(ConfigError, match="--null-class applies to class-conditional models"):
        conditioning_for(sd, null_class=3, prompts=PROMPTS)
    with pytest.raises(ConfigError, match="--prompt-file applies to text-conditional pipelines; this model is "
                                          "conditioned on its 10 classes"):
        conditioning_for(class_latent, prompts=PROMPTS)
    with pytest.raises(ConfigError, match="this model's null class is 10"):
        conditioning_for(class_latent, null_class=4)
    with pytest.raises(ConfigError, match="needs the model's unconditional embedding"):
        EmbeddingConditioning(table=torch.zeros(2, 1, 4), guidance_scale=2.0)


def test_read_prompt_file_drops_blank_lines_and_refuses_empty_files(tmp_path, prompt_file) -> None:
    assert read_prompt_file(prompt_file) == PROMPTS
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ConfigError, match="holds no prompt; write one prompt per line"):
        read_prompt_file(empty)
    with pytest.raises(ConfigError, match="cannot read the prompt file"):
        read_prompt_file(tmp_path / "missing.txt")


def test_compress_takes_a_text_conditional_pipeline_with_a_prompt_file(sd_pipeline_dir, prompt_file, tmp_path) -> None:
    art = tmp_path / "art"
    result = run_cli("compress", "--model", sd_pipeline_dir, "--out", art, "--preset", "fast", "--teacher-steps", "4",
                     "--method", "minmax", "--no-distill", "--guidance-scale", "3", "--prompt-file", prompt_file,
                     "--quiet")
    assert result.code == 0, result.err
    assert result.err == ""  # no transformers load report or progress bar under --quiet
    manifest = json.loads((art / "artifact.json").read_text())
    assert manifest["unet_class"] == "UNet2DConditionModel" and manifest["image_shape"] == [4, 8, 8]
    assert manifest["options"]["prompt_file"] == str(prompt_file)
    report = json.loads((art / "report.json").read_text())
    assert report["conditioning"] == {"kind": "embedding", "source": "prompts", "rows": 3, "tokens": 77,
                                      "width": SD_TEXT_WIDTH, "guidance_scale": 3.0, "has_null": True,
                                      "labels": list(PROMPTS)}
    # the cross-attention K/V projections of the prompt embeddings are among the quantized layers
    assert any(name.endswith("attn2.to_k") for name in manifest["layers"])


def test_compress_distills_a_guided_class_embedding_latent_pipeline(class_latent_dir, tmp_path, monkeypatch) -> None:
    """CAD on the class-embedding pipeline: guided C_DC with the null row for a seeded half, the guard
    decoding both students' latents through the VAE. (10 iterations: the path is under test.)"""
    import dataclasses

    from pqcad_deploy.presets import PRESETS, DCConfig, DistillConfig

    monkeypatch.setitem(PRESETS, "fast", dataclasses.replace(
        PRESETS["fast"], dc=DCConfig(size=16), heldout=DCConfig(size=8),
        distill=DistillConfig(iters=10, batch_size=4, heldout_every=5), distill_checkpoint_every=5))
    art = tmp_path / "art"
    result = run_cli("compress", "--model", class_latent_dir, "--out", art, "--preset", "fast", "--teacher-steps", "4",
                     "--method", "minmax", "--guidance-scale", "2", "--quiet")
    assert result.code == 0, result.err
    report = json.loads((art / "report.json").read_text())
    assert report["conditioning"]["source"] == "class_embeddings" and report["conditioning"]["rows"] == NUM_CLASSES
    guard = report["distillation"]["guard"]
    assert guard["kept"] in ("distilled", "undistilled") and np.isfinite(guard["psnr_distilled_db"])


def test_compress_refuses_a_prompt_file_for_a_pixel_model_in_one_line(prompt_file, tmp_path) -> None:
    result = run_cli("compress", "--model", "builtin", "--out", tmp_path / "art", "--prompt-file", prompt_file)
    assert result.code != 0 and not (tmp_path / "art").exists()
    assert result.err.strip() == ("error: --prompt-file applies to text-conditional pipelines (Stable Diffusion); "
                                  "this model takes no prompts: drop it.")


def test_eval_sources_sample_conditional_models_as_they_were_calibrated(class_conditional_dir, class_latent_dir,
                                                                         sd_pipeline_dir, tmp_path) -> None:
    """eval fid's generated sources: a class-conditional model folder samples class i % classes (unguided), a
    class-embedding pipeline decodes through its VAE (the images generate_images gives), a text pipeline is
    refused in one line (FID needs prompts)."""
    from pqcad_deploy.eval.fid_sources import FidSourceError, images_from_source
    from pqcad_deploy.eval.pipeline_sampling import generate_images
    from pqcad_deploy.models import load_model

    images, info = images_from_source(class_latent_dir, n=3, steps=2, progress=False)
    loaded = load_model(str(class_latent_dir))
    expected = generate_images(loaded.unet, loaded.scheduler_config, 3, 2, progress=False,
                               conditioning=conditioning_for(loaded), decode=loaded.decode).images
    assert images.shape == (3, 16, 16, 3) and np.array_equal(images, expected) and info.steps == 2
    pixel, _ = images_from_source(class_conditional_dir, n=2, steps=2, progress=False)
    assert pixel.shape == (2, 32, 32, 3)
    with pytest.raises(FidSourceError, match="is a text-conditional pipeline: FID needs prompts; sample its engine "
                                             "with --prompt-file"):
        images_from_source(sd_pipeline_dir, n=2, steps=2, progress=False)


def test_a_v_prediction_pipeline_samples_as_diffusers_and_goes_through_every_verb(sd_pipeline_dir, prompt_file,
                                                                                    tmp_path) -> None:
    """SD 2.x predicts v: the conditional sampler follows StableDiffusionPipeline there too (within 1 level),
    and compress -> export (parity) -> build-engine -> sample runs on it."""
    import shutil

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from pqcad_deploy.eval.pipeline_sampling import generate_images
    from pqcad_deploy.models import load_model

    folder = shutil.copytree(sd_pipeline_dir, tmp_path / "sd_v")
    config_path = folder / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "prediction_type": "v_prediction"}))
    loaded = load_model(str(folder))
    assert loaded.scheduler_config["prediction_type"] == "v_prediction"
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(loaded.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.cat([torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(i)) for i in range(3)])
    ours = generate_images(loaded.unet, loaded.scheduler_config, 3, 4, progress=False,
                           conditioning=conditioning_for(loaded, 3.0, prompts=PROMPTS), decode=loaded.decode).images
    theirs = pipe(list(PROMPTS), num_inference_steps=4, guidance_scale=3.0, latents=noise, eta=0.0,
                  output_type="np").images
    assert np.abs(ours.astype(int) - np.round(np.clip(theirs, 0, 1) * 255).astype(int)).max() <= 1
    art, onnx_path = tmp_path / "art", tmp_path / "v.onnx"
    steps = (("compress", "--model", folder, "--out", art, "--preset", "fast", "--teacher-steps", "4", "--method",
              "minmax", "--no-distill", "--guidance-scale", "3", "--prompt-file", prompt_file, "--quiet"),
             ("export", art, "--onnx", onnx_path, "--target", "qdq"),
             ("build-engine", onnx_path, "-o", tmp_path / "engine"),
             ("sample", tmp_path / "engine", "-n", "2", "--prompt", "the cat", "-o", tmp_path / "images", "--quiet"))
    outputs = {}
    for args in steps:
        result = run_cli(*args)
        assert result.code == 0, (args[0], result.err)
        outputs[args[0]] = result.out
    assert "parity vs PyTorch: pass" in outputs["export"]
    assert sorted(p.name for p in (tmp_path / "images").glob("0000*.png")) == ["00000.png", "00001.png"]
