"""EDT's speed claims on one GPU, in one command: EDT-S/B/XL against MDTv2-S/B/XL (inference and
the masked training step), EDT-S/2 against DiT-S/2 (inference), and EDT-S/2 against the released
code with the same weights, in fp32 and bf16, beside the paper's ratios and the MAC ratios.

    python -m benchmarks.gpu_protocol --out results/protocol
    python -m benchmarks.gpu_protocol --out results/protocol --release-code ~/EDT   # a checkout of the release
    python -m benchmarks.gpu_protocol --out /tmp/protocol --tiny --device cpu       # small models, a check

Inference is one forward at --inference-batch (256) in eval mode, the AMM on in EDT's default
blocks; the masked training step is one step at --training-batch (32): forward and backward of
the full-token and the masked loss (ours as one fused forward of 2B samples, MDTv2's and the
release's as two passes), Adan and the EMA update. Each pair is measured interleaved (A, B, A, B,
...) after warm-up; medians. fp32 is IEEE float32 matmuls (TF32 off), bf16 is autocast. A
training step's TFLOP/s counts 6 x MACs (forward and backward) of its passes, and is set against
the bf16 matmul rate measured in the same run. `--attention-kernel flex` (or `triton`) runs our
models' inference attention (checks included) through FlexAttention (or the one-pass Triton
kernel, models/triton_attention.py) instead of the kernels `choose_attention_kernel` takes by
default, to measure it against them: a second run of the same comparisons; `--flat-adan` trains every model of the training rows with
training.flat_adan.FlatAdan (one pass over flat buffers) instead of timm's Adan; `--cuda-graphs`
adds rows where our models' inference, and EDT's training losses (training/graphed_losses.py),
replay from CUDA graphs (MDTv2's masked pass changes shape every step: its step stays eager). Writes
OUT/protocol.md and OUT/protocol.json.
"""
import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models  # noqa: E402
from benchmarks import speed  # noqa: E402
from diffusion import create_diffusion  # noqa: E402
from models.attention_kernels import attention_kernel_at_inference  # noqa: E402
from models.mdt import MEAN_KEPT_FRACTION, TRAINING_MASK_RATIO  # noqa: E402
from runtime.cuda_graphs import CUDAGraphed  # noqa: E402
from runtime.io import atomic_path  # noqa: E402
from sampling.cli import ATTENTION_KERNELS, DEFAULT_KERNEL, inference_attention_kernel  # noqa: E402
from training.graphed_losses import TrainingLosses, graph_training_losses  # noqa: E402

RELEASE_PREFIX = "release:"
# The paper's speed ratios (EDT over the compared model), and the sizes measured.
PAPER_RATIOS = {("inference", "MDTv2-S/2"): 2.29, ("inference", "MDTv2-B/2"): 2.29,
                ("inference", "MDTv2-XL/2"): 2.22, ("train_masked", "MDTv2-S/2"): 3.93,
                ("train_masked", "MDTv2-B/2"): 2.84, ("train_masked", "MDTv2-XL/2"): 1.92,
                ("inference", "DiT-S/2"): 2.04}
SIZES = ("S", "B", "XL")
PRECISIONS = ("fp32", "tf32", "bf16")
MATMUL_SIDE = {"cuda": 8192, "cpu": 256}  # a CPU without bf16 instructions multiplies it at about 1 GFLOP/s
# The checks compare paths on two samples: Triton's interpreter and a CPU's bf16 backward are slow.
CHECK_BATCH = 2
# --tiny: custom models of EDT's 52-wide heads, small enough for two CPU cores.
TINY_LATENT = 16
TINY_MODELS = {
    "EDT-S/2": dict(name="EDT", dims=(104, 156, 208, 156, 104), num_heads=(2, 3, 4, 3, 2), depths=(1, 1, 1, 1, 1),
                    amm_blocks=(3,)),
    "MDTv2-S/2": dict(name="MDTv2", hidden_size=128, depth=4, num_heads=2, decode_layer=2,
                      mask_ratio=TRAINING_MASK_RATIO),
    "DiT-S/2": dict(name="DiT", hidden_size=128, depth=4, num_heads=2),
}


@dataclasses.dataclass(frozen=True)
class Comparison:
    measurement: str  # "inference" or "train_masked" (benchmarks/speed.py's)
    ours: str
    other: str  # a model name, or release:EDT-S/2
    # Replayed from CUDA graphs: inference of both our models; the training losses of ours only
    # (MDTv2's masked pass changes shape every step), so that row is what --cuda-graphs gives.
    cuda_graphs: bool = False

    @property
    def paper(self):
        return PAPER_RATIOS.get((self.measurement, self.other))


def comparisons(args):
    sizes = ("S",) if args.tiny else args.sizes
    pairs = [(f"EDT-{size}/2", f"MDTv2-{size}/2") for size in sizes] + [("EDT-S/2", "DiT-S/2")]
    found = []
    for ours, other in pairs:
        for measurement in args.measurements:
            if measurement == "train_masked" and other.startswith("DiT"):
                continue
            found.append(Comparison(measurement, ours, other))
            if args.cuda_graphs:
                found.append(Comparison(measurement, ours, other, cuda_graphs=True))
    if args.release_code:
        found += [Comparison(measurement, "EDT-S/2", f"{RELEASE_PREFIX}EDT-S/2") for measurement in args.measurements]
    return found


#################################################################################
#                                  Models                                       #
#################################################################################

def load_release_module(release_dir):
    """The release's models_edt.py, imported from its checkout."""
    path = os.path.join(release_dir, "models_edt.py")
    if not os.path.isfile(path):
        raise SystemExit(f"error: --release-code {release_dir} has no models_edt.py (a checkout of the EDT release)")
    spec = importlib.util.spec_from_file_location("release_models_edt", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_ours(name, args, device, registry=False):
    """Registry models at the latent size, or with --tiny their small stand-ins (unless registry)."""
    torch.manual_seed(args.seed)
    with torch.device(device):
        if args.tiny and not registry:
            config = dict(TINY_MODELS[name])
            model = models.create_model(config.pop("name"), input_size=TINY_LATENT, patch_size=2, **config)
        elif name in models.MDT_models:  # trained masked, as MDT trains it
            model = models.create_model(name, input_size=args.input_size, mask_ratio=TRAINING_MASK_RATIO)
        else:
            model = models.create_model(name, input_size=args.input_size)
    return model.to(device)


def build_release(name, ours, args, device):
    """The released model of that name with our model's weights (the same state dict layout)."""
    release = load_release_module(args.release_code).EDT_models[name](input_size=args.input_size)
    release.load_state_dict(ours.state_dict(), strict=True)
    release.masked_training_flag = "enable_down_mask"  # its training script's two masked passes
    release.fuses_masked_batch = False
    return release.to(device)


def build_pair(comparison, args, device):
    if comparison.other.startswith(RELEASE_PREFIX):  # the released architecture, also with --tiny
        ours = build_ours(comparison.ours, args, device, registry=True)
        return ours, build_release(comparison.other.removeprefix(RELEASE_PREFIX), ours, args, device)
    return build_ours(comparison.ours, args, device), build_ours(comparison.other, args, device)


#################################################################################
#                                  Measuring                                    #
#################################################################################

@contextlib.contextmanager
def matmul_precision(precision):
    """fp32: IEEE float32 matmuls; tf32: TF32 tensor cores; bf16: autocast (set by the step)."""
    fp32_mode = "tf32" if precision == "tf32" else "ieee"
    previous = torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = torch.backends.cudnn.conv.fp32_precision = fp32_mode
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = previous


def speed_settings(args, precision, compile_model):
    """benchmarks/speed.py's settings for its step and inference functions."""
    return argparse.Namespace(mixed_precision="bf16" if precision == "bf16" else "no", compile=compile_model,
                              flat_adan=args.flat_adan, cfg_scale=1.5, warmup=args.warmup, repeats=args.repeats,
                              sampling_repeats=1)


def counted_macs(model, ours, measurement):
    """MACs of one sample's measured forwards (the release's counted on our model of the same weights)."""
    counted = model if isinstance(model, models.GuidedDiffusionModel) else ours
    if measurement == "train_masked":
        return models.count_macs(counted) + models.count_masked_macs(counted, MEAN_KEPT_FRACTION)
    return models.count_macs(counted)


def measure_pair(comparison, precision, args, device):
    """Both models' summaries for one comparison in one precision, measured interleaved."""
    ours, other = build_pair(comparison, args, device)
    settings = speed_settings(args, precision, args.compile)
    other_settings = speed_settings(args, precision, args.compile and not comparison.other.startswith(RELEASE_PREFIX))
    variants = [speed.Variant(comparison.ours, comparison.ours, ours, True, settings, device),
                speed.Variant(comparison.other, comparison.other, other, True, other_settings, device)]
    training = comparison.measurement == "train_masked"
    batch = args.training_batch if training else args.inference_batch
    x, y, t = speed.make_inputs(batch, args.input_size, device, torch.Generator().manual_seed(args.seed))
    ops = {variant.label: {comparison.measurement: (
        speed.training_step_fn(variant, True, x, y, settings, device,
                               cuda_graphs=comparison.cuda_graphs and variant.label == comparison.ours) if training
        else graphed_inference_fn(variant.model, x, y, t, precision, device) if comparison.cuda_graphs
        else speed.inference_fn(variant, x, y, t, False, settings, device), batch, "samples/s")}
        for variant in variants}
    with matmul_precision(precision):
        first_calls = {}
        for variant in variants:  # with --compile, the compilation
            speed.prepare_mode(variant, comparison.measurement)
            first_calls[variant.label] = speed.timed(ops[variant.label][comparison.measurement][0], device)
        times = speed.measure_interleaved(variants, comparison.measurement, ops, settings, device)
    summaries = {}
    for variant in variants:
        summary = speed.summarize(times[variant.label], batch, "samples/s")
        summary["first_call_s"] = first_calls[variant.label]
        summary["macs_per_sample"] = counted_macs(variant.model, ours, comparison.measurement)
        passes = 3 if training else 1  # backward: twice the forward's matmuls
        summary["tflops"] = 2 * passes * summary["macs_per_sample"] * batch / summary["median_s"] / 1e12
        summaries[variant.label] = summary
    return summaries


def graphed_inference(model, precision, device):
    """model(x, t, y) under the precision's autocast, replayed from CUDA graphs."""
    def forward(x, t, y):
        with speed.autocast(device, "bf16" if precision == "bf16" else "no"):
            return model(x, t, y)
    return CUDAGraphed(forward)


def graphed_inference_fn(model, x, y, t, precision, device):
    graphed = graphed_inference(model, precision, device)
    return lambda: graphed(x, t, y)


def matmul_tflops(device, dtype=torch.bfloat16, repeats=10):
    """The device's dense matmul rate on random data: the median of `repeats` products."""
    side = MATMUL_SIDE.get(device.type, MATMUL_SIDE["cpu"])
    a, b = (torch.randn(side, side, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    seconds = statistics.median(speed.timed(lambda: a @ b, device) for _ in range(repeats))
    return 2 * side ** 3 / seconds / 1e12


#################################################################################
#                                   Checks                                      #
#################################################################################

def relative_error(actual, expected):
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def correctness_checks(args, device):
    """On this device: EDT-S/2's and MDTv2-S/2's kernel paths against the plain path in IEEE fp32
    (outputs at inference with the AMM, bias gradients in training), bf16 gradients finite, and
    the release's outputs for the same weights."""
    checks = {}
    x, y, t = speed.make_inputs(min(args.inference_batch, CHECK_BATCH), args.input_size, device,
                                torch.Generator().manual_seed(args.seed))
    with matmul_precision("fp32"):
        for name in ("EDT-S/2", "MDTv2-S/2"):
            model = build_ours(name, args, device, registry=True)
            with torch.no_grad():
                for param in model.parameters():  # adaLN-Zero would make every block the identity
                    param.normal_(std=0.02)
            checks[f"{name} kernels vs plain, inference"] = paths_agree(model, lambda m: inference(m, x, t, y))
            checks[f"{name} kernels vs plain, bias gradient"] = paths_agree(
                model, lambda m: bias_gradients(m, x, t, y))
            checks[f"{name} bf16 gradients finite"] = bf16_gradients_finite(model, x, t, y)
            if device.type == "cuda":
                checks[f"{name} CUDA graphs vs eager, bf16 inference, max abs difference"] = graph_difference(
                    model, x, t, y, device)
            if device.type == "cuda" and name == "EDT-S/2":
                checks["EDT-S/2 CUDA graphs vs eager, bf16 masked losses and gradients"] = graphed_training_difference(
                    model, x, y, device, args.seed)
            if name == "EDT-S/2" and args.release_code:
                release = build_release(name, model, args, device).eval()
                with torch.no_grad():
                    checks["EDT-S/2 ours vs release, inference"] = relative_error(inference(model, x, t, y),
                                                                                  release(x, t, y))
    return checks


def bf16_gradients_finite(model, x, t, y):
    model.train().zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        loss = model(x, t, y).float().square().mean()
    loss.backward()
    return all(torch.isfinite(p.grad).all().item() for p in model.parameters() if p.grad is not None)


def graph_difference(model, x, t, y, device):
    model.eval()
    graphed = graphed_inference(model, "bf16", device)
    with torch.no_grad(), speed.autocast(device, "bf16"):
        eager = model(x, t, y)
    replays = [graphed(x, t, y) for _ in range(2)]
    return max((replay.float() - eager.float()).abs().max().item() for replay in replays)


def graphed_training_difference(model, x, y, device, seed):
    """Largest relative difference of EDT's bf16 fused masked losses, and of its gradients
    (timesteps 0..999 across the batch), replayed from CUDA graphs against eager, both from the
    same random state."""
    model.train()
    diffusion = create_diffusion(timestep_respacing="")
    t = torch.linspace(0, diffusion.num_timesteps - 1, x.shape[0], device=device).long()

    def losses():
        return TrainingLosses(model, diffusion, model.masked_training_flag, True, "bf16").train()
    results = []
    for losses_of in (losses(), graph_training_losses(losses(), x.shape[1:], x.shape[0], device)):
        model.zero_grad(set_to_none=True)
        torch.cuda.manual_seed(seed)
        full, masked = losses_of(x, y, t)
        (full + masked).mean().backward()
        gradients = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((torch.cat([full, masked]), gradients))
    eager, graphed = results
    return max(relative_error(actual, expected) for actual, expected in zip(graphed, eager))


@torch.no_grad()
def inference(model, x, t, y):
    return model.eval()(x, t, y)


def bias_gradients(model, x, t, y):
    """The relative position tables' gradients of one training forward (no label drops)."""
    model.train().zero_grad(set_to_none=True)
    model.y_embedder.dropout_prob = 0.0
    model(x, t, y).square().mean().backward()
    return torch.cat([block.attn.rel_pos_bias.relative_position_bias_table.grad.flatten() for block in model.blocks])


def paths_agree(model, run):
    """Largest relative difference between what the kernel paths and the plain path compute."""
    model.set_fast_paths(True)
    fast = run(model)
    model.set_fast_paths(False)
    plain = run(model)
    model.set_fast_paths(True)
    return relative_error(fast, plain)


#################################################################################
#                                   Report                                      #
#################################################################################

def row_for(comparison, precision, summaries, matmul_rate):
    ours, other = summaries[comparison.ours], summaries[comparison.other]
    return {"measurement": comparison.measurement, "cuda_graphs": comparison.cuda_graphs,
            "precision": precision, "ours": comparison.ours,
            "other": comparison.other, "ours_ms": ours["median_s"] * 1e3, "other_ms": other["median_s"] * 1e3,
            "ratio": other["median_s"] / ours["median_s"], "paper": comparison.paper,
            "mac_ratio": other["macs_per_sample"] / ours["macs_per_sample"],
            "ours_tflops": ours["tflops"], "other_tflops": other["tflops"],
            "ours_matmul_fraction": ours["tflops"] / matmul_rate,
            "other_matmul_fraction": other["tflops"] / matmul_rate, "summaries": summaries}


MEASUREMENT_NAMES = {"inference": "inference", "train_masked": "masked training step"}
GRAPHED_NAMES = {"inference": ", CUDA graphs", "train_masked": ", EDT's losses from CUDA graphs"}


def measurement_name(row):
    return MEASUREMENT_NAMES[row["measurement"]] + (GRAPHED_NAMES[row["measurement"]] if row["cuda_graphs"] else "")


def markdown(result):
    settings = result["settings"]
    lines = [f"Device: {settings['device_name']}; torch {settings['torch']}; inference batch "
             f"{settings['inference_batch']}, training batch {settings['training_batch']}, latent "
             f"{settings['input_size']}; compile: {settings['compile']}; attention at inference: "
             f"{settings['attention_kernel']}; optimizer: {'FlatAdan' if settings['flat_adan'] else 'Adan'}; "
             f"bf16 matmul rate measured: {result['matmul_tflops']:.1f} TFLOP/s", "",
             "| measurement | precision | EDT | ms | compared with | ms | ratio | paper | MAC ratio | "
             "EDT TFLOP/s (of matmul rate) | other TFLOP/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        paper = f"{row['paper']:.2f}x" if row["paper"] else ""
        lines.append(f"| {measurement_name(row)} | {row['precision']} | {row['ours']} | "
                     f"{row['ours_ms']:.2f} | {row['other']} | {row['other_ms']:.2f} | {row['ratio']:.2f}x | {paper} | "
                     f"{row['mac_ratio']:.2f}x | {row['ours_tflops']:.3g} ({row['ours_matmul_fraction']:.0%}) | "
                     f"{row['other_tflops']:.3g} ({row['other_matmul_fraction']:.0%}) |")
    if len(result["rows"]) < result["planned_rows"]:
        lines += ["", f"Cut off after {len(result['rows'])} of {result['planned_rows']} rows."]
    lines += ["", "Checks on this device:"]
    lines += [f"- {name}: {value:.2e}" if isinstance(value, float) else f"- {name}: {value}"
              for name, value in result["checks"].items()]
    return "\n".join(lines) + "\n"


def write_report(result, text, out, stem):
    """OUT/<stem>.json (the result) and OUT/<stem>.md (its table), each written whole or not at all."""
    os.makedirs(out, exist_ok=True)
    with atomic_path(os.path.join(out, f"{stem}.json")) as path, open(path, "w") as file:
        json.dump(result, file, indent=2)
    with atomic_path(os.path.join(out, f"{stem}.md")) as path, open(path, "w") as file:
        file.write(text)


#################################################################################
#                                    Main                                       #
#################################################################################

def add_device_arguments(parser):
    """The device, the --tiny check and the batches, shared with benchmarks/gpu_profile.py."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="small stand-in models and batches (a check, e.g. on CPU)")
    parser.add_argument("--inference-batch", type=int, default=None, help="default 256 (tiny: 8)")
    parser.add_argument("--training-batch", type=int, default=None, help="default 32 (tiny: 4)")
    parser.add_argument("--latent-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)


def check_device_arguments(args):
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available")
    args.inference_batch = args.inference_batch or (8 if args.tiny else 256)
    args.training_batch = args.training_batch or (4 if args.tiny else 32)
    args.input_size = TINY_LATENT if args.tiny else args.latent_size


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for protocol.md and protocol.json")
    parser.add_argument("--release-code", default=None, help="a checkout of the EDT release (its models_edt.py)")
    add_device_arguments(parser)
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=["fp32", "bf16"])
    parser.add_argument("--sizes", nargs="+", choices=SIZES, default=list(SIZES))
    parser.add_argument("--measurements", nargs="+", choices=tuple(MEASUREMENT_NAMES), default=list(MEASUREMENT_NAMES))
    parser.add_argument("--compile", action="store_true", help="compile our models' blocks (not the release's)")
    parser.add_argument("--flat-adan", action="store_true",
                        help="every training step with training.flat_adan.FlatAdan instead of timm's Adan")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="also our models' inference, and EDT's training losses, replayed from CUDA graphs (CUDA only)")
    parser.add_argument("--attention-kernel", choices=ATTENTION_KERNELS, default=DEFAULT_KERNEL,
                        help="flex or triton: our models' inference attention through FlexAttention or the "
                             "one-pass Triton kernel (training unchanged)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    check_device_arguments(args)
    if args.cuda_graphs and not args.device.startswith("cuda"):
        raise SystemExit("error: --cuda-graphs needs --device cuda")
    if args.release_code and not os.path.isfile(os.path.join(args.release_code, "models_edt.py")):
        raise SystemExit(f"error: --release-code {args.release_code} has no models_edt.py (a checkout of the EDT release)")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    started = time.perf_counter()
    planned = comparisons(args)
    result = {"settings": settings_record(args, device), "matmul_tflops": matmul_tflops(device), "rows": [],
              "planned_rows": len(planned) * len(args.precisions)}
    with attention_kernel_at_inference(inference_attention_kernel(args, device.type)):
        result["checks"] = correctness_checks(args, device)
        for comparison in planned:
            for precision in args.precisions:
                summaries = measure_pair(comparison, precision, args, device)
                result["rows"].append(row_for(comparison, precision, summaries, result["matmul_tflops"]))
                print(markdown_row_line(result["rows"][-1]), flush=True)
                result["seconds"] = time.perf_counter() - started
                # After every row, so that a run stopped by a time limit keeps what it measured.
                write_report(result, markdown(result), args.out, "protocol")
            release_memory(device)
    result["seconds"] = time.perf_counter() - started
    write_report(result, markdown(result), args.out, "protocol")
    print(markdown(result))
    print(f"protocol: {result['seconds']:.0f} s; written to {args.out}/protocol.md and protocol.json")
    return result


def markdown_row_line(row):
    return (f"{measurement_name(row)}, {row['precision']}: {row['ours']} {row['ours_ms']:.2f} ms, "
            f"{row['other']} {row['other_ms']:.2f} ms, ratio {row['ratio']:.2f}x")


def settings_record(args, device):
    """The run's arguments with the device, torch and machine it ran on."""
    return {**vars(args), "device_name": device_name(device), "torch": torch.__version__, "machine": platform.machine()}


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def release_memory(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
