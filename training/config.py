"""What a training run trains: the model config and data facts resolved from the command line
and the features manifest, checked before any work is done."""
import os
from dataclasses import dataclass
from typing import Optional

import torch

import models
from latents.shards import class_names, manifest_latent_norm, read_manifest
from models.mdt import TRAINING_MASK_RATIO
from runtime.latent_norm import LatentNorm
from runtime.vae import PIXELS

SD_VAE_DOWNSAMPLING = 8  # of manifests written before the downsampling was recorded (SD VAEs only)
NUM_EDT_STAGES = 5
UNCONDITIONAL_LABELS = dict(num_classes=1, class_dropout_prob=0.0)  # one class, no null class to guide with
MDT_MODEL_PREFIX = "MDTv2"


class ConfigError(ValueError):
    """Bad input found before training starts; the script prints it as one error line."""


@dataclass(frozen=True)
class RunConfig:
    model_config: dict  # models.model_config(name, **kwargs): rebuilds the model
    vae: str  # "ema", "mse", another VAE's name, or "none" (pixels)
    vae_path: Optional[str]  # where the features' VAE was (None for pixels or old manifests)
    vae_weights_sha256: Optional[str]
    latent_norm: Optional[LatentNorm]  # None for pixels
    image_size: int
    num_images: int
    class_names: list  # the ImageFolder's, in class-index order
    unconditional: bool  # one class, labels ignored, no label dropout

    @property
    def model_name(self):
        return self.model_config["name"]

    def describe(self):
        """What every checkpoint records besides the training state: what the sampling scripts,
        the demo and the converter need to rebuild the model and decode its latents."""
        return {"model_config": self.model_config, "vae": self.vae, "vae_path": self.vae_path,
                "vae_weights_sha256": self.vae_weights_sha256,
                "latent_norm": None if self.latent_norm is None else self.latent_norm.record(),
                "image_size": self.image_size,
                # an unconditional model's one class is none of the folders'
                "class_names": None if self.unconditional else self.class_names,
                "unconditional": self.unconditional}


#################################################################################
#                               Features manifest                               #
#################################################################################

def read_features_manifest(features_path):
    if not os.path.isdir(features_path):
        raise ConfigError(f"--feature-path {features_path} is not a folder")
    if not os.listdir(features_path):
        raise ConfigError(f"--feature-path {features_path} is empty: extract features first "
                          f"(extract_features.py)")
    try:
        manifest = read_manifest(features_path)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(str(error)) from None
    if manifest["count"] == 0:
        raise ConfigError(f"{features_path} holds no images")
    return manifest


def check_against_manifest(args, manifest):
    """--image-size, --num-classes and --vae are recorded choices: they must match the data."""
    num_classes = 1 if args.unconditional else len(manifest["class_to_idx"])
    checks = (("--image-size", args.image_size, manifest["image_size"]),
              ("--num-classes", args.num_classes, num_classes),
              ("--vae", args.vae, manifest["vae"]))
    for option, given, stored in checks:
        if given is not None and given != stored:
            raise ConfigError(f"{option} {given} does not match the features in {args.feature_path} "
                              f"({stored}); extract features with these settings or drop the option")
    channels, height, width = manifest["latent_shape"]
    if height != width:
        raise ConfigError(f"latents must be square, the manifest says {height}x{width}")
    downsampling = manifest.get("downsampling", 1 if manifest["vae"] == PIXELS else SD_VAE_DOWNSAMPLING)
    side = manifest["image_size"] // downsampling
    if side != height:
        raise ConfigError(f"the manifest's latent side {height} does not fit image size "
                          f"{manifest['image_size']} with vae {manifest['vae']!r}")


#################################################################################
#                                 Model config                                  #
#################################################################################

def parse_amm_blocks(values):
    """--amm-blocks: block indices, a preset name ("default", "high_cfg"), or "none"."""
    if values is None:
        return None
    if len(values) == 1 and not values[0].isdigit():
        return () if values[0] == "none" else values[0]
    if not all(value.isdigit() for value in values):
        raise ConfigError(f"--amm-blocks takes block indices or one preset name, got {values}")
    return tuple(int(value) for value in values)


def custom_model_kwargs(args):
    """Size arguments of a custom EDT (--dims, --num-heads, --depths, five each), DiT or MDTv2
    (--hidden-size, --depth, one --num-heads)."""
    if args.model == "EDT":
        for option in ("dims", "num_heads", "depths"):
            values = getattr(args, option)
            if values is None or len(values) != NUM_EDT_STAGES:
                raise ConfigError(f"--model EDT needs --{option.replace('_', '-')} with "
                                  f"{NUM_EDT_STAGES} integers (one per stage)")
        return dict(dims=tuple(args.dims), num_heads=tuple(args.num_heads), depths=tuple(args.depths))
    if args.hidden_size is None or args.depth is None or args.num_heads is None or len(args.num_heads) != 1:
        raise ConfigError(f"--model {args.model} needs --hidden-size, --depth and one --num-heads")
    return dict(hidden_size=args.hidden_size, depth=args.depth, num_heads=args.num_heads[0])


def resolve_model_config(args, manifest):
    if args.model not in {**models.ALL_MODELS, **models.CUSTOM_MODELS}:
        raise ConfigError(f"unknown model {args.model!r}; choose a registered name "
                          f"({', '.join(models.ALL_MODELS)}) or EDT / DiT with size options")
    channels, side, _ = manifest["latent_shape"]
    kwargs = dict(input_size=side, in_channels=channels, num_classes=len(manifest["class_to_idx"]))
    if args.unconditional:
        kwargs.update(UNCONDITIONAL_LABELS)
    if args.model in models.CUSTOM_MODELS:
        kwargs.update(custom_model_kwargs(args), patch_size=args.patch_size or 2)
    elif args.patch_size is not None:
        raise ConfigError(f"{args.model} has a fixed patch size; --patch-size is for --model EDT / DiT / MDTv2")
    if args.model.startswith(MDT_MODEL_PREFIX):
        kwargs.update(mdt_kwargs(args))
    elif args.mask_ratio is not None or args.decode_layer is not None:
        raise ConfigError("--mask-ratio and --decode-layer are MDTv2's options")
    amm_blocks = parse_amm_blocks(args.amm_blocks)
    if amm_blocks is not None:
        if isinstance(amm_blocks, str) and args.model in models.CUSTOM_MODELS:
            raise ConfigError(f"AMM presets belong to registered models; give --model {args.model} "
                              f"block indices")
        kwargs["amm_blocks"] = amm_blocks
    config = models.model_config(args.model, **kwargs)
    model = check_model_builds(config)
    if not args.no_mask and model.masked_training_flag is None:
        raise ConfigError(f"masked training needs an EDT or MDTv2 model; train {args.model} with --no-mask")
    if args.fused_mask_batch and not model.fuses_masked_batch:
        raise ConfigError("--fused-mask-batch needs an EDT model (MDT's masked pass drops tokens, so it "
                          "cannot share a batch with the full pass)")
    return config


def mdt_kwargs(args):
    """MDTv2's masking options: no mask ratio when training without masking, so that its mask
    token stays frozen, as in MDT's own unmasked models."""
    kwargs = {} if args.decode_layer is None else {"decode_layer": args.decode_layer}
    if args.no_mask:
        kwargs["mask_ratio"] = None
    else:
        kwargs["mask_ratio"] = TRAINING_MASK_RATIO if args.mask_ratio is None else args.mask_ratio
    return kwargs


def check_model_builds(config):
    """Builds the model without memory (meta device) to catch shape errors up front; returns it."""
    try:
        with torch.device("meta"):
            return models.build_model(config)
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"cannot build {config['name']} for these latents "
                          f"({config['kwargs']}): {error}") from None


def resolve_run_config(args):
    """Reads the manifest and checks every option against it; raises ConfigError."""
    manifest = read_features_manifest(args.feature_path)
    check_against_manifest(args, manifest)
    model_config = resolve_model_config(args, manifest)
    return RunConfig(model_config=model_config, vae=manifest["vae"], vae_path=manifest.get("vae_path"),
                     vae_weights_sha256=manifest["settings"].get("vae_weights_sha256"),
                     latent_norm=manifest_latent_norm(manifest), image_size=manifest["image_size"],
                     num_images=manifest["count"], class_names=class_names(manifest),
                     unconditional=args.unconditional)
