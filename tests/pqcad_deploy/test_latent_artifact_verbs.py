"""The PyTorch verbs that sample an artifact, on a latent one (issue 17): `analyze` and `eval fid`, on the
class-embedding pipeline of tests/_pipelines.py.

Both read the VAE and the class table from the pipeline folder the artifact records, checked against its hashes
(pqcad_deploy.artifact_pipeline), or, for analyze, from --pipeline. analyze measures the student on its latents as
a pixel student is measured on its pixels, and takes the image measures (x0 drift, final channel means) on the
images the VAE decodes; eval fid scores the decoded images, sampled as the artifact was calibrated.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from test_cli import assert_failed, assert_nothing_left, run_main  # tests/ is on sys.path (conftest)

SCALE = 2.0


def _compress(model_dir: Path, out: Path) -> Path:
    from pqcad_deploy.compress import compress
    from pqcad_deploy.config import CompressConfig
    from pqcad_deploy.presets import PRESETS, CalibrationConfig

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PRESETS, "fast", dataclasses.replace(
            PRESETS["fast"], calibration=CalibrationConfig(num_trajectories=2, timesteps_kept=4, batch_size=2)))
        compress(CompressConfig(model=str(model_dir), method="minmax", distill=False, teacher_steps=4, preset="fast",
                                guidance_scale=SCALE), out, progress=False)
    return out


@pytest.fixture(scope="module")
def moved_pipeline_artifact(class_latent_dir, tmp_path_factory) -> Path:
    """An artifact compressed from a copy of the class-embedding pipeline that is gone afterwards."""
    root = tmp_path_factory.mktemp("analyze_latent")
    copy = shutil.copytree(class_latent_dir, root / "pipeline")
    art = _compress(copy, root / "art")
    shutil.rmtree(copy)
    return art


def test_analyze_measures_a_latent_artifact_on_its_decoded_images(moved_pipeline_artifact, class_latent_dir,
                                                                  tmp_path) -> None:
    from pqcad_deploy import analyze
    from pqcad_deploy.artifact import load_artifact
    from pqcad_deploy.artifact_pipeline import artifact_conditioning
    from pqcad_deploy.distill.target import DDIMCoefficients
    from pqcad_deploy.models import load_model
    from pqcad_deploy.schedule import ddim_timesteps

    art_dir = moved_pipeline_artifact
    out = tmp_path / "an"
    gone = run_main("analyze", art_dir, "--out", out, "-n", 2, "--quiet", "--sensitivity-steps", 1)
    assert_failed(gone, f"{art_dir} is a latent model, and analyze decodes its samples through its VAE",
                  "is not a folder here; pass --pipeline DIR", code=1)
    assert_nothing_left(tmp_path, "an")

    result = run_main("analyze", art_dir, "--out", out, "-n", 2, "--seed", 5, "--quiet", "--sensitivity-steps", 1,
                      "--pipeline", class_latent_dir)
    assert result.code == 0, result.err
    data = json.loads((out / "analysis.json").read_text())
    assert data["image_measures_on"] == "VAE-decoded images"
    assert data["image_shape"] == [4, 8, 8]  # the latents the student samples
    fm = data["final_channel_mean"]
    assert len(fm["fp_255"]) == len(fm["student_255"]) == 3  # RGB, not the 4 latent channels
    assert all(len(row["drift_255"]) == 3 for row in data["x0_channel_drift"])
    assert any(name.endswith("attn2.to_k") for name in data["layers"])  # the cross-attention K of the embeddings

    # the teacher's final images are its latents (sampled here as analyze samples them) decoded by the VAE
    manifest = load_artifact(art_dir).manifest
    loaded = load_model(str(class_latent_dir))
    conditioning = artifact_conditioning(manifest, art_dir, pipeline=class_latent_dir)
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(5))
    with torch.no_grad():
        latents, _ = analyze._sample(load_artifact(art_dir).build_teacher(like_student=True), noise,
                                     ddim_timesteps(manifest.scheduler_config, manifest.teacher_steps),
                                     DDIMCoefficients.from_config(manifest.scheduler_config), 16, "cpu", "", False,
                                     conditioning.draw(torch.arange(2)), conditioning)
        images = loaded.decode(latents.float())
    expected = ((images.double() + 1.0) * 127.5).mean(dim=(0, 2, 3)).tolist()
    assert fm["fp_255"] == pytest.approx(expected, abs=1e-3)


def test_pipeline_applies_to_latent_artifacts_only(tmp_path, small_unet_dir) -> None:
    from test_cli import FAST

    art = tmp_path / "art"
    assert run_main("compress", "--model", small_unet_dir, *FAST, "--out", art).code == 0
    refused = run_main("analyze", art, "--out", tmp_path / "an", "--pipeline", tmp_path, "--quiet")
    assert_failed(refused, "--pipeline applies to latent artifacts only", "pixel-space UNet2DModel", code=1)
    assert_nothing_left(tmp_path, "an")


def test_eval_fid_samples_a_latent_artifact_as_it_was_calibrated(class_latent_dir, tmp_path) -> None:
    from pqcad_deploy.artifact import load_artifact
    from pqcad_deploy.artifact_pipeline import artifact_conditioning
    from pqcad_deploy.eval.fid_sources import FidSourceError, images_from_source
    from pqcad_deploy.eval.pipeline_sampling import generate_images
    from pqcad_deploy.models import load_model

    art_dir = _compress(class_latent_dir, tmp_path / "art")
    art = load_artifact(art_dir)
    for fp, unet in ((True, art.build_teacher()), (False, art.build_student())):
        ours, info = images_from_source(art_dir, n=3, seed=7, fp=fp, progress=False)
        guided = artifact_conditioning(art.manifest, art_dir)
        assert guided.guidance_scale == SCALE
        theirs = generate_images(unet, art.manifest.scheduler_config, 3, art.manifest.student_steps, seed=7,
                                 progress=False, conditioning=guided,
                                 decode=load_model(str(class_latent_dir)).decode).images
        assert ours.shape == (3, 16, 16, 3) and info.steps == art.manifest.student_steps
        assert (ours == theirs).all()

    moved = shutil.copytree(art_dir, tmp_path / "elsewhere" / "art")
    retabled = shutil.copytree(class_latent_dir, tmp_path / "retabled")
    table = retabled / "class_embeddings" / "embeddings.safetensors"
    table.write_bytes(table.read_bytes()[:-4] + b"\x00\x00\x80\x3f")  # one value changed: another table
    manifest = json.loads((moved / "artifact.json").read_text())
    manifest["provenance"]["source_model"] = str(retabled)
    (moved / "artifact.json").write_text(json.dumps(manifest))
    with pytest.raises(FidSourceError, match=r"retabled is not the pipeline .* was compressed from: its "
                                             r"class_embeddings/embeddings.safetensors differs"):
        images_from_source(moved, n=2, progress=False)
