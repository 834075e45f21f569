"""Small real diffusers UNet2DModels (random weights) in diffusers' on-disk layout.

The configurations cover what issue 2 asks for: attention at one and at two resolutions, both
`resnet_time_scale_shift` kinds, 1 and 3 channels, 28 and 32 pixels.
"""

from __future__ import annotations

from pathlib import Path

UNET_CONFIGS: dict[str, dict] = {
    # 1 channel, 32 px, attention at one resolution, default time embedding shift
    "c1_32_attn1_default": dict(
        sample_size=32, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8, resnet_time_scale_shift="default"),
    # 3 channels, 32 px, attention at two resolutions, scale_shift time embedding
    "c3_32_attn2_scaleshift": dict(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(16, 32, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8, resnet_time_scale_shift="scale_shift"),
    # 1 channel, 28 px (Fashion-MNIST native size), attention at two resolutions, scale_shift
    "c1_28_attn2_scaleshift": dict(
        sample_size=28, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("AttnDownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "AttnUpBlock2D"),
        norm_num_groups=8, attention_head_dim=8, resnet_time_scale_shift="scale_shift"),
    # 3 channels, 28 px, attention at one resolution, default shift
    "c3_28_attn1_default": dict(
        sample_size=28, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D"),
        norm_num_groups=8, attention_head_dim=8, resnet_time_scale_shift="default"),
}


def make_unet_dir(path: Path, config_name: str, seed: int = 0) -> Path:
    """Save a randomly initialised UNet2DModel + DDPM scheduler config under `path`."""
    import torch
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(**UNET_CONFIGS[config_name])
    path.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(str(path))
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(str(path))
    return path
