"""Model, checkpoint and VAE for sampling, from what the user asked and what the checkpoint says.

Two checkpoint kinds load:
- released ones (a raw state dict, or {model, ema, opt, args}): the model is `--model NAME`,
  with input_size = image_size / (VAE downsampling) and `num_classes`;
- ours (train_mask_adan.py): {model, ema, args, model_config, vae, vae_path,
  vae_weights_sha256, latent_norm, image_size, class_names, unconditional}, rebuilt from its
  model_config; its VAE, normalisation and image size become the defaults, and a VAE with other
  weights or statistics than it was trained on is refused.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from models import ALL_MODELS, build_model, model_config
from runtime import vae as vae_lib
from runtime.checkpoint import load_weights, read_checkpoint, state_dict_sha256, summarise
from runtime.latent_norm import LatentNorm


DEFAULT_IMAGE_SIZE = 256
DEFAULT_NUM_CLASSES = 1000
DEFAULT_VAE = "ema"
PIXEL_CHANNELS = 3
AMM_PRESET = "default"  # what `--amm` asks for: the model's published AMM blocks


class SamplingSetupError(ValueError):
    """Arguments that do not fit the checkpoint, the model or the VAE."""


@dataclass
class SamplingModel:
    model: torch.nn.Module
    model_name: str
    image_size: int
    vae_name: str  # "ema", "mse", another VAE's name, or "none" (pixel space)
    vae: object  # a runtime.vae.LatentVAE (the VAE and its latent normalisation), or None in pixel space
    latent_shape: tuple  # (C, h, w) the model samples
    weights_sha256: str  # of the weights loaded (runtime.checkpoint.state_dict_sha256)
    config: dict  # model_config(name, **kwargs) that rebuilds the model, its AMM setting included
    class_names: Optional[list]  # recorded by training, one per class; None for released checkpoints

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    @property
    def num_classes(self):
        return self.model.y_embedder.num_classes

    @property
    def unconditional(self):
        return self.model.unconditional

    def class_name(self, label):
        return self.class_names[label] if self.class_names else str(label)


#################################################################################
#                                  Loading                                      #
#################################################################################

def load_sampling_model(ckpt, model_name=None, image_size=None, num_classes=None, vae_name=None,
                        vae_path=None, ckpt_key="ema", amm=None, amm_variant=None, device="cpu",
                        default_model_name=None, compile_model=False):
    """Reads the checkpoint, loads the VAE, builds the model with its AMM setting, loads the
    weights strictly and returns a SamplingModel in eval mode on `device`.

    amm: None keeps the model's own setting, "default" its published preset, a list of block
    indices those blocks ([] none); amm_variant "256" or "512" (None: the model's default for its
    size). default_model_name is used for a checkpoint that does not
    record its model when model_name is None; compile_model compiles its
    transformer blocks (GuidedDiffusionModel.compile_blocks). Raises
    CheckpointError, VAENotFoundError or SamplingSetupError with a message for the user.
    """
    checkpoint = read_checkpoint(ckpt)
    recorded = checkpoint if isinstance(checkpoint, dict) and "model_config" in checkpoint else {}
    image_size = image_size or recorded.get("image_size") or DEFAULT_IMAGE_SIZE
    vae_name = vae_name or recorded.get("vae") or DEFAULT_VAE
    try:
        vae = None if vae_name == vae_lib.PIXELS else recorded_vae(recorded, vae_name, vae_path, device)
    except vae_lib.VAEMismatchError as error:
        raise SamplingSetupError(f"{ckpt}: {error}") from None
    latent_shape = sampled_shape(vae, image_size)

    if recorded:
        model_name = recorded_model_name(recorded["model_config"], model_name)
        config = recorded_config(recorded["model_config"], num_classes, amm, amm_variant)
    elif (model_name or default_model_name) is None:
        raise SamplingSetupError(f"{ckpt} does not record its model: name it with --model")
    else:
        model_name = model_name or default_model_name
        config = released_config(model_name, latent_shape, num_classes, amm, amm_variant)
    model = construct(build_model, config)
    check_input_shape(model, model_name, latent_shape, image_size, vae_name)
    weights = load_weights(model, checkpoint, key=ckpt_key, source=ckpt, model_name=model_name)
    weights_sha256 = state_dict_sha256(weights)
    model = model.to(device).eval()
    if compile_model:
        model.compile_blocks()
    config = model_config(config["name"], **{**config["kwargs"], "amm_blocks": model.amm_blocks,
                                             "amm_variant": model.amm_variant})
    return SamplingModel(model, model_name, image_size, vae_name, vae, latent_shape, weights_sha256,
                         config, recorded.get("class_names"))


def recorded_vae(recorded, vae_name, vae_path, device):
    """The LatentVAE that decodes a checkpoint's samples: for ours, the features' VAE (checked
    by its weights and statistics) with the recorded normalisation; for released ones (nothing
    recorded), the named VAE with its config's factors (0.18215 for sd-vae-ft-*, as released)."""
    same_vae = vae_name == recorded.get("vae")
    norm = LatentNorm.from_record(recorded.get("latent_norm")) if same_vae else None
    return vae_lib.load_recorded_vae(vae_name, vae_path, recorded.get("vae_path") if same_vae else None, device,
                                     norm, recorded.get("vae_weights_sha256") if same_vae else None)


def sampled_shape(vae, image_size):
    """(C, h, w) of what the model generates for one image_size x image_size image."""
    if vae is None:
        return (PIXEL_CHANNELS, image_size, image_size)
    if image_size % vae.downsampling:
        raise SamplingSetupError(f"--image-size {image_size} is not a multiple of the VAE's "
                                 f"downsampling factor {vae.downsampling}")
    return vae.latent_shape(image_size)


def guidance_scales(loaded, requested, default):
    """The guidance scales to sample with: the `requested` list, else [default]; an unconditional
    model has no null class to guide with, so only [1]."""
    if not requested:
        return [1.0 if loaded.unconditional else default]
    if loaded.unconditional and any(scale != 1.0 for scale in requested):
        raise SamplingSetupError(f"{loaded.model_name} is unconditional (trained without labels): it samples "
                                 f"without guidance, so the guidance scale must be 1, not "
                                 f"{' '.join(f'{scale:g}' for scale in requested)}")
    return list(requested)


def class_labels(loaded, values):
    """Class indices of `values`, each a class name the checkpoint records or an index;
    SamplingSetupError for an unknown one. Names take precedence over indices."""
    if loaded.unconditional:
        raise SamplingSetupError(f"{loaded.model_name} is unconditional: it takes no class labels")
    names = loaded.class_names or []
    labels = []
    for value in map(str, values):
        if value in names:
            labels.append(names.index(value))
        elif value.isdigit() and int(value) < loaded.num_classes:
            labels.append(int(value))
        else:
            known = f"classes {summarise(names)}" if names else f"classes 0 .. {loaded.num_classes - 1}"
            raise SamplingSetupError(f"unknown class {value!r}: the model has {known}")
    return labels


#################################################################################
#                                Model building                                 #
#################################################################################

def amm_kwargs(model_name, amm, amm_variant=None, recorded_blocks=None):
    """The `amm_blocks` and `amm_variant` arguments for the model constructor; {} keeps the
    model's defaults."""
    kwargs = {} if amm_variant is None else {"amm_variant": amm_variant}
    if amm is None:
        return kwargs
    if amm == AMM_PRESET and model_name not in ALL_MODELS:
        # A custom-size model has no published preset; its recorded blocks are its default.
        if not recorded_blocks:
            raise SamplingSetupError(f"{model_name} has no AMM preset: choose blocks with --amm-blocks")
        return {**kwargs, "amm_blocks": list(recorded_blocks)}
    return {**kwargs, "amm_blocks": amm}


def released_config(model_name, latent_shape, num_classes, amm, amm_variant=None):
    channels, side, _ = latent_shape
    kwargs = dict(input_size=side, in_channels=channels, num_classes=num_classes or DEFAULT_NUM_CLASSES)
    return model_config(model_name, **kwargs, **amm_kwargs(model_name, amm, amm_variant))


def build_released_model(model_name, latent_shape, num_classes, amm, amm_variant=None):
    return construct(build_model, released_config(model_name, latent_shape, num_classes, amm, amm_variant))


def recorded_model_name(config, requested):
    if requested is not None and requested != config["name"]:
        raise SamplingSetupError(f"the checkpoint holds {config['name']} (its model_config), "
                                 f"not --model {requested}; leave --model out")
    return config["name"]


def recorded_config(config, num_classes, amm, amm_variant=None):
    kwargs = dict(config["kwargs"])
    recorded_classes = kwargs.get("num_classes", DEFAULT_NUM_CLASSES)
    if num_classes is not None and num_classes != recorded_classes:
        raise SamplingSetupError(f"the checkpoint's model has {recorded_classes} classes, "
                                 f"not --num-classes {num_classes}")
    kwargs.update(amm_kwargs(config["name"], amm, amm_variant, kwargs.get("amm_blocks")))
    return model_config(config["name"], **kwargs)


def construct(builder, *args, **kwargs):
    """Calls a model builder, turning its ValueErrors (unknown name, AMM preset or block index)
    into SamplingSetupErrors."""
    try:
        return builder(*args, **kwargs)
    except ValueError as error:
        raise SamplingSetupError(str(error)) from None


def model_input_shape(model):
    """(C, h, w) the model takes: its token grid (from pos_embed) times its patch size."""
    side = round(model.pos_embed.shape[1] ** 0.5) * model.patch_size
    return (model.in_channels, side, side)


def check_input_shape(model, model_name, latent_shape, image_size, vae_name):
    expected = model_input_shape(model)
    if tuple(latent_shape) != expected:
        raise SamplingSetupError(
            f"{model_name} takes inputs of shape {expected}, but --image-size {image_size} with "
            f"--vae {vae_name} gives {tuple(latent_shape)}")
