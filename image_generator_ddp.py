"""Samples images for FID-50K into one npz, on any number of processes.

    torchrun --nnodes=1 --nproc_per_node=N image_generator_ddp.py --model EDT-S/2 --ckpt CKPT \
        --amm --output-dir SAMPLES --num-images 50000
    python image_generator_ddp.py ...   (one process)

Every image's class and noise come from (global seed, image index), and every batch is filled
up to --per-proc-batch-size, so the npz does not depend on the number of processes; another batch
size can move a few pixels by one level (float32 rounding, seen on EDT-S/2). Each image is kept
as `{index:06d}.png` in the sample folder, whose name records the settings and whose
manifest.json the sha256 of the weights; a re-run with the same weights samples only the missing
ones (other weights are refused), then the npz `samples_{N}x{H}x{W}x3.npz` (`arr_0` images,
`arr_1` labels) is assembled from them. --class-labels (indices or the checkpoint's class
names) samples only those classes; an unconditional model samples without labels (all 0).
Several guidance scales (--cfg-scale 1 1.5) are sampled in turn from one loaded model, each into
the folder and npz that a launch of its own would write.
"""
import argparse
import os

import torch

from runtime.checkpoint import CheckpointError, summarise
from runtime.cli import require_at_least
from runtime.cuda_graphs import CUDAGraphed
from runtime.distributed import barrier, cleanup, init_distributed, split_range
from runtime.logging import create_logger
from runtime.vae import VAENotFoundError
from models.attention_kernels import attention_kernel_at_inference
from sampling.cli import (CFG_CHANNELS, add_model_arguments, add_sampling_arguments, inference_attention_kernel,
                          loader_kwargs, make_sampler)
from sampling.folder import SampleFolderMismatchError, bind_sample_folders, folder_record
from sampling.images import missing_indices, npz_name, save_pngs, write_npz_from_pngs
from sampling.loading import SamplingSetupError, class_labels, guidance_scales, load_sampling_model
from sampling.naming import amm_tag, sample_name
from sampling.sampler import all_labels, balanced_labels, guided_model_fn, sample_images

DEFAULT_CFG_SCALE = 1.0  # FID-50K as released


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(parser)
    add_sampling_arguments(parser, cfg_scale=DEFAULT_CFG_SCALE)
    parser.add_argument("--output-dir", default="samples", help="the sample folder goes in here")
    parser.add_argument("--num-images", type=int, default=50_000)
    parser.add_argument("--per-proc-batch-size", type=int, default=32)
    parser.add_argument("--global-seed", type=int, default=0)
    parser.add_argument("--class-balanced", action="store_true",
                        help="exactly num_images / num_classes images per class")
    parser.add_argument("--class-labels", nargs="+", default=None,
                        help="sample only these classes (indices or the checkpoint's class names)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="replay the model from CUDA graphs (the same samples, less launch overhead)")
    args = parser.parse_args(argv)
    require_at_least(args, 1, "num_images", "per_proc_batch_size")
    require_at_least(args, 0, "global_seed")
    if args.cuda_graphs and not torch.cuda.is_available():
        raise SystemExit("error: --cuda-graphs needs a GPU")
    return args


def setup(args, context):
    """Model, VAE, fixed labels and the guidance scales; SystemExit with one line (from rank 0)
    on bad input."""
    try:
        loaded = load_sampling_model(**loader_kwargs(args), device=context.device)
        cfg_scales = guidance_scales(loaded, args.cfg_scale, DEFAULT_CFG_SCALE)
        args.class_labels = class_labels(loaded, args.class_labels) if args.class_labels else None
        labels = fixed_labels(args, loaded.num_classes)
    except (CheckpointError, VAENotFoundError, SamplingSetupError, ValueError) as error:
        raise SystemExit(f"error: {error}" if context.is_main else 1)
    return loaded, labels, cfg_scales


def fixed_labels(args, num_classes):
    """(num_images,) labels fixed up front, or None: each image draws its own class."""
    classes = torch.tensor(args.class_labels) if args.class_labels else torch.arange(num_classes)
    if args.class_balanced:
        return classes[balanced_labels(args.global_seed, args.num_images, len(classes))]
    if args.class_labels:
        return classes[all_labels(args.global_seed, args.num_images, len(classes))]
    return None


def sample_folder(args, loaded, cfg_scale):
    """The folder whose name records every setting that changes the samples."""
    return os.path.join(args.output_dir, sample_name(
        loaded.model_name, args.ckpt, loaded.image_size, loaded.vae_name, cfg_scale,
        args.sampler, args.num_sampling_steps, amm_tag(loaded.model.amm_blocks, loaded.model.amm_variant),
        args.global_seed,
        CFG_CHANNELS[args.cfg_channels], args.mixed_precision,
        args.num_images if args.class_balanced else None, args.class_labels))


def classes_description(loaded, labels):
    if loaded.unconditional:
        return "unconditional"
    chosen = range(loaded.num_classes) if labels is None else labels
    return f"classes {summarise([loaded.class_name(label) for label in chosen])}"


def sample_folders(args, loaded, cfg_scales, context):
    """Each scale's sample folder, all bound to these weights before any is sampled; SystemExit
    with one line (from rank 0) where one holds another checkpoint's samples."""
    folders = [sample_folder(args, loaded, scale) for scale in cfg_scales]
    try:
        bind_sample_folders(folders, folder_record(loaded, args.ckpt, args.ckpt_key), write=context.is_main)
    except SampleFolderMismatchError as error:
        raise SystemExit(f"error: {error}" if context.is_main else 1)
    return folders


def sample_into_folder(args, context, loaded, labels, sampler, folder, cfg_scale):
    """Samples the folder's missing PNGs at one guidance scale, then (rank 0) assembles the npz."""
    logger = create_logger(folder, context.is_main)
    logger.info(f"arguments: {dict(vars(args), cfg_scale=cfg_scale)}")

    # Every process lists the missing PNGs before any is written, so all split them alike.
    missing = missing_indices(folder, args.num_images)
    barrier()
    mine = [missing[i] for i in split_range(len(missing), context.rank, context.world_size)]
    logger.info(f"{loaded.model_name} from {args.ckpt}, AMM blocks {loaded.model.amm_blocks}, "
                f"{classes_description(loaded, args.class_labels)}; "
                f"{args.num_images - len(missing)} of {args.num_images} images already in "
                f"{folder}, sampling {len(missing)} on {context.world_size} processes")

    model_fn = guided_model_fn(loaded.model, cfg_scale, CFG_CHANNELS[args.cfg_channels], args.mixed_precision)
    if args.cuda_graphs:
        model_fn = CUDAGraphed(model_fn)
    sample = sampler.sample_fn(model_fn, loaded.latent_shape, context.device, loaded.dtype)
    for indices, images in sample_images(sample, loaded.vae, args.global_seed, mine,
                                         args.per_proc_batch_size, loaded.num_classes,
                                         labels, progress=context.is_main, fill_batches=True):
        save_pngs(folder, indices, images)
    barrier()

    if context.is_main:
        path = os.path.join(folder, npz_name(args.num_images, loaded.image_size, loaded.image_size))
        class_labels = all_labels(args.global_seed, args.num_images, loaded.num_classes, labels)
        shape = write_npz_from_pngs(path, folder, class_labels)
        logger.info(f"wrote {path}: arr_0 uint8 {shape}, arr_1 labels ({shape[0]},)")


def main(argv=None):
    args = parse_args(argv)
    sampler = make_sampler(args)
    attention_kernel = inference_attention_kernel(args, "cuda" if torch.cuda.is_available() else "cpu")
    context = init_distributed()
    try:
        loaded, labels, cfg_scales = setup(args, context)
        folders = sample_folders(args, loaded, cfg_scales, context)
        with attention_kernel_at_inference(attention_kernel):
            for folder, cfg_scale in zip(folders, cfg_scales):
                sample_into_folder(args, context, loaded, labels, sampler, folder, cfg_scale)
    finally:
        cleanup()


if __name__ == "__main__":
    main()
