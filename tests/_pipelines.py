"""Small real conditional and latent diffusers models (random weights) in diffusers' on-disk layout.

Issue 17's model kinds need fixtures with the real structure of the models people deploy, built here
from configs with no download: a class-conditional pixel-space UNet2DModel, and a Stable Diffusion
1.5-shaped pipeline (UNet2DConditionModel with cross-attention at three resolutions, AutoencoderKL,
CLIPTextModel and a CLIP BPE tokenizer) at a width small enough that two inference steps take a
fraction of a second on one CPU thread. Every builder seeds torch before each random part, so the
same call writes the same bytes.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

NUM_CLASSES = 10
"""Classes of the class-conditional fixture (labels 0..9)."""
NULL_CLASS = NUM_CLASSES
"""The label of "no class", the unconditional half of classifier-free guidance.

Convention (DiT's `LabelEmbedding`, diffusers' `DiTTransformer2DModel`): the embedding table has one
row more than there are classes (`num_class_embeds = NUM_CLASSES + 1`) and the last row, label
`NUM_CLASSES`, is the null class a guided model is trained with (labels dropped with some probability).
Guidance at scale s is then eps_null + s * (eps_class - eps_null).
"""

CLASS_CONDITIONAL_UNET_CONFIG: dict = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8, attention_head_dim=8, num_class_embeds=NUM_CLASSES + 1)
"""The `c3_32` UNet of tests/_unets.py with a class-embedding table (added to the time embedding)."""

# ----------------------------------------------------------------------------- SD-1.5-shaped pipeline
# Stable Diffusion 1.5's configs (runwayml/stable-diffusion-v1-5) with every width divided down: the
# same block types and layer counts, so cross-attention sits at three of four resolutions, the VAE
# downsamples 8x to 4 latent channels, and the text encoder is a CLIP transformer with CLIP's
# activation; only the channel counts, the text encoder's depth and the image size are small.
SD_LATENT_SIZE = 8
"""Latent side of the SD fixture: the UNet's three downsamplings run 8 -> 4 -> 2 -> 1."""
SD_VAE_SCALE = 8
"""The VAE's downsampling (2 ** (4 blocks - 1)), as in SD: images are SD_LATENT_SIZE * 8 = 64 px."""
SD_TEXT_WIDTH = 32
"""The text encoder's hidden size, which is the UNet's cross_attention_dim (768 in SD 1.5)."""
SD_MAX_TOKENS = 77
"""CLIP's context length: SD pads every prompt to 77 tokens."""

SD_UNET_CONFIG: dict = dict(
    sample_size=SD_LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(8, 16, 16, 16),  # SD 1.5: (320, 640, 1280, 1280)
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=SD_TEXT_WIDTH, attention_head_dim=2, norm_num_groups=4)

SD_VAE_CONFIG: dict = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(8, 16, 16, 16),  # SD 1.5: (128, 256, 512, 512)
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=4, sample_size=SD_LATENT_SIZE * SD_VAE_SCALE, scaling_factor=0.18215)

SD_SCHEDULER_CONFIG: dict = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
    set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)
"""SD 1.5's scheduler/scheduler_config.json (a PNDMScheduler), value for value."""


def tokenizer_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP BPE vocabulary small enough to write here, and its merges.

    Every lowercase letter and digit, alone and as a word end (`</w>`), so that any prompt of
    letters, digits and spaces tokenises without an unknown token; two merges ("t h", "th e</w>") so
    the BPE merging itself is exercised ("the" is one token); CLIP's two special tokens last, as in
    CLIP's own vocab.json (transformers' CLIP tokenizer tests build theirs the same way).
    """
    symbols = list(string.ascii_lowercase + string.digits)
    tokens = [*symbols, *(s + "</w>" for s in symbols), "th", "the</w>", "<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, [("t", "h"), ("th", "e</w>")]


def _write_tokenizer_files(folder: Path) -> None:
    """vocab.json + merges.txt, in the format of SD 1.5's tokenizer/ folder."""
    vocab, merges = tokenizer_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")


def make_class_conditional_unet_dir(path: Path, seed: int = 0) -> Path:
    """Save a class-conditional UNet2DModel (NUM_CLASSES classes + the null class) + DDPM scheduler config.

    Model-folder layout, like tests/_unets.py: config.json, diffusion_pytorch_model.safetensors and
    scheduler_config.json side by side. Call it with `class_labels` (a long tensor, NULL_CLASS for
    the unconditional half of guidance).
    """
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(**CLASS_CONDITIONAL_UNET_CONFIG)
    path.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(str(path))
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(str(path))
    return path


def make_sd_pipeline_dir(path: Path, seed: int = 0) -> Path:
    """Save an SD-1.5-shaped StableDiffusionPipeline (random weights) under `path`.

    Written by `StableDiffusionPipeline.save_pretrained`, so model_index.json, unet/, vae/,
    text_encoder/, tokenizer/ and scheduler/ are exactly what diffusers writes (no safety checker, no
    feature extractor: `requires_safety_checker` false). The tokenizer is built from the vocab.json +
    merges.txt written first into tokenizer/ (the files SD 1.5 ships); transformers 5 adds its
    tokenizer.json beside them, the file the `tokenizers` package reads without torch.
    """
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab, _ = tokenizer_vocab()
    _write_tokenizer_files(path / "tokenizer")
    # from the two files by position: (vocab_file, merges_file) in transformers 4, (vocab, merges) in 5
    tokenizer = CLIPTokenizer(str(path / "tokenizer" / "vocab.json"), str(path / "tokenizer" / "merges.txt"),
                              model_max_length=SD_MAX_TOKENS)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD_UNET_CONFIG)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(**SD_VAE_CONFIG)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=SD_TEXT_WIDTH, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=SD_MAX_TOKENS, hidden_act="quick_gelu",  # CLIP's, as SD 1.5
        projection_dim=SD_TEXT_WIDTH, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler(**SD_SCHEDULER_CONFIG), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipeline.save_pretrained(str(path))
    return path


# ------------------------------------------------------------------ class-embedding latent pipeline
CLASS_LATENT_TOKENS = 2
"""Tokens per class in the class-embedding fixture's table (the builtin latent model's layout)."""
CLASS_LATENT_UNET_CONFIG: dict = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=SD_TEXT_WIDTH, attention_head_dim=2, norm_num_groups=4)
CLASS_LATENT_VAE_CONFIG: dict = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(8, 16),
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    norm_num_groups=4, sample_size=16, scaling_factor=0.5)


def make_class_latent_pipeline_dir(path: Path, seed: int = 0) -> Path:
    """Save a class-embedding latent pipeline (random weights): the layout scripts/train_latent_reference.py writes.

    unet/ (UNet2DConditionModel, cross-attention), vae/ (AutoencoderKL, 2x downsampling: 16 px images
    from 8x8 latents), scheduler/ (SD's DDIM settings) and class_embeddings/ (config.json +
    embeddings.safetensors [NUM_CLASSES + 1, CLASS_LATENT_TOKENS, SD_TEXT_WIDTH], the null class last),
    with a model_index.json naming them (pqcad_deploy.latent_parts reads the table).
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    UNet2DConditionModel(**CLASS_LATENT_UNET_CONFIG).save_pretrained(str(path / "unet"))
    torch.manual_seed(seed + 1)
    AutoencoderKL(**CLASS_LATENT_VAE_CONFIG).save_pretrained(str(path / "vae"))
    DDIMScheduler(**{k: v for k, v in SD_SCHEDULER_CONFIG.items() if k != "skip_prk_steps"},
                  clip_sample=False).save_pretrained(str(path / "scheduler"))
    torch.manual_seed(seed + 2)
    table = path / "class_embeddings"
    table.mkdir(parents=True, exist_ok=True)
    save_file({"embeddings": torch.randn(NUM_CLASSES + 1, CLASS_LATENT_TOKENS, SD_TEXT_WIDTH)},
              str(table / "embeddings.safetensors"))
    (table / "config.json").write_text(json.dumps({
        "_class_name": "ClassEmbeddingTable", "num_classes": NUM_CLASSES, "null_class": NULL_CLASS,
        "tokens": CLASS_LATENT_TOKENS, "width": SD_TEXT_WIDTH,
        "class_names": [f"class{i}" for i in range(NUM_CLASSES)]}, indent=2) + "\n")
    (path / "model_index.json").write_text(json.dumps({
        "_class_name": "ClassConditionalLatentPipeline", "_diffusers_version": "0.42.1",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDIMScheduler"], "class_embeddings": ["pqcad_deploy", "ClassEmbeddingTable"]},
        indent=2) + "\n")
    return path


if __name__ == "__main__":  # README's text-conditional example, runnable without downloading weights
    import sys

    if len(sys.argv) != 2 or Path(sys.argv[1]).exists():
        sys.exit("usage: python tests/_pipelines.py NEW_FOLDER  (writes the SD-1.5-shaped test pipeline, random "
                 "weights, into a folder that does not exist yet)")
    print(f"wrote {make_sd_pipeline_dir(Path(sys.argv[1]))} (Stable Diffusion 1.5's architecture and tokenizer at "
          "reduced width, random weights)")
