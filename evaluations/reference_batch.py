"""Builds a reference batch for evaluator.py from an ImageFolder or an npz of images, so samples
can be evaluated on datasets other than ImageNet.

    python evaluations/reference_batch.py --image-folder DIR --image-size 256 --out REF.npz
    python evaluations/reference_batch.py --npz IMAGES.npz --out REF.npz

Writes arr_0 (at most --num-images images, a seeded random subset if there are more) and the
Inception statistics mu, sigma, mu_s, sigma_s over ALL images. ImageFolder images get the same
center crop as feature extraction (runtime.transforms.center_crop_arr).
"""
import argparse
import os
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from PIL import Image

from evaluations.inception import (DEFAULT_BATCH_SIZE, InceptionGraphNotFound, add_inception_arguments,
                                   compute_activations, find_inception_graph, load_inception)
from evaluations.metrics import MIN_MANIFOLD_SIZE
from evaluations.npz_batches import ImageBatchFile, image_member_writer, write_statistics_members
from runtime.io import atomic_path
from runtime.transforms import center_crop_arr

DEFAULT_NUM_IMAGES = 10000  # the size of ADM's reference batches
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image-folder", help="folder of images (searched recursively, e.g. an ImageFolder)")
    source.add_argument("--npz", help="npz with uint8 images (N, H, W, 3) in arr_0")
    parser.add_argument("--image-size", type=int, default=None,
                        help="center-crop size for --image-folder; for --npz, the size its images must have")
    parser.add_argument("--out", required=True, help="reference batch npz to write")
    parser.add_argument("--num-images", type=int, default=DEFAULT_NUM_IMAGES, help="images kept in arr_0")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random subset kept in arr_0")
    parser.add_argument("--inception-graph", default=None,
                        help="path of classify_image_graph_def.pb (default: next to this script, "
                             "then the working directory)")
    add_inception_arguments(parser)
    return parser.parse_args(argv)


#################################################################################
#                                 Image Sources                                 #
#################################################################################

def list_image_files(folder):
    """Image files under `folder`, recursively, sorted by path (ImageFolder's order)."""
    paths = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        paths.extend(os.path.join(root, name) for name in sorted(files) if name.lower().endswith(IMAGE_EXTENSIONS))
    return paths


class FolderImages:
    """Images of a folder, center-cropped to image_size, decoded a batch at a time."""

    def __init__(self, folder, image_size):
        if not os.path.isdir(folder):
            raise ValueError(f"{folder}: no such folder")
        self.paths = list_image_files(folder)
        if not self.paths:
            raise ValueError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
        self.image_size = image_size
        self.shape = (len(self.paths), image_size, image_size, 3)

    @property
    def num_images(self):
        return len(self.paths)

    def _load(self, path):
        try:
            with Image.open(path) as image:
                return np.asarray(center_crop_arr(image, self.image_size))  # (S, S, 3) uint8
        except OSError as error:
            raise ValueError(f"{path}: cannot read image ({error})") from None

    def batches(self, batch_size):
        with ThreadPoolExecutor() as pool:  # decoding releases the GIL
            for start in range(0, self.num_images, batch_size):
                yield np.stack(list(pool.map(self._load, self.paths[start:start + batch_size])))


def open_source(args):
    """The images named on the command line: FolderImages or ImageBatchFile."""
    if args.image_folder is not None:
        if args.image_size is None or args.image_size < 1:
            raise ValueError("--image-folder needs a positive --image-size")
        return FolderImages(args.image_folder, args.image_size)
    source = ImageBatchFile(args.npz)
    height, width = source.shape[1:3]
    if args.image_size is not None and (height, width) != (args.image_size, args.image_size):
        raise ValueError(f"{args.npz}: images are {height}x{width}, not --image-size {args.image_size}")
    return source


#################################################################################
#                                Reference Batch                                #
#################################################################################

def choose_subset(total, num_images, seed):
    """Sorted indices of the images kept in arr_0: all of them, or a seeded random subset."""
    if total <= num_images:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, size=num_images, replace=False))


def _keeping_subset(batches, keep, append):
    """Passes batches through, appending the images marked in `keep` (one flag per image)."""
    start = 0
    for images in batches:
        append(images[keep[start:start + len(images)]])
        start += len(images)
        yield images


def build_reference_batch(source, inception, out_path, num_images, seed=0, batch_size=DEFAULT_BATCH_SIZE):
    """Writes the reference npz atomically; returns the indices of the images kept in arr_0."""
    kept = choose_subset(source.num_images, num_images, seed)
    keep = np.zeros(source.num_images, dtype=bool)
    keep[kept] = True
    with atomic_path(out_path) as tmp, zipfile.ZipFile(tmp, "w", allowZip64=True) as archive:
        with image_member_writer(archive, len(kept), source.shape[1:]) as append:
            activations = compute_activations(
                inception, _keeping_subset(source.batches(batch_size), keep, append), source.num_images,
                keep_pool_features=False, description="reference",
            )
        write_statistics_members(archive, activations.pool_statistics, activations.spatial_statistics)
    return kept


def main(argv=None):
    args = parse_args(argv)
    if args.num_images < MIN_MANIFOLD_SIZE or args.batch_size < 1:
        raise SystemExit(f"error: --num-images must be at least {MIN_MANIFOLD_SIZE} and --batch-size positive")
    try:
        graph_path = find_inception_graph(args.inception_graph)
        source = open_source(args)
    except (InceptionGraphNotFound, ValueError) as error:  # NpzFormatError is a ValueError
        raise SystemExit(f"error: {error}") from None
    if source.num_images < MIN_MANIFOLD_SIZE:
        raise SystemExit(f"error: needs at least {MIN_MANIFOLD_SIZE} images, found {source.num_images}")

    try:
        with load_inception(args.backend, graph_path, args.device) as inception:
            kept = build_reference_batch(source, inception, args.out, args.num_images, args.seed, args.batch_size)
    except ValueError as error:  # a bad graph or an unreadable image; nothing is left half-written
        raise SystemExit(f"error: {error}") from None
    print(f"wrote {args.out}: {len(kept)} of {source.num_images} images in arr_0, statistics over all")


if __name__ == "__main__":
    main()
