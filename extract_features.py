"""Extracts VAE latents of an ImageFolder dataset into a few shards for training.

    torchrun --nnodes=1 --nproc_per_node=N extract_features.py --data-path IMAGENET/train \
        --features-path FEATURES --image-size 256 --vae ema
    python extract_features.py ...   (one process)
    python extract_features.py ... --vae-path MY_VAE [--latent-norm channel]   (any AutoencoderKL)

The latents are normalised with the VAE config's scaling_factor and shift_factor (0.18215 for
sd-vae-ft-*), or with --latent-norm channel by the per-channel mean and standard deviation
measured over all extracted latents; the manifest records which, with the class names.

Every image is stored once, with the latent of its horizontal flip; the output does not depend
on the number of processes or the batch size. Re-running resumes: finished shards are kept, if
they were made with the same settings and VAE weights (their sha256 is recorded).
"""
import argparse
import os

from latents.extract import (BadImageError, extract_shards, load_image_source,
                             make_feature_encoder)
from latents.shards import (SettingsMismatchError, check_settings, finished_shards, plan_shards,
                            read_records, stored_statistics, write_manifest)
from runtime.cli import require_at_least
from runtime.distributed import barrier, cleanup, init_distributed, split_range
from runtime.latent_norm import LATENT_NORMS, LatentNorm
from runtime.logging import create_logger
from runtime.vae import PIXELS, VAE_NAMES, VAENotFoundError, load_vae, vae_name_for

UNIT_STD_RANGE = (0.5, 2.0)  # normalised latents whose std leaves this range are worth a warning


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-path", required=True, help="ImageFolder root (one folder per class)")
    parser.add_argument("--features-path", required=True, help="output folder")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--vae", default=None,
                        help=f"{' or '.join(VAE_NAMES)} (the SD VAEs), a name for the VAE of --vae-path "
                             f"(default: its folder's name), or '{PIXELS}' to store the center-cropped "
                             f"pixels in [-1, 1] (default: {VAE_NAMES[0]})")
    parser.add_argument("--vae-path", default=None,
                        help="a local diffusers AutoencoderKL folder (default ./sd-vae-ft-{vae})")
    parser.add_argument("--latent-norm", choices=LATENT_NORMS, default="vae",
                        help="normalise latents with the VAE config's scaling_factor / shift_factor, or "
                             "with the per-channel mean and std measured over the extracted latents")
    parser.add_argument("--global-seed", type=int, default=0, help="seeds the posterior samples")
    parser.add_argument("--shard-size", type=int, default=8192, help="images per shard file")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=4, help="image decoding processes")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="log and leave out unreadable images instead of stopping")
    args = parser.parse_args(argv)

    if not os.path.isdir(args.data_path):
        raise SystemExit(f"error: --data-path {args.data_path} is not a folder")
    args.vae = vae_name_for(args.vae, args.vae_path)
    if args.vae == PIXELS and (args.vae_path or args.latent_norm != "vae"):
        raise SystemExit(f"error: --vae {PIXELS} stores pixels: --vae-path and --latent-norm are for VAEs")
    require_at_least(args, 1, "image_size", "shard_size", "batch_size")
    require_at_least(args, 0, "num_workers")
    return args


def load_vae_and_images(args, device):
    """(LatentVAE or None for pixels, ImageSource); SystemExit with one line when either is missing."""
    try:
        vae = None if args.vae == PIXELS else load_vae(args.vae, args.vae_path, device)
        source = load_image_source(args.data_path)
    except (VAENotFoundError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}")
    if vae is not None and args.latent_norm == "vae" and vae.has_channel_statistics:
        raise SystemExit(f"error: the VAE at {args.vae_path} normalises its latents per channel "
                         f"(latents_mean / latents_std in its config): use --latent-norm channel")
    if vae is not None and args.image_size % vae.downsampling:
        raise SystemExit(f"error: --image-size {args.image_size} is not a multiple of the VAE's "
                         f"downsampling factor {vae.downsampling}")
    return vae, source


def extraction_settings(args, vae, source):
    """Everything the stored shards depend on: a re-run adds to a folder only with the same."""
    return {"data_fingerprint": source.fingerprint, "num_images": len(source.samples),
            "image_size": args.image_size, "vae": args.vae, "seed": args.global_seed,
            "shard_size": args.shard_size,
            "vae_weights_sha256": None if vae is None else vae.weights_sha256,
            "latent_norm": None if vae is None else args.latent_norm,
            "stored_norm": None if vae is None or args.latent_norm == "channel" else vae.norm.record()}


def describe_latents(args, vae, specs, logger):
    """The manifest's fields on the latents: their normalisation, and whether the stored values
    still need it (--latent-norm channel stores raw latents, measured once all are stored)."""
    if vae is None:
        return {"vae": PIXELS, "vae_path": None, "downsampling": 1, "latent_norm": None, "normalised_on_read": False}
    mean, std = stored_statistics(read_records(args.features_path, specs))
    if args.latent_norm == "channel":
        norm = LatentNorm.of_channels(mean, std)
    else:
        norm = vae.norm
        if not UNIT_STD_RANGE[0] <= min(std) <= max(std) <= UNIT_STD_RANGE[1]:
            logger.warning(f"the latents normalised with the VAE's {norm.describe()} have per-channel std "
                           f"{[round(value, 3) for value in std]}, far from 1: the model trains on them as "
                           f"they are; --latent-norm channel would measure a normalisation instead")
    logger.info(f"latent normalisation: {norm.describe()}")
    return {"vae": args.vae, "vae_path": os.path.abspath(vae.path), "downsampling": vae.downsampling,
            "latent_norm": norm.record(),
            "normalised_on_read": args.latent_norm == "channel"}


def main(argv=None):
    args = parse_args(argv)
    context = init_distributed()
    vae, source = load_vae_and_images(args, context.device)
    encode, feature_shape = make_feature_encoder(vae, args.image_size, args.global_seed, context.device,
                                                 normalise=args.latent_norm == "vae")
    settings = extraction_settings(args, vae, source)
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
        try:
            latents = describe_latents(args, vae, specs, logger)
        except ValueError as error:
            raise SystemExit(f"error: {error}")
        manifest = write_manifest(args.features_path, specs, {
            "image_size": args.image_size, "latent_shape": list(feature_shape), **latents,
            "class_to_idx": source.class_to_idx, "settings": settings})
        logger.info(f"wrote {manifest['count']} images ({len(manifest['skipped'])} skipped) "
                    f"to {args.features_path}")
    cleanup()


if __name__ == "__main__":
    main()
