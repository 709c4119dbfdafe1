"""The Stable Diffusion VAE (sd-vae-ft-ema / sd-vae-ft-mse): loading, encoding and decoding.

The weights are never downloaded at run time: they are read from a local folder made
beforehand with `huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir sd-vae-ft-ema`.
"""
import os

import torch
from diffusers import AutoencoderKL

VAE_NAMES = ("ema", "mse")
LATENT_SCALE = 0.18215  # brings SD-VAE latents to roughly unit variance


class VAENotFoundError(FileNotFoundError):
    pass


def default_vae_path(name):
    return f"sd-vae-ft-{name}"


def load_vae(name, path=None, device="cpu"):
    """Loads sd-vae-ft-{name} from `path` (default: ./sd-vae-ft-{name}) in eval mode, frozen."""
    if name not in VAE_NAMES:
        raise ValueError(f"unknown VAE {name!r}; choose one of {VAE_NAMES}")
    path = path or default_vae_path(name)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise VAENotFoundError(
            f"no VAE at {os.path.abspath(path)}: download the Hugging Face repo "
            f"stabilityai/sd-vae-ft-{name} beforehand, e.g. `huggingface-cli download "
            f"stabilityai/sd-vae-ft-{name} --local-dir {default_vae_path(name)}`")
    vae = AutoencoderKL.from_pretrained(path)
    return vae.to(device).eval().requires_grad_(False)


def downsampling_factor(vae):
    # Every encoder block but the last halves the resolution.
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_shape(vae, image_size):
    """(C, h, w) of the latent of one image_size x image_size image."""
    side = image_size // downsampling_factor(vae)
    return (vae.config.latent_channels, side, side)


@torch.no_grad()
def encode(vae, images, noise):
    """Scaled posterior samples `(mean + std * noise) * LATENT_SCALE` of images in [-1, 1].

    images: (N, 3, H, W); noise: (N, C, h, w) standard normal, drawn by the caller so that it
    can be seeded per image.
    """
    posterior = vae.encode(images).latent_dist
    return (posterior.mean + posterior.std * noise) * LATENT_SCALE


@torch.no_grad()
def decode(vae, latents):
    """Images in about [-1, 1], (N, 3, H, W), from scaled latents (N, C, h, w)."""
    return vae.decode(latents / LATENT_SCALE).sample
