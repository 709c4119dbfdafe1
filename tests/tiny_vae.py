"""A tiny AutoencoderKL saved like sd-vae-ft-ema, for tests that cannot download the real one.

It has the real VAE's interface (4 latent channels, `latent_dist`, `decode(...).sample`) but
few and narrow blocks, and random weights from a fixed seed. By default it has two blocks, so it
downsamples by 2 instead of 8; `downsampling=8` gives the real VAE's latent sizes (64 at 512x512).
"""
import torch
from diffusers import AutoencoderKL

TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=16,
)
TINY_VAE_DOWNSAMPLING = 2 ** (len(TINY_VAE_CONFIG["block_out_channels"]) - 1)
TINY_VAE_WIDTH = 16  # channels of every block after the first


def tiny_vae_config(downsampling=TINY_VAE_DOWNSAMPLING):
    """TINY_VAE_CONFIG with one block per halving of the resolution, plus the last one."""
    num_blocks = downsampling.bit_length()
    widths = (TINY_VAE_CONFIG["block_out_channels"][0],) + (TINY_VAE_WIDTH,) * (num_blocks - 1)
    return {**TINY_VAE_CONFIG, "down_block_types": ("DownEncoderBlock2D",) * num_blocks,
            "up_block_types": ("UpDecoderBlock2D",) * num_blocks, "block_out_channels": widths}


def save_tiny_vae(directory, seed=0, downsampling=TINY_VAE_DOWNSAMPLING):
    """Writes a tiny VAE to `directory` with save_pretrained; load it with
    `runtime.vae.load_vae(name, directory)` exactly as the real one."""
    torch.manual_seed(seed)
    AutoencoderKL(**tiny_vae_config(downsampling)).save_pretrained(directory)
    return directory
