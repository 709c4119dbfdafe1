"""Extracts VAE latents of an ImageFolder dataset into a few shards for training.

    torchrun --nnodes=1 --nproc_per_node=N extract_features.py --data-path IMAGENET/train \
        --features-path FEATURES --image-size 256 --vae ema
    python extract_features.py ...   (one process)

Every image is stored once, with the latent of its horizontal flip; the output does not depend
on the number of processes or the batch size. Re-running resumes: finished shards are kept, if
they were made with the same settings and VAE weights (their sha256 is recorded).
"""
import argparse
import os

from latents.extract import (BadImageError, extract_shards, load_image_source,
                             make_feature_encoder)
from latents.shards import (SettingsMismatchError, check_settings, finished_shards,
                            plan_shards, write_manifest)
from runtime.checkpoint import state_dict_sha256
from runtime.cli import require_at_least
from runtime.distributed import barrier, cleanup, init_distributed, split_range
from runtime.logging import create_logger
from runtime.vae import LATENT_SCALE, VAE_NAMES, VAENotFoundError, load_vae

IMAGE_SIZE_MULTIPLE = 8  # the VAE downsamples by 8


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-path", required=True, help="ImageFolder root (one folder per class)")
    parser.add_argument("--features-path", required=True, help="output folder")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--vae", choices=[*VAE_NAMES, "none"], default="ema",
                        help="'none' stores the center-cropped pixels in [-1, 1] instead")
    parser.add_argument("--vae-path", default=None, help="local VAE folder (default ./sd-vae-ft-{vae})")
    parser.add_argument("--global-seed", type=int, default=0, help="seeds the posterior samples")
    parser.add_argument("--shard-size", type=int, default=8192, help="images per shard file")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=4, help="image decoding processes")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="log and leave out unreadable images instead of stopping")
    args = parser.parse_args(argv)

    if not os.path.isdir(args.data_path):
        raise SystemExit(f"error: --data-path {args.data_path} is not a folder")
    if args.image_size <= 0 or args.image_size % IMAGE_SIZE_MULTIPLE:
        raise SystemExit(f"error: --image-size must be a positive multiple of {IMAGE_SIZE_MULTIPLE}")
    require_at_least(args, 1, "shard_size", "batch_size")
    require_at_least(args, 0, "num_workers")
    return args


def main(argv=None):
    args = parse_args(argv)
    context = init_distributed()
    try:
        vae = None if args.vae == "none" else load_vae(args.vae, args.vae_path, context.device)
        source = load_image_source(args.data_path)
    except (VAENotFoundError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}")
    encode, feature_shape = make_feature_encoder(vae, args.image_size, args.global_seed,
                                                 context.device)
    settings = {"data_fingerprint": source.fingerprint, "num_images": len(source.samples),
                "image_size": args.image_size, "vae": args.vae, "seed": args.global_seed,
                "shard_size": args.shard_size,
                "vae_weights_sha256": None if vae is None else state_dict_sha256(vae.state_dict())}
    try:
        check_settings(args.features_path, settings)
    except SettingsMismatchError as error:
        raise SystemExit(f"error: {error}")

    logger = create_logger(args.features_path, context.is_main)

    # Every process sees the same finished shards before any is written, so the remaining
    # ones are split identically and each shard is computed by exactly one process.
    specs = plan_shards(len(source.samples), args.shard_size)
    done = finished_shards(args.features_path)
    remaining = [spec for spec in specs if spec.index not in done]
    barrier()
    mine = [remaining[i] for i in split_range(len(remaining), context.rank, context.world_size)]
    logger.info(f"{len(source.samples)} images in {len(source.class_to_idx)} classes, "
                f"{len(specs)} shards, {len(remaining)} to compute on {context.world_size} processes")
    try:
        extract_shards(mine, source, args.image_size, encode, feature_shape, args.features_path,
                       settings, args.batch_size, args.num_workers, args.skip_bad_images,
                       logger, show_progress=context.is_main)
    except BadImageError as error:
        raise SystemExit(f"error: {error} (--skip-bad-images leaves such images out)")
    barrier()

    if context.is_main:
        manifest = write_manifest(args.features_path, specs, {
            "image_size": args.image_size, "latent_shape": list(feature_shape), "vae": args.vae,
            "scale_factor": None if vae is None else LATENT_SCALE,
            "class_to_idx": source.class_to_idx, "settings": settings})
        logger.info(f"wrote {manifest['count']} images ({len(manifest['skipped'])} skipped) "
                    f"to {args.features_path}")
    cleanup()


if __name__ == "__main__":
    main()
