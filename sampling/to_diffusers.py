"""Converts a checkpoint into a diffusers pipeline folder (transformer, VAE, scheduler).

    python -m sampling.to_diffusers --ckpt EDT-S-2.pt --vae-path sd-vae-ft-ema --out edt-s-2-pipeline

    from sampling.pipeline import EDTPipeline
    pipe = EDTPipeline.from_pretrained("edt-s-2-pipeline")             # offline, from the repository root

The model, AMM and VAE options are the sampling scripts'; a released checkpoint named like a
model (EDT-S-2.pt) needs no --model. The classes' names (pipe.labels) are those the checkpoint
records (train_mask_adan.py's, from the ImageFolder), or --labels for a released one; the
latents' normalisation goes into the pipeline's config.
"""
import argparse
import os

from models import ALL_MODELS
from models.diffusers_wrapper import DiffusionTransformer
from runtime.checkpoint import CheckpointError
from runtime.io import atomic_directory
from runtime.vae import VAENotFoundError

from .cli import add_model_arguments, loader_kwargs
from .labels import read_class_names
from .loading import SamplingSetupError, load_sampling_model
from .naming import checkpoint_tag, model_tag
from .pipeline import EDTPipeline
from .sampler import SAMPLERS
from .solvers import edt_scheduler


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    parser.set_defaults(compile=False)  # loader_kwargs' option of the sampling scripts
    parser.add_argument("--out", required=True, help="the pipeline folder to write (new or empty)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddpm", help="the pipeline's scheduler")
    parser.add_argument("--labels", default=None,
                        help="class names: a JSON object {index: 'name, other name'} (diffusers' "
                             "id2label) or a text file with one line per class (default: the checkpoint's)")
    args = parser.parse_args(argv)
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        raise SystemExit(f"error: --out {args.out} exists and is not an empty folder")
    return args


def model_named_like(ckpt):
    """The registered model whose name the checkpoint's file has ("EDT-S-2.pt": EDT-S/2), or None."""
    return next((name for name in ALL_MODELS if model_tag(name) == checkpoint_tag(ckpt)), None)


def read_id2label(path, num_classes):
    """{str(index): names} from a label file; SystemExit unless it names num_classes classes."""
    try:
        names = read_class_names(path)
    except OSError as error:
        raise SystemExit(f"error: cannot read --labels {path}: {error.strerror}")
    except ValueError as error:
        raise SystemExit(f"error: --labels {error}")
    if len(names) != num_classes:
        raise SystemExit(f"error: --labels {path} names {len(names)} classes, the model has {num_classes}")
    return {str(index): name for index, name in enumerate(names)}


def recorded_id2label(loaded):
    """{str(index): name} of the class names the checkpoint records, or None."""
    if loaded.unconditional or not loaded.class_names:
        return None
    return {str(index): name for index, name in enumerate(loaded.class_names)}


def main(argv=None):
    args = parse_args(argv)
    try:
        loaded = load_sampling_model(**loader_kwargs(args), default_model_name=model_named_like(args.ckpt))
    except (CheckpointError, VAENotFoundError, SamplingSetupError) as error:
        raise SystemExit(f"error: {error}")
    id2label = read_id2label(args.labels, loaded.num_classes) if args.labels else recorded_id2label(loaded)
    transformer = DiffusionTransformer.from_config_and_weights(loaded.config, loaded.model.state_dict())
    vae = loaded.vae
    pipe = EDTPipeline(transformer=transformer, vae=None if vae is None else vae.autoencoder,
                       scheduler=edt_scheduler(args.sampler), id2label=id2label,
                       latent_norm=None if vae is None else vae.norm.record())
    with atomic_directory(args.out) as tmp:
        pipe.save_pretrained(tmp)
    print(f"wrote {args.out}: {loaded.model_name} (AMM blocks {loaded.model.amm_blocks}), "
          f"VAE {loaded.vae_name}, {args.sampler} scheduler")


if __name__ == "__main__":
    main()
