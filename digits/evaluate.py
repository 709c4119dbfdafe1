"""Judges digit samples: python -m digits.evaluate SAMPLES.npz [...] --output-json METRICS.json

For each npz (arr_0 uint8 images, arr_1 conditioning labels) prints the fraction of samples a
classifier trained on real digits assigns to their label, and the Frechet distance to the real
digits in the classifier's feature space, next to the same figures for real data.
"""
import argparse
import json
import os

import numpy as np

from digits.dataset import digits_as_uint8
from digits.judge import DigitJudge
from runtime.io import atomic_path


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("samples", nargs="+", help="sample npz files (arr_0 images, arr_1 labels)")
    parser.add_argument("--names", nargs="+", help="a row name per npz (default: its folder's name)")
    parser.add_argument("--split-seed", type=int, default=0, help="the held-out split the model did not train on")
    parser.add_argument("--output-json", required=True)
    args = parser.parse_args(argv)
    if args.names and len(args.names) != len(args.samples):
        raise SystemExit("error: give one --names entry per npz")
    for path in args.samples:
        if not os.path.isfile(path):
            raise SystemExit(f"error: no sample file {path}")
    return args


def load_samples(path):
    with np.load(path) as npz:
        if "arr_0" not in npz or "arr_1" not in npz:
            raise SystemExit(f"error: {path} needs arr_0 (images) and arr_1 (labels)")
        return npz["arr_0"], npz["arr_1"]


def evaluate(sample_paths, names, split_seed):
    (train_images, train_labels), (held_out_images, held_out_labels) = digits_as_uint8(split_seed)
    judge = DigitJudge(train_images, train_labels)
    real_images = np.concatenate([train_images, held_out_images])
    order = np.random.default_rng(split_seed).permutation(len(real_images))
    half_a, half_b = real_images[order[: len(order) // 2]], real_images[order[len(order) // 2:]]
    results = {"real held-out": {"images": len(held_out_images),
                                 "accuracy": judge.accuracy(held_out_images, held_out_labels),
                                 "frechet_distance": judge.frechet_distance(half_a, half_b)}}
    for path, name in zip(sample_paths, names):
        images, labels = load_samples(path)
        results[name] = {"images": len(images), "accuracy": judge.accuracy(images, labels),
                         "frechet_distance": judge.frechet_distance(images, real_images)}
    return results


def print_table(results):
    print(f"{'':<40} {'images':>7} {'accuracy':>9} {'Frechet distance':>17}")
    for name, row in results.items():
        print(f"{name:<40} {row['images']:>7} {100 * row['accuracy']:>8.1f}% {row['frechet_distance']:>17.2f}")
    print("(real: classifier accuracy on the held-out digits; distance between two halves of the real digits)")


def main(argv=None):
    args = parse_args(argv)
    names = args.names or [os.path.basename(os.path.dirname(os.path.abspath(path))) for path in args.samples]
    results = evaluate(args.samples, names, args.split_seed)
    print_table(results)
    with atomic_path(args.output_json) as tmp, open(tmp, "w") as f:
        json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
