"""VAEs: any diffusers AutoencoderKL from a local folder, with the normalisation that turns its
latents into the model's.

The weights are never downloaded at run time: they are read from a local folder made
beforehand, e.g. `huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir sd-vae-ft-ema`.
"ema" and "mse" are the short names of the Stable Diffusion VAEs the paper used
(./sd-vae-ft-{name} by default); any other AutoencoderKL folder is given by its path.

The model sees x = normalise(z) of a VAE latent z, and the VAE decodes denormalise(x). The
normalisation is a LatentNorm: the VAE config's `scaling_factor` and `shift_factor` (0.18215 and
none for sd-vae-ft-*, as released), or per-channel mean and standard deviation measured over the
extracted latents (`--latent-norm channel`).
"""
import functools
import os
from dataclasses import dataclass

import torch

from .checkpoint import state_dict_sha256
from .latent_norm import LatentNorm

VAE_NAMES = ("ema", "mse")
PIXELS = "none"  # the --vae name of pixel-space models, which have no VAE


class VAENotFoundError(FileNotFoundError):
    pass


class VAEMismatchError(ValueError):
    """A VAE with other weights or other latent statistics than a model was trained with."""


#################################################################################
#                                  Loading                                      #
#################################################################################

def default_vae_path(name):
    return f"sd-vae-ft-{name}"


def resolve_vae_path(name, path=None):
    """The folder of VAE `name`: `path`, else ./sd-vae-ft-{name} for the SD VAEs."""
    if path:
        return path
    if name in VAE_NAMES:
        return default_vae_path(name)
    raise VAENotFoundError(f"VAE {name!r} is not one of the short names {VAE_NAMES}: give its folder with --vae-path")


def load_autoencoder(name, path=None, device="cpu"):
    """The AutoencoderKL of `name` (see resolve_vae_path) in eval mode, frozen."""
    path = resolve_vae_path(name, path)
    if not os.path.isfile(os.path.join(path, "config.json")):
        hint = (f"download the Hugging Face repo stabilityai/sd-vae-ft-{name} beforehand, e.g. "
                f"`huggingface-cli download stabilityai/sd-vae-ft-{name} --local-dir {default_vae_path(name)}`"
                if name in VAE_NAMES else "give a folder written by AutoencoderKL.save_pretrained")
        raise VAENotFoundError(f"no VAE at {os.path.abspath(path)}: {hint}")
    # Imported here: diffusers' import takes seconds (it imports torch._dynamo), and pixel-space
    # runs, which import this module, never load a VAE.
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(path)
    except (OSError, ValueError, TypeError) as error:
        raise VAENotFoundError(f"cannot load an AutoencoderKL from {os.path.abspath(path)}: "
                               f"{str(error).strip().splitlines()[0]}") from None
    return vae.to(device).eval().requires_grad_(False)


def vae_name_for(name, path):
    """--vae's name, else the folder's name for a VAE given by --vae-path alone, else "ema"."""
    if name:
        return name
    return os.path.basename(os.path.normpath(path)) if path else VAE_NAMES[0]


#################################################################################
#                            A VAE with its latents                             #
#################################################################################

@dataclass
class LatentVAE:
    """An AutoencoderKL, the normalisation of its latents, and where it came from."""
    autoencoder: torch.nn.Module  # a diffusers AutoencoderKL
    norm: LatentNorm
    name: str = ""
    path: str = ""

    @property
    def dtype(self):
        return self.autoencoder.dtype

    @property
    def channels(self):
        return self.autoencoder.config.latent_channels

    @property
    def downsampling(self):
        # Every encoder block but the last halves the resolution.
        return 2 ** (len(self.autoencoder.config.block_out_channels) - 1)

    @property
    def has_channel_statistics(self):
        """Whether its config normalises latents per channel (latents_mean / latents_std, as some
        SDXL-family VAEs), which the "vae" LatentNorm, scaling and shift only, would leave out."""
        config = self.autoencoder.config
        return getattr(config, "latents_mean", None) is not None or getattr(config, "latents_std", None) is not None

    @functools.cached_property
    def weights_sha256(self):
        return state_dict_sha256(self.autoencoder.state_dict())

    def latent_shape(self, image_size):
        """(C, h, w) of the latent of one image_size x image_size image."""
        side = image_size // self.downsampling
        return (self.channels, side, side)

    @torch.no_grad()
    def sample_latents(self, images, noise):
        """Posterior samples z = mean + std * noise, not normalised. images: (N, 3, H, W) in
        [-1, 1]; noise: (N, C, h, w) standard normal, drawn by the caller so that it can be
        seeded per image."""
        posterior = self.autoencoder.encode(images).latent_dist
        return posterior.mean + posterior.std * noise

    @torch.no_grad()
    def decode(self, latents):
        """Images in about [-1, 1], (N, 3, H, W), from the model's latents (N, C, h, w)."""
        return self.autoencoder.decode(self.norm.denormalise(latents.to(self.dtype))).sample

    def check_matches(self, weights_sha256, norm):
        """VAEMismatchError unless this VAE has the weights (sha256; None: not recorded) and the
        latent statistics a model was trained with."""
        if weights_sha256 is not None and weights_sha256 != self.weights_sha256:
            raise VAEMismatchError(
                f"the VAE at {os.path.abspath(self.path)} has other weights (sha256 {self.weights_sha256[:12]}...) "
                f"than the one the model was trained with (sha256 {weights_sha256[:12]}...): give --vae-path "
                f"the VAE the features were extracted with")
        if norm.kind == "vae" and norm != LatentNorm.of_vae_config(self.autoencoder.config):
            raise VAEMismatchError(
                f"the VAE at {os.path.abspath(self.path)} normalises latents with "
                f"{LatentNorm.of_vae_config(self.autoencoder.config).describe()}, the model was trained "
                f"with {norm.describe()}: give --vae-path the VAE the features were extracted with")


def load_vae(name, path=None, device="cpu", norm=None):
    """LatentVAE of `name` (see resolve_vae_path); `norm` None takes its config's factors."""
    autoencoder = load_autoencoder(name, path, device)
    return LatentVAE(autoencoder, norm or LatentNorm.of_vae_config(autoencoder.config), name,
                     resolve_vae_path(name, path))


def load_recorded_vae(name, path, recorded_path, device, norm=None, weights_sha256=None):
    """The VAE a model was trained on: from `path`, else where the features' VAE was if it is
    still there, else the default for `name`. norm None: the VAE config's (released checkpoints);
    VAEMismatchError when its weights (sha256) or its statistics differ from the recorded ones."""
    if not path and recorded_path:
        if os.path.isdir(recorded_path):
            path = recorded_path
        elif name not in VAE_NAMES:
            raise VAENotFoundError(f"the VAE {name!r} the model was trained on was at {recorded_path}, "
                                   f"which is gone: give its folder with --vae-path")
    vae = load_vae(name, path, device, norm)
    vae.check_matches(weights_sha256, vae.norm)
    return vae
