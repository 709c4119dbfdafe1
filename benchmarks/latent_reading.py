"""Random-access reading speed of LatentDataset (items/s), on real features or on synthetic
shards of ImageNet-256 shape (latents 4 x 32 x 32).

    python -m benchmarks.latent_reading                            # synthetic, in a temp folder
    python -m benchmarks.latent_reading --features-path FEATURES   # an extraction's output
"""
import argparse
import tempfile
import time

import numpy as np

from latents import LatentDataset
from latents.shards import plan_shards, write_manifest, write_shard

IMAGENET_LATENT_SHAPE = (4, 32, 32)
IMAGENET_CLASSES = 1000


def write_synthetic_features(features_path, num_items, shard_size):
    rng = np.random.default_rng(0)
    specs = plan_shards(num_items, shard_size)
    settings = {"synthetic": True}
    for spec in specs:
        features = rng.standard_normal((spec.size, 2, *IMAGENET_LATENT_SHAPE), dtype=np.float32)
        labels = rng.integers(0, IMAGENET_CLASSES, spec.size)
        write_shard(features_path, spec, features, labels, [], settings)
    write_manifest(features_path, specs, {
        "image_size": 256, "latent_shape": list(IMAGENET_LATENT_SHAPE), "vae": "ema", "downsampling": 8,
        "latent_norm": {"kind": "vae", "scaling_factor": 0.18215, "shift_factor": None}, "normalised_on_read": False,
        "class_to_idx": {str(c): c for c in range(IMAGENET_CLASSES)},
        "settings": settings})


def measure(features_path, reads):
    dataset = LatentDataset(features_path, seed=0)
    order = np.random.default_rng(1).integers(0, len(dataset), reads)
    for index in order[:1000]:  # warm the page cache and the code paths
        dataset[int(index)]
    start = time.perf_counter()
    for index in order:
        dataset[int(index)]
    return len(dataset), reads / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--features-path", default=None)
    parser.add_argument("--num-items", type=int, default=65536, help="synthetic items")
    parser.add_argument("--shard-size", type=int, default=8192, help="synthetic shard size")
    parser.add_argument("--reads", type=int, default=200_000)
    args = parser.parse_args()

    if args.features_path:
        items, rate = measure(args.features_path, args.reads)
    else:
        with tempfile.TemporaryDirectory() as features_path:
            write_synthetic_features(features_path, args.num_items, args.shard_size)
            items, rate = measure(features_path, args.reads)
    print(f"{rate:,.0f} items/s random access over {items} items ({args.reads} reads)")


if __name__ == "__main__":
    main()
