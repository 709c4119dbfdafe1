"""Training and inference speed of EDT, DiT and MDTv2, with and without the fast paths.

    python -m benchmarks.speed --model EDT-S/2 --batch-size 256 --device cuda
    python -m benchmarks.speed --model EDT-S/2 --compare DiT-S/2 --batch-size 8 --device cpu
    python -m benchmarks.speed --model EDT-S/2 --compare MDTv2-S/2 --batch-size 8 --device cpu
    python -m benchmarks.speed --model EDT-S/2 --compare-fast-paths --batch-size 8
    python -m benchmarks.speed --model DiT-S/2 --compare plain:DiT-S/2 --skip-training

Every measurement is warmed up, then repeated; the variants of one run are measured interleaved
(A, B, A, B, ...) so that a change in machine load hits them alike. Reported per measurement:
median seconds, spread (min, max) and the rate (iterations, steps or images per second).

Fast paths ("on", `model.set_fast_paths(True)`): SDPA attention outside AMM blocks (with EDT's
bias as a 4-D mask, so CPU inference takes the fused kernel), the explicit AMM attention in
place at inference, the blocks' Linears through oneDNN on packed weights with the GELU fused in
CPU inference, modulation and gated residuals as one multiply-add each, the full and masked
passes of a masked training step as one forward of 2B samples, and the foreach EMA. "off" is
the plain path, the reference implementation's operations one by one: explicit attention with a
new tensor per intermediate, ATen's Linear and GELU, two-pass modulation, two training passes,
and an EMA updated one parameter at a time.
"""
import argparse
import contextlib
import copy
import functools
import json
import os
import platform
import resource
import statistics
import sys
import time

import torch
from timm.optim import Adan
from torch.profiler import record_function

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402
from benchmarks.plain_dit import plain_dit_like  # noqa: E402
from diffusion import create_diffusion, create_named_schedule_sampler  # noqa: E402
from models.mdt import TRAINING_MASK_RATIO  # noqa: E402
from runtime.cli import require_at_least  # noqa: E402
from runtime.ema import EmaUpdate, create_ema  # noqa: E402
from runtime.io import atomic_path  # noqa: E402
from sampling.sampler import PRECISIONS, Sampler, guided_model_fn  # noqa: E402
from training.build import ADAN_BETAS, ADAN_EPS  # noqa: E402
from training.flat_adan import FlatAdan  # noqa: E402
from training.graphed_losses import TrainingLosses, graph_training_losses  # noqa: E402
from training.step import micro_batch_losses, per_sample_losses  # noqa: E402

PLAIN_PREFIX = "plain:"  # "plain:DiT-S/2" is the timm-style DiT of benchmarks/plain_dit.py
LATENT_CHANNELS = 4
NUM_CLASSES = 1000
LEARNING_RATE = 1e-4
EMA_DECAY = 0.9999
MEASUREMENTS = ("train_masked", "train_plain", "inference", "inference_cfg", "sampling")
# Profiler ranges around a training step's phases (benchmarks/gpu_profile.py reads them).
STEP_PHASE_PREFIX = "step: "
REPORTED_SETTINGS = ("batch_size", "latent_size", "device", "mixed_precision", "compile", "flat_adan", "threads",
                     "load_average")


#################################################################################
#                                  Arguments                                    #
#################################################################################

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="EDT-S/2", help="registry name, or plain:DiT-S/2")
    parser.add_argument("--compare", default=None, help="a second model measured in the same run")
    parser.add_argument("--compare-fast-paths", action="store_true",
                        help="measure --model with the fast paths on and off, interleaved")
    parser.add_argument("--fast-paths", choices=("on", "off"), default="on")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--latent-size", type=int, default=32, help="latent side (32 for 256px images)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mixed-precision", choices=tuple(PRECISIONS), default="no")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model's blocks")
    parser.add_argument("--flat-adan", action="store_true", help="train with training.flat_adan.FlatAdan")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--sampling-steps", type=int, default=250, help="DDPM steps of the sampling measurement")
    parser.add_argument("--sampling-repeats", type=int, default=1)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument("--skip-sampling", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file ('-': stdout)")
    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    for name in filter(None, (args.model, args.compare)):
        if name.removeprefix(PLAIN_PREFIX) not in (models.DiT_models if name.startswith(PLAIN_PREFIX)
                                                   else models.ALL_MODELS):
            raise SystemExit(f"error: unknown model {name!r}")
    if args.compare and args.compare_fast_paths:
        raise SystemExit("error: --compare and --compare-fast-paths are exclusive")
    require_at_least(args, 1, "batch_size", "latent_size", "repeats", "sampling_steps", "sampling_repeats")
    require_at_least(args, 0, "warmup")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available")


#################################################################################
#                                  Variants                                     #
#################################################################################

def per_parameter_ema(ema_model, model, decay):
    """The plain EMA: one parameter at a time (the baseline of the foreach update)."""
    with torch.no_grad():
        for ema_param, param in zip(ema_model.parameters(), model.parameters()):
            ema_param.mul_(decay).add_(param.detach(), alpha=1 - decay)
        for ema_buffer, buffer in zip(ema_model.buffers(), model.buffers()):
            ema_buffer.copy_(buffer)


class Variant:
    """One model in one configuration, with its own optimizer and EMA."""

    def __init__(self, label, name, model, fast, args, device):
        self.label, self.name, self.fast = label, name, fast
        self.masked = getattr(model, "masked_training_flag", None) is not None
        if hasattr(model, "set_fast_paths"):
            model.set_fast_paths(fast)
        self.model = model.to(device)
        self.ema = create_ema(self.model)
        if args.compile:
            compile_blocks(self.model)
        optimizer_type = FlatAdan if args.flat_adan else Adan
        self.optimizer = optimizer_type(self.model.parameters(), lr=LEARNING_RATE, betas=ADAN_BETAS, eps=ADAN_EPS,
                                        weight_decay=0.0)
        self.update_ema = (EmaUpdate(self.ema, self.model) if fast else
                           functools.partial(per_parameter_ema, self.ema, self.model))  # update_ema(decay)

    def describe(self):
        return {"model": self.name, "fast_paths": self.fast,
                "fast_attention_blocks": sum(uses_fast_attention(block.attn) for block in self.model.blocks),
                "parameters": models.count_trainable_parameters(self.model),
                "macs_per_sample": count_macs_or_none(self.model)}


def compile_blocks(model):
    """Regional compilation, of our models and of the plain DiT alike."""
    if isinstance(model, models.GuidedDiffusionModel):
        model.compile_blocks()
    else:
        for block in model.blocks:
            block.compile()


def uses_fast_attention(attention):
    """Ours says `fast`, timm's says `fused_attn` (SDPA)."""
    return bool(getattr(attention, "fast", getattr(attention, "fused_attn", False)))


def count_macs_or_none(model):
    return models.count_macs(model) if isinstance(model, models.GuidedDiffusionModel) else None


def build_model(name, latent_size, seed):
    torch.manual_seed(seed)
    if name.startswith(PLAIN_PREFIX):
        return plain_dit_like(name.removeprefix(PLAIN_PREFIX), latent_size)
    if name in models.MDT_models:  # trained masked, as MDT trains it
        return models.create_model(name, input_size=latent_size, mask_ratio=TRAINING_MASK_RATIO)
    return models.create_model(name, input_size=latent_size)


def build_variants(args, device):
    model = build_model(args.model, args.latent_size, args.seed)
    if args.compare_fast_paths:
        return [Variant("fast", args.model, model, True, args, device),
                Variant("plain", args.model, copy.deepcopy(model), False, args, device)]
    fast = args.fast_paths == "on"
    variants = [Variant(args.model, args.model, model, fast, args, device)]
    if args.compare:
        compared = build_model(args.compare, args.latent_size, args.seed)
        variants.append(Variant(args.compare, args.compare, compared, fast, args, device))
    return variants


#################################################################################
#                             Measured operations                               #
#################################################################################

def autocast(device, precision):
    dtype = PRECISIONS[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def make_inputs(batch, latent_size, device, generator):
    x = torch.randn(batch, LATENT_CHANNELS, latent_size, latent_size, generator=generator).to(device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=generator).to(device)
    t = torch.randint(0, 1000, (batch,), generator=generator).to(device)
    return x, y, t


def training_step_fn(variant, masked, x, y, args, device, cuda_graphs=False):
    """One step: forward and backward (masked: full plus masked loss), Adan, EMA update; with
    cuda_graphs the losses' forward and backward replay from CUDA graphs (training/graphed_losses.py)."""
    diffusion = create_diffusion(timestep_respacing="")
    schedule_sampler = create_named_schedule_sampler("uniform", diffusion)
    network = variant.model
    mask_flag = network.masked_training_flag if masked else None
    fused = masked and variant.fast and network.fuses_masked_batch
    if cuda_graphs:
        losses = TrainingLosses(network, diffusion, mask_flag, fused, args.mixed_precision).train()
        losses_of = graph_training_losses(losses, x.shape[1:], x.shape[0], device)
        precision = contextlib.nullcontext  # the graphs hold their casts
    else:
        losses_of = functools.partial(per_sample_losses, network, diffusion, mask_flag=mask_flag, fused=fused)
        precision = functools.partial(autocast, device, args.mixed_precision)

    def step():
        with record_function(STEP_PHASE_PREFIX + "forward"), precision():
            full, masked_loss = micro_batch_losses(losses_of, schedule_sampler, x, y)
        with record_function(STEP_PHASE_PREFIX + "backward"):
            (full + masked_loss).backward()
        with record_function(STEP_PHASE_PREFIX + "optimizer"):
            variant.optimizer.step()
            variant.optimizer.zero_grad(set_to_none=True)
        with record_function(STEP_PHASE_PREFIX + "EMA"):
            variant.update_ema(EMA_DECAY)
    return step


def inference_fn(variant, x, y, t, cfg, args, device):
    """One denoiser evaluation at batch B; with cfg, forward_with_cfg on 2B."""
    model = variant.model
    null = torch.full_like(y, NUM_CLASSES)
    x2, y2, t2 = torch.cat([x, x]), torch.cat([y, null]), torch.cat([t, t])  # (2B, ...)

    @torch.no_grad()
    def step():
        with autocast(device, args.mixed_precision):
            if cfg:
                model.forward_with_cfg(x2, t2, y2, args.cfg_scale)
            else:
                model(x, t, y)
    return step


def sampling_fn(variant, batch, args, device):
    """A whole DDPM sampling run (args.sampling_steps steps, guidance args.cfg_scale)."""
    model_fn = guided_model_fn(variant.model, args.cfg_scale, precision=args.mixed_precision)
    sample = Sampler("ddpm", args.sampling_steps).sample_fn(
        model_fn, (LATENT_CHANNELS, args.latent_size, args.latent_size), device)
    generators = [torch.Generator().manual_seed(index) for index in range(batch)]
    labels = torch.arange(batch) % NUM_CLASSES
    return lambda: sample(generators, labels)


def operations(variant, args, device):
    """{measurement: (callable, items per call, unit)} for this variant."""
    generator = torch.Generator().manual_seed(args.seed)
    x, y, t = make_inputs(args.batch_size, args.latent_size, device, generator)
    ops = {}
    if not args.skip_training:
        variant.model.train()
        if variant.masked:
            ops["train_masked"] = (training_step_fn(variant, True, x, y, args, device), 1, "it/s")
        ops["train_plain"] = (training_step_fn(variant, False, x, y, args, device), 1, "it/s")
    if not args.skip_inference:
        ops["inference"] = (inference_fn(variant, x, y, t, False, args, device), 1, "steps/s")
        ops["inference_cfg"] = (inference_fn(variant, x, y, t, True, args, device), 1, "steps/s")
    if not args.skip_sampling:
        ops["sampling"] = (sampling_fn(variant, args.batch_size, args, device), args.batch_size, "images/s")
    return ops


#################################################################################
#                                   Timing                                      #
#################################################################################

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def prepare_mode(variant, measurement):
    """Training steps run in train mode (label dropout, no AMM in EDT); the rest in eval mode."""
    variant.model.train(measurement.startswith("train"))


def measure_interleaved(variants, measurement, ops, args, device):
    """{label: [seconds per repeat]}, variants alternating within each repeat."""
    present = [v for v in variants if measurement in ops[v.label]]
    repeats = args.sampling_repeats if measurement == "sampling" else args.repeats
    warmup = min(args.warmup, 1) if measurement == "sampling" else args.warmup
    times = {v.label: [] for v in present}
    for variant in present:
        prepare_mode(variant, measurement)
        for _ in range(warmup):
            ops[variant.label][measurement][0]()
    for _ in range(repeats):
        for variant in present:
            prepare_mode(variant, measurement)
            times[variant.label].append(timed(ops[variant.label][measurement][0], device))
    return times


def summarize(seconds, items, unit):
    median = statistics.median(seconds)
    return {"median_s": median, "min_s": min(seconds), "max_s": max(seconds), "repeats": len(seconds),
            "rate": items / median, "unit": unit, "seconds": seconds}


def peak_memory_mb(device):
    """Peak allocated memory on CUDA; on CPU the process's peak resident set (all variants)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(args):
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = build_variants(args, device)
    ops = {variant.label: operations(variant, args, device) for variant in variants}
    results = {variant.label: {**variant.describe(), "measurements": {}} for variant in variants}
    for measurement in MEASUREMENTS:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = measure_interleaved(variants, measurement, ops, args, device)
        for label, seconds in times.items():
            _, items, unit = ops[label][measurement]
            summary = summarize(seconds, items, unit)
            summary["peak_memory_mb"] = peak_memory_mb(device)
            results[label]["measurements"][measurement] = summary
    return {"settings": settings(args, device), "variants": results, "ratios": ratios(variants, results)}


def ratios(variants, results):
    """Rate of the first variant over the second, per measurement both have."""
    if len(variants) < 2:
        return {}
    first, second = (results[v.label]["measurements"] for v in variants[:2])
    return {name: first[name]["rate"] / second[name]["rate"] for name in first if name in second}


def settings(args, device):
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {**vars(args), "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine(), "processor": platform.processor(), "load_average": load}


#################################################################################
#                                   Report                                      #
#################################################################################

def report_lines(result):
    shown = {key: result["settings"][key] for key in REPORTED_SETTINGS}
    lines = [f"settings: {json.dumps(shown)}"]
    for label, variant in result["variants"].items():
        macs = variant["macs_per_sample"]
        description = f"{label}: {variant['parameters'] / 1e6:.2f}M parameters"
        lines.append(f"{description}, {macs / 1e9:.3f} GMACs per sample" if macs else description)
        for name, m in variant["measurements"].items():
            lines.append(f"  {name:14s} {m['rate']:9.3f} {m['unit']:9s} median {m['median_s'] * 1e3:9.1f} ms "
                         f"[{m['min_s'] * 1e3:.1f}, {m['max_s'] * 1e3:.1f}] x{m['repeats']}, "
                         f"peak {m['peak_memory_mb']:.0f} MB")
    labels = list(result["variants"])
    for name, ratio in result["ratios"].items():
        lines.append(f"ratio {labels[0]} / {labels[1]} {name}: {ratio:.2f}x")
    return lines


def main(argv=None):
    args = parse_args(argv)
    result = run(args)
    print("\n".join(report_lines(result)))
    if args.json == "-":
        print(json.dumps(result, indent=2))
    elif args.json:
        with atomic_path(args.json) as path, open(path, "w") as file:
            json.dump(result, file, indent=2)
    return result


if __name__ == "__main__":
    main()
