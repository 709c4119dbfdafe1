"""Samples grids of chosen classes (rows) with several samples each (columns) into a PNG.

    python image_generator.py --ckpt EDT-XL-2.pt --class-labels 207 360 387 974 --samples-per-class 4
    python image_generator.py --ckpt EDT-XL-2.pt --compare-amm    (with and without AMM, same noise)
    python image_generator.py --ckpt EDT-XL-2.pt --cfg-scale 1 4   (a grid per scale, same noise)
    python image_generator.py --ckpt results/000-EDT-S-2/checkpoints/0010000.pt --class-labels cat dog

Classes are given by index or by the names a checkpoint of train_mask_adan.py records (the
ImageFolder's); an unconditional model samples a grid of four rows without labels.

Image k of the grid (row-major) uses the noise of (seed, k), so grids made with different
settings from the same seed are directly comparable.
"""
import argparse
import os

import numpy as np
import torch

from runtime.checkpoint import CheckpointError
from runtime.cli import require_at_least
from runtime.logging import create_logger
from runtime.vae import VAENotFoundError
from models.attention_kernels import attention_kernel_at_inference
from sampling.cli import (CFG_CHANNELS, add_model_arguments, add_sampling_arguments, inference_attention_kernel,
                          loader_kwargs, make_sampler)
from sampling.images import enlarge, make_grid, save_png, side_by_side
from sampling.loading import SamplingSetupError, class_labels, guidance_scales, load_sampling_model
from sampling.naming import amm_tag, comparison_tag, sample_name
from sampling.sampler import guided_model_fn, sample_images

DEFAULT_MODEL = "EDT-XL/2"
DEFAULT_CFG_SCALE = 4.0
IMAGENET_CLASSES = 1000
DEFAULT_CLASSES = (207, 360, 387, 974, 88, 979, 417, 279)  # ImageNet's; other models: their first classes
UNCONDITIONAL_ROWS = 4


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser, default_model=DEFAULT_MODEL)
    add_sampling_arguments(parser, cfg_scale=DEFAULT_CFG_SCALE)
    parser.add_argument("--class-labels", nargs="+", default=None,
                        help="one grid row per class: indices or the checkpoint's class names (default: "
                             f"{' '.join(map(str, DEFAULT_CLASSES))} for ImageNet models, else the first "
                             f"{len(DEFAULT_CLASSES)} classes)")
    parser.add_argument("--samples-per-class", type=int, default=4, help="grid columns")
    parser.add_argument("--compare-amm", action="store_true",
                        help="also sample without AMM from the same noise; save both grids side by side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--output-dir", default="grids")
    parser.add_argument("--zoom", type=int, default=1, help="enlarge the saved grids this many times (small images)")
    args = parser.parse_args(argv)
    require_at_least(args, 1, "samples_per_class", "batch_size", "zoom")
    require_at_least(args, 0, "seed")
    return args


def load(args, device):
    """The model and VAE, and the guidance scales; SystemExit with one line on bad input."""
    try:
        loaded = load_sampling_model(**loader_kwargs(args), device=device, default_model_name=DEFAULT_MODEL)
        cfg_scales = guidance_scales(loaded, args.cfg_scale, DEFAULT_CFG_SCALE)
        args.class_labels = grid_rows(loaded, args.class_labels)
    except (CheckpointError, VAENotFoundError, SamplingSetupError) as error:
        raise SystemExit(f"error: {error}")
    if args.compare_amm and not loaded.model.amm_blocks:
        raise SystemExit(f"error: --compare-amm needs AMM blocks, and {loaded.model_name} has none "
                         "as loaded: add --amm or --amm-blocks")
    return loaded, cfg_scales


def grid_rows(loaded, requested):
    """The class of each grid row: those requested (names or indices), or the default ones."""
    if loaded.unconditional:
        if requested:
            raise SamplingSetupError(f"{loaded.model_name} is unconditional: it takes no --class-labels")
        return [0] * UNCONDITIONAL_ROWS
    if requested:
        return class_labels(loaded, requested)
    if loaded.num_classes == IMAGENET_CLASSES:
        return list(DEFAULT_CLASSES)
    return list(range(min(loaded.num_classes, len(DEFAULT_CLASSES))))


def sample_grid(sample, loaded, args):
    """uint8 grid image: row r holds --samples-per-class samples of class r."""
    labels = torch.tensor(args.class_labels).repeat_interleave(args.samples_per_class)  # (rows * columns,)
    indices = list(range(len(labels)))
    batches = sample_images(sample, loaded.vae, args.seed, indices, args.batch_size,
                            loaded.num_classes, labels, progress=True)
    images = np.concatenate([batch_images for _, batch_images in batches])
    return make_grid(images, rows=len(args.class_labels), columns=args.samples_per_class)


def rows_description(loaded, labels):
    if loaded.unconditional:
        return "unconditional"
    return "rows: " + ", ".join(f"{label} ({loaded.class_name(label)})" if loaded.class_names else str(label)
                                for label in labels)


def grid_path(args, loaded, cfg_scale, amm):
    """The PNG path of a grid; `amm` as in `sample_name`."""
    name = sample_name(loaded.model_name, args.ckpt, loaded.image_size, loaded.vae_name,
                       cfg_scale, args.sampler, args.num_sampling_steps, amm, args.seed,
                       CFG_CHANNELS[args.cfg_channels], args.mixed_precision)
    return os.path.join(args.output_dir, f"{name}.png")


def save_grids(args, loaded, sample, cfg_scale, settings, logger):
    """A grid for each AMM setting at one guidance scale, and the two side by side for --compare-amm."""
    grids = []
    for amm_blocks in settings:
        loaded.model.set_amm_blocks(amm_blocks)
        grids.append(sample_grid(sample, loaded, args))
        path = grid_path(args, loaded, cfg_scale, amm_tag(amm_blocks, loaded.model.amm_variant))
        save_png(path, enlarge(grids[-1], args.zoom))
        logger.info(f"saved {path} ({rows_description(loaded, args.class_labels)}, AMM blocks {amm_blocks})")
    if args.compare_amm:
        path = grid_path(args, loaded, cfg_scale, comparison_tag(settings[0], loaded.model.amm_variant))
        save_png(path, enlarge(side_by_side(*grids), args.zoom))
        logger.info(f"saved {path}: with AMM (left) and without (right), the same noise")


def main(argv=None):
    args = parse_args(argv)
    sampler = make_sampler(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    attention_kernel = inference_attention_kernel(args, device.type)
    loaded, cfg_scales = load(args, device)
    logger = create_logger(args.output_dir, is_main=True)
    settings = [loaded.model.amm_blocks, []] if args.compare_amm else [loaded.model.amm_blocks]
    with attention_kernel_at_inference(attention_kernel):
        for cfg_scale in cfg_scales:
            model_fn = guided_model_fn(loaded.model, cfg_scale, CFG_CHANNELS[args.cfg_channels], args.mixed_precision)
            sample = sampler.sample_fn(model_fn, loaded.latent_shape, device, loaded.dtype)
            save_grids(args, loaded, sample, cfg_scale, settings, logger)


if __name__ == "__main__":
    main()
