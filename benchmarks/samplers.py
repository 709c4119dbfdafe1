"""Quality against time of the samplers on the digits quickstart's checkpoint.

    python quickstart.py          # trains quickstart_output/results/000-EDT/checkpoints/0001300.pt
    python -m benchmarks.samplers --ckpt quickstart_output/results/000-EDT/checkpoints/0001300.pt

For each sampler and step count (default: DDPM 250 and 50, DDIM 25, DPM-Solver++ 10 and 20, its
SDE variant 10 and 20, UniPC 10) and each guidance scale (1 and 2), image_generator_ddp.py samples
--num-images class-balanced digits in this process, as the quickstart does, and is timed (wall
time of its main: model loading, sampling, PNGs and npz; after an untimed warm-up run). The quickstart's
judge (digits.evaluate) then gives each npz its accuracy and Frechet distance. Writes OUTPUT.md
(a table), OUTPUT.png (quality against steps) and OUTPUT.json. The samples go to a temporary
folder, removed at the end.
"""
import argparse
import glob
import json
import os
import tempfile
import time

import torch

import image_generator_ddp
from benchmarks.chart import Panel, save_chart
from digits.evaluate import evaluate
from runtime.cli import require_at_least
from runtime.io import atomic_path
from sampling.sampler import SAMPLERS

DEFAULT_SETTINGS = ("ddpm:250", "ddpm:50", "ddim:25", "dpm-solver++:10", "dpm-solver++:20",
                    "dpm-solver++-sde:10", "dpm-solver++-sde:20", "unipc:10")
DEFAULT_CFG_SCALES = (1.0, 2.0)
BASELINE = ("ddpm", 250)  # the paper's sampler: the time column is relative to it
BATCH_SIZE = 500  # the quickstart's per-process batch
# An untimed run per guidance scale first, so that no timed run pays the first call's set-up; a
# diffusers solver, whose first use imports diffusers.
WARM_UP = ("dpm-solver++", 2)
REAL = "real held-out"  # digits.evaluate's row of real digits


def parse_setting(text):
    """"dpm-solver++:20" -> ("dpm-solver++", 20); SystemExit with one line otherwise."""
    sampler, _, steps = text.rpartition(":")
    if sampler not in SAMPLERS or not steps.isdigit():
        raise SystemExit(f"error: --settings {text}: expected SAMPLER:STEPS with SAMPLER one of {', '.join(SAMPLERS)}")
    return sampler, int(steps)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ckpt", required=True, help="the quickstart's checkpoint")
    parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS), metavar="SAMPLER:STEPS")
    parser.add_argument("--cfg-scales", type=float, nargs="+", default=list(DEFAULT_CFG_SCALES))
    parser.add_argument("--num-images", type=int, default=1000, help="class-balanced samples per setting")
    parser.add_argument("--global-seed", type=int, default=0)
    parser.add_argument("--output", default="docs/samplers", help="writes OUTPUT.md, OUTPUT.png and OUTPUT.json")
    args = parser.parse_args(argv)
    args.settings = [parse_setting(text) for text in args.settings]
    require_at_least(args, 1, "num_images")
    if not os.path.isfile(args.ckpt):
        raise SystemExit(f"error: checkpoint not found: {args.ckpt}")
    return args


#################################################################################
#                              Sampling and judging                             #
#################################################################################

def sample_npz(args, sampler, steps, cfg_scale, folder):
    """Runs image_generator_ddp.py into `folder`; returns (npz path, wall seconds)."""
    start = time.perf_counter()
    image_generator_ddp.main(["--ckpt", args.ckpt, "--num-images", str(args.num_images), "--class-balanced",
                              "--cfg-scale", str(cfg_scale), "--sampler", sampler, "--num-sampling-steps", str(steps),
                              "--per-proc-batch-size", str(BATCH_SIZE), "--global-seed", str(args.global_seed),
                              "--output-dir", folder])
    seconds = time.perf_counter() - start
    (path,) = glob.glob(os.path.join(folder, "*", "samples_*.npz"))
    return path, seconds


def measure(args):
    """One row per (sampler, steps, cfg): accuracy, Frechet distance, seconds; and the real digits' row."""
    rows, paths = [], []
    with tempfile.TemporaryDirectory(prefix="edt-samplers-") as root:
        for cfg_scale in args.cfg_scales:
            sample_npz(args, *WARM_UP, cfg_scale, os.path.join(root, f"warm-up-{cfg_scale}"))
            for sampler, steps in args.settings:
                path, seconds = sample_npz(args, sampler, steps, cfg_scale, os.path.join(root, str(len(rows))))
                rows.append({"sampler": sampler, "steps": steps, "cfg_scale": cfg_scale, "seconds": seconds})
                paths.append(path)
        judged = evaluate(paths, [str(index) for index in range(len(rows))], split_seed=0)
    for index, row in enumerate(rows):
        row.update(accuracy=judged[str(index)]["accuracy"], frechet_distance=judged[str(index)]["frechet_distance"])
    return rows, judged[REAL]


def time_ratios(rows):
    """Each row's seconds over the baseline's at its guidance scale (None without a baseline row)."""
    baseline = {row["cfg_scale"]: row["seconds"] for row in rows if (row["sampler"], row["steps"]) == BASELINE}
    return [row["seconds"] / baseline[row["cfg_scale"]] if row["cfg_scale"] in baseline else None for row in rows]


#################################################################################
#                                    Reports                                    #
#################################################################################

def settings_line(args):
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{args.num_images} class-balanced images per row, seed {args.global_seed}, one process, "
            f"{torch.get_num_threads()} torch threads, load average {load:.2f} at the end; checkpoint {args.ckpt}")


def markdown(rows, real, args):
    lines = ["| sampler | steps | cfg | accuracy | Frechet distance | time (s) | time / DDPM-250 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row, ratio in zip(rows, time_ratios(rows)):
        lines.append(f"| {row['sampler']} | {row['steps']} | {row['cfg_scale']:g} | {100 * row['accuracy']:.1f}% | "
                     f"{row['frechet_distance']:.2f} | {row['seconds']:.1f} | "
                     f"{'' if ratio is None else f'{ratio:.2f}'} |")
    lines += ["", f"Real held-out digits: accuracy {100 * real['accuracy']:.1f}%, Frechet distance between two "
              f"halves {real['frechet_distance']:.2f}.", "", settings_line(args), ""]
    return "\n".join(lines)


def chart_panels(rows):
    panels = []
    for metric, label in (("accuracy", "accuracy (%)"), ("frechet_distance", "Frechet distance")):
        for cfg_scale in dict.fromkeys(row["cfg_scale"] for row in rows):
            series = {}
            for row in rows:
                if row["cfg_scale"] == cfg_scale:
                    value = 100 * row[metric] if metric == "accuracy" else row[metric]
                    series.setdefault(row["sampler"], []).append((row["steps"], value))
            panels.append(Panel(f"{label}, cfg {cfg_scale:g}", "sampling steps", label, series))
    return panels


def write_reports(rows, real, args):
    with atomic_path(f"{args.output}.json") as tmp, open(tmp, "w") as f:
        json.dump({"rows": rows, "real": real, "settings": settings_line(args)}, f, indent=2)
    with atomic_path(f"{args.output}.md") as tmp, open(tmp, "w") as f:
        f.write(markdown(rows, real, args))
    save_chart(f"{args.output}.png", chart_panels(rows), columns=len(args.cfg_scales))


def main(argv=None):
    args = parse_args(argv)
    rows, real = measure(args)
    write_reports(rows, real, args)
    print(markdown(rows, real, args))
    print(f"wrote {args.output}.md, {args.output}.png and {args.output}.json")
    return rows


if __name__ == "__main__":
    main()
