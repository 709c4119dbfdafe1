"""A model of this checkout against the same model of another checkout (an earlier commit), in one
process with the same weights and inputs, measured interleaved as speed.py measures: the way to
tell whether a change made a model faster when the machine's load drifts between runs.

    git worktree add /tmp/baseline <commit>
    python -m benchmarks.compare_trees --baseline /tmp/baseline --model EDT-S/2 --batch-size 8 --device cpu \
        --mixed-precision bf16 --measurements inference train_masked --repeats 9

The baseline's `models` package is loaded under another name; the training step, diffusion and
optimizer are this checkout's. Prints one line per measurement: medians, minima and the ratio.
"""
import argparse
import importlib.util
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import speed  # noqa: E402

BASELINE_PACKAGE = "baseline_models"


def load_baseline_models(tree):
    init = os.path.join(tree, "models", "__init__.py")
    if not os.path.isfile(init):
        raise SystemExit(f"error: no models package in {tree}")
    spec = importlib.util.spec_from_file_location(BASELINE_PACKAGE, init,
                                                  submodule_search_locations=[os.path.dirname(init)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[BASELINE_PACKAGE] = package
    spec.loader.exec_module(package)
    return package


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="the other checkout's root")
    parser.add_argument("--model", default="EDT-S/2")
    parser.add_argument("--measurements", nargs="+", choices=speed.MEASUREMENTS[:-1],
                        default=["inference", "train_masked"])
    args, speed_argv = parser.parse_known_args(argv)
    speed_args = speed.parse_args(["--model", args.model, "--skip-sampling", *speed_argv])
    return args, speed_args


def main(argv=None):
    args, speed_args = parse_args(argv)
    device = torch.device(speed_args.device)
    if speed_args.threads:
        torch.set_num_threads(speed_args.threads)
    baseline_models = load_baseline_models(args.baseline)
    ours = speed.build_model(args.model, speed_args.latent_size, speed_args.seed)
    baseline = baseline_models.create_model(args.model, input_size=speed_args.latent_size)
    baseline.load_state_dict(ours.state_dict())
    variants = [speed.Variant("baseline", args.model, baseline, True, speed_args, device),
                speed.Variant("ours", args.model, ours, True, speed_args, device)]
    ops = {variant.label: speed.operations(variant, speed_args, device) for variant in variants}
    lines = []
    for measurement in args.measurements:
        times = speed.measure_interleaved(variants, measurement, ops, speed_args, device)
        base, new = statistics.median(times["baseline"]), statistics.median(times["ours"])
        lines.append(f"{args.model} {measurement} ({speed_args.mixed_precision}, batch {speed_args.batch_size}): "
                     f"baseline {base * 1000:.1f} ms (min {min(times['baseline']) * 1000:.1f}), ours "
                     f"{new * 1000:.1f} ms (min {min(times['ours']) * 1000:.1f}), baseline / ours {base / new:.3f}")
        print(lines[-1], flush=True)
    return lines


if __name__ == "__main__":
    main()
