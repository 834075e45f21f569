"""Model kinds (issue 17): detection from JSON alone, one-line refusals before any weights, real tiny fixtures.

The fixtures of tests/_pipelines.py are real diffusers models (they run); the other kinds are those
folders with their JSON edited the way the real pipelines differ (a controlnet in model_index.json,
SDXL's text_encoder_2, an inpainting UNet's 9 input channels), which is all detection reads.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from _cli_runner import run_cli  # tests/, put on sys.path by tests/conftest.py
from _pipelines import (CLASS_CONDITIONAL_UNET_CONFIG, NULL_CLASS, NUM_CLASSES, SD_LATENT_SIZE, SD_TEXT_WIDTH,
                        SD_VAE_SCALE, make_class_conditional_unet_dir, make_sd_pipeline_dir, tokenizer_vocab)
from pqcad_deploy.errors import ModelLoadError
from pqcad_deploy.model_kinds import MODEL_KINDS, detect_model_kind
from pqcad_deploy.models import BUILTIN_MODELS, load_model

ROOT = Path(__file__).resolve().parents[2]
TODAY = ("pqcad-deploy compresses unconditional and class-conditional (num_class_embeds) pixel-space UNet2DModel "
         "models (a folder with config.json, weights and scheduler_config.json, or 'builtin'), and latent "
         "UNet2DConditionModel pipelines conditioned through cross-attention: Stable Diffusion 1.x / 2.x folders "
         "(unet/, vae/, text_encoder/, tokenizer/, scheduler/) and class-embedding pipelines (unet/, vae/, "
         "class_embeddings/, scheduler/, as scripts/train_latent_reference.py writes them).")


@pytest.fixture(scope="module")
def sd_dir(sd_pipeline_dir) -> Path:
    return sd_pipeline_dir


@pytest.fixture(scope="module")
def class_dir(class_conditional_dir) -> Path:
    return class_conditional_dir


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def _set(**values) -> Callable[[dict], None]:
    return lambda data: data.update(values)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _sd_variant(sd: Path, dst: Path, index: Callable[[dict], None] | None = None,
                unet: Callable[[dict], None] | None = None) -> Path:
    d = _copy(sd, dst)
    if index is not None:
        _edit_json(d / "model_index.json", index)
    if unet is not None:
        _edit_json(d / "unet" / "config.json", unet)
    return d


def _without_text_encoder(sd: Path, dst: Path) -> Path:
    """The SD pipeline minus text_encoder/ and tokenizer/, its UNet given a class-embedding table."""
    d = _sd_variant(sd, dst, index=_set(text_encoder=[None, None], tokenizer=[None, None]),
                    unet=_set(num_class_embeds=NUM_CLASSES + 1))
    shutil.rmtree(d / "text_encoder")
    shutil.rmtree(d / "tokenizer")
    return d


def _latent_unet2d(unet_dir: Path, vae_dir: Path, dst: Path, vae_name: str = "vae") -> Path:
    """A pipeline folder: a UNet2DModel in unet/, a VAE in vae/ (or vqvae/, LDMPipeline's name)."""
    (dst / "scheduler").mkdir(parents=True)
    shutil.copytree(unet_dir, dst / "unet")
    shutil.move(str(dst / "unet" / "scheduler_config.json"), dst / "scheduler" / "scheduler_config.json")
    shutil.copytree(vae_dir, dst / vae_name)
    vae_class = "AutoencoderKL" if vae_name == "vae" else "VQModel"
    (dst / "model_index.json").write_text(json.dumps({
        "_class_name": "LDMPipeline", "unet": ["diffusers", "UNet2DModel"], vae_name: ["diffusers", vae_class],
        "scheduler": ["diffusers", "DDPMScheduler"]}))
    return dst


def _config_only(dst: Path, class_name: str) -> Path:
    dst.mkdir()
    (dst / "config.json").write_text(json.dumps({"_class_name": class_name, "in_channels": 4, "out_channels": 4}))
    return dst


# name -> (maker(sd_dir, class_dir, small_unet_dir, tmp) -> folder, the kind detect_model_kind must name)
CASES: dict[str, tuple[Callable[..., Path], str]] = {
    "builtin": (lambda sd, cc, small, tmp: BUILTIN_MODELS["builtin"], "unconditional-pixel"),
    "builtin-cifar10": (lambda sd, cc, small, tmp: BUILTIN_MODELS["builtin:cifar10"], "unconditional-pixel"),
    "builtin-cifar10-latent": (lambda sd, cc, small, tmp: BUILTIN_MODELS["builtin:cifar10-latent"],
                               "class-embedding-latent"),
    "unet2d-fixture": (lambda sd, cc, small, tmp: small, "unconditional-pixel"),
    "class-conditional": (lambda sd, cc, small, tmp: cc, "class-conditional-pixel"),
    "class-embed-type-identity": (
        lambda sd, cc, small, tmp: _edit_and_return(_copy(cc, tmp / "m"), "config.json",
                                                    _set(num_class_embeds=None, class_embed_type="identity")),
        "other-class-embedding-pixel"),
    "sd-1.5-shaped": (lambda sd, cc, small, tmp: sd, "text-conditional-latent"),
    "sd-without-text-encoder": (lambda sd, cc, small, tmp: _without_text_encoder(sd, tmp / "m"),
                                "class-conditional-latent"),
    "class-embedding-table": (lambda sd, cc, small, tmp: _with_class_table(_without_text_encoder(sd, tmp / "m")),
                              "class-embedding-latent"),
    "class-unet2d-with-vae": (lambda sd, cc, small, tmp: _latent_unet2d(cc, sd / "vae", tmp / "m"),
                              "class-conditional-latent"),
    "ldm-unet2d-with-vqvae": (lambda sd, cc, small, tmp: _latent_unet2d(small, sd / "vae", tmp / "m", "vqvae"),
                              "unconditional-latent"),
    "bare-sd-unet": (lambda sd, cc, small, tmp: sd / "unet", "conditional-unet-without-vae"),
    "controlnet-in-index": (
        lambda sd, cc, small, tmp: _sd_variant(sd, tmp / "m", index=_set(
            _class_name="StableDiffusionControlNetPipeline", controlnet=["diffusers", "ControlNetModel"])),
        "controlnet"),
    "controlnet-model": (lambda sd, cc, small, tmp: _config_only(tmp / "m", "ControlNetModel"), "controlnet"),
    "sdxl-text-encoder-2": (
        lambda sd, cc, small, tmp: _sd_variant(sd, tmp / "m", index=_set(
            text_encoder_2=["transformers", "CLIPTextModelWithProjection"])), "sdxl"),
    "sdxl-text-time": (
        lambda sd, cc, small, tmp: _sd_variant(sd, tmp / "m", unet=_set(addition_embed_type="text_time")), "sdxl"),
    "video-unet3d": (lambda sd, cc, small, tmp: _sd_variant(sd, tmp / "m", unet=_set(
        _class_name="UNet3DConditionModel")), "video"),
    "dit": (lambda sd, cc, small, tmp: _config_only(tmp / "m", "DiTTransformer2DModel"), "transformer"),
    "unclip-class-embed-and-text": (lambda sd, cc, small, tmp: _sd_variant(sd, tmp / "m", unet=_set(
        class_embed_type="projection", projection_class_embeddings_input_dim=8)), "added-conditions"),
    "inpainting": (lambda sd, cc, small, tmp: _sd_variant(sd, tmp / "m", unet=_set(in_channels=9)), "inpainting"),
    "pix2pix": (lambda sd, cc, small, tmp: _sd_variant(sd, tmp / "m", unet=_set(in_channels=8)),
                "image-conditioned"),
}


def _with_class_table(d: Path) -> Path:
    """The layout scripts/train_latent_reference.py writes (JSON only: detection reads no weights)."""
    (d / "class_embeddings").mkdir()
    (d / "class_embeddings" / "config.json").write_text(json.dumps({"_class_name": "ClassEmbeddingTable"}))
    return d


def _edit_and_return(d: Path, name: str, edit: Callable[[dict], None]) -> Path:
    _edit_json(d / name, edit)
    return d


def test_the_cases_cover_every_kind() -> None:
    assert {kind for _, kind in CASES.values()} == set(MODEL_KINDS)
    assert [name for name, kind in MODEL_KINDS.items() if kind.supported] == [
        "unconditional-pixel", "class-conditional-pixel", "class-embedding-latent", "text-conditional-latent"]
    for name, kind in MODEL_KINDS.items():
        assert kind.name == name
        assert (kind.refusal is None) == kind.supported, name


@pytest.mark.parametrize("case", sorted(CASES))
def test_detect_model_kind(case, sd_dir, class_dir, small_unet_dir, tmp_path) -> None:
    make, expected = CASES[case]
    assert detect_model_kind(make(sd_dir, class_dir, small_unet_dir, tmp_path)).name == expected


def test_detection_reads_json_only_fast_and_without_torch(sd_dir, tmp_path) -> None:
    """No weight file is opened (they are gone here), it takes milliseconds, and torch is never imported."""
    d = _copy(sd_dir, tmp_path / "m")
    for weights in [*d.rglob("*.safetensors")]:
        weights.unlink()
    started = time.perf_counter()
    assert detect_model_kind(d).name == "text-conditional-latent"
    assert time.perf_counter() - started < 0.5  # measured: 0.12 ms (0.07 ms on the builtin)
    code = ("import sys; from pqcad_deploy.model_kinds import detect_model_kind; "
            f"print(detect_model_kind({str(d)!r}).name, 'torch' in sys.modules, 'diffusers' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["text-conditional-latent", "False", "False"]


def test_detect_model_kind_errors(tmp_path, small_unet_dir) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"holds no model config \(config.json, or unet/config.json"):
        detect_model_kind(tmp_path / "empty")
    d = _config_only(tmp_path / "vq", "VQModel")
    with pytest.raises(ModelLoadError) as exc:
        detect_model_kind(d)
    assert str(exc.value) == f"{str(d)!r} holds a VQModel, not a UNet2DModel or UNet2DConditionModel; {TODAY}"
    broken = _copy(small_unet_dir, tmp_path / "broken")
    (broken / "config.json").write_text("{")
    with pytest.raises(ModelLoadError, match=r"^UNet config .*config.json is not valid JSON \("):
        detect_model_kind(broken)


# ----------------------------------------------------------------------------- refusals through the CLI
REFUSALS: dict[str, tuple[str, str]] = {
    # case of CASES -> the line after "error: ", with {m} for the --model value
    "class-embed-type-identity": ("other-class-embedding-pixel",
                                  "{m!r} holds a pixel-space UNet2DModel with a class_embed_type ('timestep', "
                                  "'identity', ...: labels that are not class indices); class embeddings other than "
                                  "num_class_embeds are not supported yet (issue 17 adds them); " + TODAY),
    "sd-without-text-encoder": ("class-conditional-latent",
                                "{m!r} holds a class-conditional latent model (a vae, and a UNet2DModel with a class "
                                "embedding or a UNet2DConditionModel with neither a text encoder nor a "
                                "class_embeddings table); class-conditional latent models without a class_embeddings "
                                "table are not supported yet (issue 17 adds them); " + TODAY),
    "controlnet-in-index": ("controlnet",
                            "{m!r} holds a ControlNet (model_index.json names a controlnet, or the model is a "
                            "ControlNetModel); ControlNet image conditioning is not supported; " + TODAY),
    "sdxl-text-encoder-2": ("sdxl",
                            "{m!r} holds an SDXL pipeline (a second text encoder, text_encoder_2, or a UNet with "
                            "addition_embed_type 'text_time'); SDXL's second text encoder and added size and crop "
                            "conditions are not supported; " + TODAY),
    "sdxl-text-time": ("sdxl",
                       "{m!r} holds an SDXL pipeline (a second text encoder, text_encoder_2, or a UNet with "
                       "addition_embed_type 'text_time'); SDXL's second text encoder and added size and crop "
                       "conditions are not supported; " + TODAY),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_compress_refuses_unsupported_kinds_in_one_line(case, sd_dir, class_dir, small_unet_dir, tmp_path) -> None:
    make, kind = CASES[case]
    assert kind == REFUSALS[case][0]
    model = str(make(sd_dir, class_dir, small_unet_dir, tmp_path))
    out = tmp_path / "out"
    out.mkdir()
    result = run_cli("compress", "--model", model, "--preset", "fast", "--teacher-steps", "10", "--method", "minmax",
                     "--no-distill", "--quiet", "--out", out / "art")
    assert result.code == 1
    assert result.out == ""
    assert result.err == "error: " + REFUSALS[case][1].format(m=model) + "\n"
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("case", ["class-embed-type-identity", "sd-without-text-encoder"])
def test_refusal_comes_before_the_weights_are_read(case, sd_dir, class_dir, small_unet_dir, tmp_path) -> None:
    """Garbage weights: the kind's line, not "cannot load the UNet weights" (today's check ran after loading)."""
    make, _ = CASES[case]
    d = _copy(make(sd_dir, class_dir, small_unet_dir, tmp_path), tmp_path / "garbage")
    for weights in d.rglob("*.safetensors"):
        weights.write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError) as exc:
        load_model(str(d))
    assert str(exc.value) == REFUSALS[case][1].format(m=str(d))


def test_a_controlnet_folder_is_refused_before_its_missing_scheduler(tmp_path) -> None:
    d = _config_only(tmp_path / "cn", "ControlNetModel")
    with pytest.raises(ModelLoadError) as exc:
        load_model(str(d))
    assert str(exc.value) == REFUSALS["controlnet-in-index"][1].format(m=str(d))


# ----------------------------------------------------------------------------- the fixtures are real models
def _digest(root: Path) -> dict[str, str]:
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*")) if f.is_file()}


def test_builders_write_the_same_bytes_twice(sd_dir, class_dir, tmp_path) -> None:
    sd_again = make_sd_pipeline_dir(tmp_path / "sd")
    assert _digest(sd_again) == _digest(sd_dir)
    assert sorted(_digest(sd_dir)) == [
        "model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
        "text_encoder/model.safetensors", "tokenizer/merges.txt", "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json", "tokenizer/vocab.json", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    assert _digest(make_class_conditional_unet_dir(tmp_path / "cc")) == _digest(class_dir)


def test_the_sd_shaped_pipeline_loads_and_samples_with_diffusers(sd_dir) -> None:
    from diffusers import StableDiffusionPipeline

    index = json.loads((sd_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["requires_safety_checker"] is False
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["scheduler"] == ["diffusers", "PNDMScheduler"]
    pipe = StableDiffusionPipeline.from_pretrained(str(sd_dir), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    # the structure SD 1.5 has: cross-attention at three of four resolutions, on the text encoder's width
    down = [type(b).__name__ for b in pipe.unet.down_blocks]
    assert down == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert [type(b).__name__ for b in pipe.unet.up_blocks] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == SD_TEXT_WIDTH
    assert pipe.vae.config.latent_channels == 4 and pipe.vae_scale_factor == SD_VAE_SCALE
    vocab, _ = tokenizer_vocab()
    ids = pipe.tokenizer("the cat", padding="max_length", max_length=77).input_ids
    assert ids[:6] == [vocab["<|startoftext|>"], vocab["the</w>"], vocab["c"], vocab["a"], vocab["t</w>"],
                       vocab["<|endoftext|>"]]
    assert len(ids) == 77 and set(ids[6:]) == {vocab["<|endoftext|>"]}

    def sample(prompt: str) -> object:
        return pipe(prompt, num_inference_steps=2, guidance_scale=7.5, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    first, again, other = sample("the cat"), sample("the cat"), sample("a dog 7")
    size = SD_LATENT_SIZE * SD_VAE_SCALE
    assert first.shape == (1, size, size, 3) and first.min() >= 0.0 and first.max() <= 1.0
    assert (first == again).all()  # same seed, same image
    assert abs(first - other).max() > 1e-4  # the prompt reaches the UNet through cross-attention


def test_the_tokenizer_folder_reads_without_torch(sd_dir) -> None:
    """tokenizer.json alone (the `tokenizers` package) gives the ids CLIPTokenizer gives, and so do
    vocab.json + merges.txt, the files SD 1.5 ships: the fixture is usable by a torch-free sampler."""
    from tokenizers import Tokenizer
    from transformers import CLIPTokenizer

    text = "the wider 42"
    reference = CLIPTokenizer.from_pretrained(str(sd_dir / "tokenizer")).encode(text)
    assert Tokenizer.from_file(str(sd_dir / "tokenizer" / "tokenizer.json")).encode(text).ids == reference
    from_files = CLIPTokenizer(vocab=str(sd_dir / "tokenizer" / "vocab.json"),
                               merges=str(sd_dir / "tokenizer" / "merges.txt"))
    assert from_files.encode(text) == reference


def test_the_class_conditional_unet_runs_with_class_labels(class_dir) -> None:
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(str(class_dir), local_files_only=True).eval()
    assert unet.class_embedding.num_embeddings == NUM_CLASSES + 1 == NULL_CLASS + 1
    size, channels = CLASS_CONDITIONAL_UNET_CONFIG["sample_size"], CLASS_CONDITIONAL_UNET_CONFIG["in_channels"]
    x = torch.randn(3, channels, size, size, generator=torch.Generator().manual_seed(0))
    x[1:] = x[0]  # one sample, three labels
    with torch.no_grad():
        eps = unet(x, torch.full((3,), 500), class_labels=torch.tensor([0, 7, NULL_CLASS])).sample
        with pytest.raises(ValueError, match="class_labels should be provided"):
            unet(x, torch.full((3,), 500))
    assert eps.shape == x.shape and bool(torch.isfinite(eps).all())
    assert float((eps[0] - eps[1]).abs().max()) > 1e-4 and float((eps[0] - eps[2]).abs().max()) > 1e-4
