"""A tiny AutoencoderKL saved like sd-vae-ft-ema, for tests that cannot download the real one.

It has the real VAE's interface (4 latent channels, `latent_dist`, `decode(...).sample`) but
two blocks, so it downsamples by 2 instead of 8, and random weights from a fixed seed.
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


def save_tiny_vae(directory, seed=0):
    """Writes a tiny VAE to `directory` with save_pretrained; load it with
    `runtime.vae.load_vae(name, directory)` exactly as the real one."""
    torch.manual_seed(seed)
    AutoencoderKL(**TINY_VAE_CONFIG).save_pretrained(directory)
    return directory
