"""The whole EDT pipeline in about five minutes on two CPU cores, offline, on the digits set that
scikit-learn ships (1,797 8x8 images of 10 classes).

    python quickstart.py                       # everything goes to ./quickstart_output/
    python quickstart.py --train-steps 3000    # train longer
    python path/to/quickstart.py               # from any folder; outputs go to ./quickstart_output/

It prints each real command as it runs it: feature extraction on two processes, masked training
with Adan and EMA, a class grid with and without AMM, 1,000 class-balanced samples per guidance
scale (DPM-Solver++ SDE, 20 steps) into ADM-style npz files on two processes, and a digits
evaluation (classifier accuracy and Frechet distance) saved as JSON. On CUDA it starts at most
one process per GPU.
"""
import argparse
import glob
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import time

import torch

from digits.dataset import NUM_DIGIT_CLASSES, digits_as_uint8, write_image_folder
from runtime.cli import require_at_least
from sampling.sampler import SAMPLERS

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
MARKER = ".edt-quickstart"  # marks a folder this script made, so a re-run may clear it
DIGIT_SIZE = 8
CFG_SCALES = (1.0, 2.0)
GRID_SAMPLES_PER_CLASS = 10
GRID_ZOOM = 6  # 8x8 digits are too small to look at
AMM_BLOCKS = ("3", "4")  # the up-sampling stages' blocks, on 4x4 and 8x8 token grids
MAX_SAMPLING_BATCH = 500  # per process: the default 1,000 samples on two processes in one batch each


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="quickstart_output")
    parser.add_argument("--train-steps", type=int, default=1300)
    parser.add_argument("--lr", type=float, default=6e-3, help="Adan learning rate, constant")
    parser.add_argument("--width", type=int, default=64, help="channels of every EDT stage")
    parser.add_argument("--blocks-per-stage", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-images", type=int, default=1000, help="samples per guidance scale")
    # As accurate here as DDPM in 250 steps at a tenth of the time (docs/samplers.md); the time
    # saved went to training.
    parser.add_argument("--sampler", choices=SAMPLERS, default="dpm-solver++-sde")
    parser.add_argument("--sampling-steps", type=int, default=20)
    parser.add_argument("--processes", type=int, default=2,
                        help="for extraction and sampling; on CUDA at most one per GPU")
    args = parser.parse_args(argv)
    if args.num_images % NUM_DIGIT_CLASSES:
        raise SystemExit(f"error: --num-images must be a multiple of {NUM_DIGIT_CLASSES} (class-balanced)")
    require_at_least(args, 1, "train_steps", "width", "blocks_per_stage", "batch_size", "sampling_steps", "processes")
    args.processes = processes_for_devices(args.processes, torch.cuda.is_available(), torch.cuda.device_count())
    return args


def process_count(processes):
    return "one process" if processes == 1 else f"{processes} processes"


def processes_for_devices(requested, cuda, gpu_count):
    """At most one process per GPU on CUDA (each takes cuda:LOCAL_RANK); any number on the CPU."""
    if not cuda or requested <= gpu_count:
        return requested
    print(f"note: {gpu_count} GPU(s) here, so {gpu_count} process(es) instead of {requested}", flush=True)
    return gpu_count


#################################################################################
#                               Running the steps                               #
#################################################################################

def repo_script(name):
    """A script of this repository, as a path from the working directory (where the outputs go)."""
    return os.path.relpath(os.path.join(REPO_ROOT, name))


def repo_environment():
    """The environment with the repository importable, so that `python -m digits.evaluate`
    works from any working directory."""
    paths = [REPO_ROOT, os.environ.get("PYTHONPATH")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in paths if path)}


def python_command(*args):
    return [sys.executable, *args]


def distributed_command(processes, *args):
    return python_command("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *args)


def run(command, title):
    shown = ["python" if part == sys.executable else part for part in command]
    if os.path.abspath(os.getcwd()) != REPO_ROOT:
        shown.insert(0, f"PYTHONPATH={repo_script('.')}")
    print(f"\n== {title}\n$ {shlex.join(shown)}", flush=True)
    if subprocess.run(command, env=repo_environment()).returncode:
        raise SystemExit(f"error: the step '{title}' failed (command above)")


def prepare_output_dir(path):
    """An empty folder for this run; only a folder this script made may be cleared."""
    if os.path.exists(path) and os.listdir(path):
        if not os.path.exists(os.path.join(path, MARKER)):
            raise SystemExit(f"error: {path} exists and was not made by the quickstart; choose another --output-dir")
        shutil.rmtree(path)
    os.makedirs(path, exist_ok=True)
    open(os.path.join(path, MARKER), "w").close()


def only_match(pattern):
    matches = sorted(glob.glob(pattern))
    if len(matches) != 1:
        raise SystemExit(f"error: expected one file matching {pattern}, found {len(matches)}")
    return matches[0]


#################################################################################
#                                The pipeline                                   #
#################################################################################

def write_digits(out):
    print("\n== 1. the digits as an ImageFolder (class folders of PNGs), 20 % held out", flush=True)
    (train_images, train_labels), (held_out_images, held_out_labels) = digits_as_uint8()
    train_dir = write_image_folder(train_images, train_labels, os.path.join(out, "digits", "train"))
    write_image_folder(held_out_images, held_out_labels, os.path.join(out, "digits", "held_out"))
    print(f"{len(train_images)} training and {len(held_out_images)} held-out images under {out}/digits")
    return train_dir


def extract(args, train_dir, features):
    run(distributed_command(args.processes, repo_script("extract_features.py"), "--data-path", train_dir,
                            "--features-path", features, "--image-size", str(DIGIT_SIZE), "--vae", "none",
                            "--shard-size", "256", "--num-workers", "0"),
        f"2. pixel features (no VAE at 8x8), {process_count(args.processes)}")


def train(args, features, results):
    widths = [str(args.width)] * 5
    run(python_command(repo_script("train_mask_adan.py"), "--feature-path", features, "--results-dir", results,
                       "--model", "EDT", "--dims", *widths, "--num-heads", *["2"] * 5,
                       "--depths", *[str(args.blocks_per_stage)] * 5, "--patch-size", "1",
                       "--amm-blocks", *AMM_BLOCKS, "--no-flip", "--fused-mask-batch",
                       "--global-batch-size", str(args.batch_size), "--max-steps", str(args.train_steps),
                       "--init-lr", str(args.lr), "--final-lr", str(args.lr), "--ema-decay", "0.999", "--ema-warmup",
                       "--num-workers", "0", "--log-every", "200", "--ckpt-every", str(args.train_steps)),
        f"3. masked training of a small EDT with Adan and EMA, {args.train_steps} steps")
    return only_match(os.path.join(results, "*", "checkpoints", f"{args.train_steps:07d}.pt"))


def grid(args, checkpoint, grids):
    run(python_command(repo_script("image_generator.py"), "--ckpt", checkpoint,
                       "--class-labels", *map(str, range(NUM_DIGIT_CLASSES)),
                       "--samples-per-class", str(GRID_SAMPLES_PER_CLASS), "--cfg-scale", str(CFG_SCALES[-1]),
                       "--sampler", args.sampler, "--num-sampling-steps", str(args.sampling_steps),
                       "--compare-amm", "--amm",
                       "--batch-size", "100", "--zoom", str(GRID_ZOOM), "--output-dir", grids),
        "4. a grid, one row per digit, with and without AMM from the same noise")


def sampling_batch_size(num_images, processes):
    """One batch per process where it fits: image_generator_ddp.py fills a short batch up to the
    full size (equal rows on any number of processes), which for fewer images is wasted work."""
    return min(MAX_SAMPLING_BATCH, math.ceil(num_images / processes))


def sample(args, checkpoint, samples):
    """Every guidance scale in one launch; the npz of each, in CFG_SCALES order."""
    scales = " and ".join(f"{scale:g}" for scale in CFG_SCALES)
    run(distributed_command(args.processes, repo_script("image_generator_ddp.py"), "--ckpt", checkpoint,
                            "--num-images", str(args.num_images), "--class-balanced",
                            "--cfg-scale", *map(str, CFG_SCALES), "--sampler", args.sampler,
                            "--num-sampling-steps", str(args.sampling_steps),
                            "--per-proc-batch-size", str(sampling_batch_size(args.num_images, args.processes)),
                            "--output-dir", samples),
        f"5. {args.num_images} class-balanced samples at cfg {scales}, each into an npz, "
        f"{process_count(args.processes)}")
    return [only_match(os.path.join(samples, f"*-cfg-{scale}-*", "samples_*.npz")) for scale in CFG_SCALES]


def evaluate(npz_files, metrics):
    run(python_command("-m", "digits.evaluate", *npz_files, "--names", *[f"samples cfg {s}" for s in CFG_SCALES],
                       "--output-json", metrics),
        "6. digits evaluation: a classifier trained on real digits judges the samples")
    with open(metrics) as f:
        return json.load(f)


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    out = args.output_dir
    prepare_output_dir(out)
    train_dir = write_digits(out)
    features = os.path.join(out, "features")
    extract(args, train_dir, features)
    checkpoint = train(args, features, os.path.join(out, "results"))
    grid(args, checkpoint, os.path.join(out, "grids"))
    npz_files = sample(args, checkpoint, os.path.join(out, "samples"))
    results = evaluate(npz_files, os.path.join(out, "digits_metrics.json"))
    print(f"\nDone in {time.time() - start:.0f} s; everything is under {out}/ "
          f"(grids/*.png, samples/*/samples_*.npz, digits_metrics.json)")
    return results


if __name__ == "__main__":
    main()
