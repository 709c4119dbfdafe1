"""What one inference forward and one masked training step ask of a GPU, counted without one: the
bytes their kernels move, their FLOPs and launches, and the floor these set on their time at a
GPU's memory bandwidth and matmul rate.

    python -m benchmarks.gpu_floor --out results/floor --measured docs/h200/protocol.json
    python -m benchmarks.gpu_floor --out /tmp/floor --models EDT-S/2 --batch 2 --training-batch 2 --latent-size 16

The forward dispatches as on CUDA, through fake CUDA tensors (benchmarks/launch_count.py), in
float32 or under CUDA's autocast; the training step (gpu_protocol's: the full and the masked loss,
backward, Adan, EMA) on fake CPU tensors, so under the CPU's autocast (fewer operands cast than on
CUDA) and with the attention of a bias that needs its gradient on the explicit path (on CUDA a
fused kernel: the attention's bytes are overstated). Each kernel-running operator moves its
operands and results once (what a broadcast operand addresses, once; a fused attention reads q,
k, v and its mask and writes its output; an in-place operator writes what it mutates) and takes
max(bytes / bandwidth, FLOPs / matmul rate): a floor no kernel beats, ideal caches included. The
float32 rate applies to float32 matmuls (TF32 off), the matmul rate to the others. `--measured`
reads a gpu_protocol.json measured on a GPU: its fastest time per measurement, model and
precision (eager or CUDA graphs) goes beside the floor, and its measured bf16 matmul
rate replaces --matmul-tflops. Writes OUT/floor.md and OUT/floor.json.
"""
import argparse
import collections
import contextlib
import json
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import gpu_profile, gpu_protocol, launch_count  # noqa: E402

DEFAULT_MODELS = ("EDT-S/2", "MDTv2-S/2", "EDT-B/2", "MDTv2-B/2", "EDT-XL/2", "MDTv2-XL/2")
MEASUREMENTS = ("inference", "train_masked")  # gpu_protocol's names
AUTOCAST_NAMES = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}  # the protocol's names -> speed.py's
# One H200: HBM3e bandwidth and dense float32 (non-tensor-core) rate from NVIDIA's data sheet, the
# bf16 matmul rate measured by gpu_protocol on 2026-12-04 (docs/h200/protocol.json).
H200_BANDWIDTH_TBS = 4.8
H200_FLOAT32_TFLOPS = 67.0
H200_MATMUL_TFLOPS = 747.0


def addressed_bytes(tensor):
    """Bytes a kernel addresses in tensor: a broadcast (stride 0) dimension counts once."""
    elements = 1
    for size, stride in zip(tensor.shape, tensor.stride()):
        elements *= size if stride else 1
    return elements * tensor.element_size()


def distinct_tensors(tree):
    tensors = {id(leaf): leaf for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor)}
    return tensors.values()


def mutated_arguments(func, args):
    """The positional arguments func writes in place: what in-place multi-tensor operators, which
    return nothing, write."""
    return [value for argument, value in zip(func._schema.arguments, args)
            if argument.alias_info is not None and argument.alias_info.is_write]


def attention_flops(q, k):
    """q k^T and probabilities @ v over (B, heads, T_q, D) and (B, heads, T_k, D)."""
    return 4 * q.shape[:-1].numel() * k.shape[-2] * q.shape[-1]


class TrafficCounter(TorchDispatchMode):
    """Per kernel-running operator: (name, bytes moved, FLOPs, output dtype), a fused attention
    call as one whatever the path it takes without a GPU."""

    def __init__(self):
        super().__init__()
        self.operators = []
        self.inside_attention = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if self.inside_attention or name in launch_count.NO_KERNEL or func.namespace == "prim":
            return out
        read = distinct_tensors((args, {key: value for key, value in kwargs.items() if key != "out"}))
        written = distinct_tensors((out, mutated_arguments(func, args)))
        flops = flop_registry[func.overloadpacket](*args, **kwargs, out_val=out) \
            if func.overloadpacket in flop_registry else 0
        self.record(name, sum(map(addressed_bytes, read)) + sum(map(addressed_bytes, written)), flops,
                    next(iter(written)).dtype if written else None)
        return out

    def record(self, name, moved, flops, dtype):
        self.operators.append((name, moved, flops, dtype))

    def fused_attention(self, attention, args, kwargs):
        out = launch_count.run_hidden(self, attention, args, kwargs)
        q, k, v = args[:3]
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        operands = [q, k, v, out] + ([mask] if mask is not None else [])
        self.record("scaled_dot_product_attention", sum(map(addressed_bytes, operands)), attention_flops(q, k),
                    out.dtype)
        return out


@contextlib.contextmanager
def counting_traffic():
    counter = TrafficCounter()
    with launch_count.FusedAttentionAsOne(counter), counter:
        yield counter


#################################################################################
#                                   The floor                                   #
#################################################################################

def operator_floor_seconds(moved, flops, dtype, rates):
    matmul_rate = rates["float32_flops"] if dtype == torch.float32 else rates["matmul_flops"]
    return max(moved / rates["bandwidth"], flops / matmul_rate)


def summarize(model, precision, batch, operators, rates):
    by_category = collections.defaultdict(lambda: dict(gigabytes=0.0, floor_ms=0.0))
    for name, moved, flops, dtype in operators:
        category = gpu_profile.category_of(f"aten::{name}")
        by_category[category]["gigabytes"] += moved / 1e9
        by_category[category]["floor_ms"] += operator_floor_seconds(moved, flops, dtype, rates) * 1e3
    floor_ms = sum(entry["floor_ms"] for entry in by_category.values())
    return dict(model=model, precision=precision, batch=batch, launches=len(operators),
                gigabytes=sum(moved for _, moved, _, _ in operators) / 1e9,
                gflops=sum(flops for _, _, flops, _ in operators) / 1e9, floor_ms=floor_ms,
                by_category=dict(sorted(by_category.items(), key=lambda item: -item[1]["floor_ms"])))


def fastest_measured_ms(protocol, measurement, model, precision):
    """The protocol's fastest median for this measurement of the model in this precision, or None."""
    times = [row["summaries"][model]["median_s"] * 1e3 for row in protocol["rows"]
             if row["measurement"] == measurement and row["precision"] == precision and model in row["summaries"]]
    return min(times, default=None)


def counted_operators(measurement, model, precision, args):
    if measurement == "inference":
        counter = launch_count.fake_cuda_inference(model, AUTOCAST_NAMES[precision], args.batch, args.latent_size,
                                                   counting_traffic)
    else:
        counter = launch_count.fake_training_step(model, AUTOCAST_NAMES[precision], args.training_batch,
                                                  args.latent_size, counting_traffic)
    return counter.operators


def measure(args, rates, protocol):
    rows = []
    for measurement in args.measurements:
        batch = args.batch if measurement == "inference" else args.training_batch
        for precision in args.precisions:
            for model in args.models:
                operators = counted_operators(measurement, model, precision, args)
                row = dict(measurement=measurement, **summarize(model, precision, batch, operators, rates))
                row["measured_ms"] = fastest_measured_ms(protocol, measurement, model, precision) if protocol else None
                row["matmul_rate_at_floor"] = row["gflops"] * 1e9 / (row["floor_ms"] * 1e-3) / rates["matmul_flops"]
                rows.append(row)
                print(markdown_row(row), flush=True)
    return rows


#################################################################################
#                                    Report                                     #
#################################################################################

TABLE_HEADER = ("| measurement | model | precision | launches | GB moved | GFLOP | floor ms | matmul rate at the "
                "floor | measured ms | floor / measured | floor by category (ms) |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|")


def markdown_row(row):
    measured = row["measured_ms"]
    measured_cells = "| |" if measured is None else f"{measured:.1f} | {row['floor_ms'] / measured:.0%} |"
    categories = ", ".join(f"{name} {entry['floor_ms']:.2f}" for name, entry in row["by_category"].items()
                           if entry["floor_ms"] >= 0.005)
    return (f"| {row['measurement']} | {row['model']} | {row['precision']} | {row['launches']} | "
            f"{row['gigabytes']:.2f} | {row['gflops']:.0f} | {row['floor_ms']:.2f} | "
            f"{row['matmul_rate_at_floor']:.0%} | {measured_cells} {categories} |")


def ratio_lines(rows):
    """EDT over MDTv2 for each measurement, size and precision: the floors' ratio, and the measured one."""
    found = {(row["measurement"], row["model"], row["precision"]): row for row in rows}
    lines = []
    for (measurement, model, precision), ours in found.items():
        other = found.get((measurement, model.replace("EDT-", "MDTv2-"), precision))
        if not model.startswith("EDT-") or other is None:
            continue
        line = (f"- {measurement}, {model} against {other['model']}, {precision}: "
                f"floors {other['floor_ms'] / ours['floor_ms']:.2f}x")
        if ours["measured_ms"] and other["measured_ms"]:
            line += f", measured {other['measured_ms'] / ours['measured_ms']:.2f}x"
        lines.append(line)
    return lines


def markdown(result):
    settings, rates = result["settings"], result["rates"]
    lines = [f"Inference forward at batch {settings['batch']}, dispatched as on CUDA; masked training step at batch "
             f"{settings['training_batch']}, dispatched on the CPU; latent {settings['latent_size']}; floor at "
             f"{rates['bandwidth'] / 1e12:.1f} TB/s, {rates['matmul_flops'] / 1e12:.0f} TFLOP/s matmuls, "
             f"{rates['float32_flops'] / 1e12:.0f} TFLOP/s float32 (torch {torch.__version__})",
             "", TABLE_HEADER, *(markdown_row(row) for row in result["rows"]), "", *ratio_lines(result["rows"])]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for floor.md and floor.json")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--precisions", nargs="+", choices=tuple(AUTOCAST_NAMES), default=["fp32", "bf16"])
    parser.add_argument("--measurements", nargs="+", choices=MEASUREMENTS, default=list(MEASUREMENTS))
    parser.add_argument("--batch", type=int, default=256, help="inference batch")
    parser.add_argument("--training-batch", type=int, default=32)
    parser.add_argument("--latent-size", type=int, default=32)
    parser.add_argument("--bandwidth-tbs", type=float, default=H200_BANDWIDTH_TBS, help="memory bandwidth, TB/s")
    parser.add_argument("--matmul-tflops", type=float, default=H200_MATMUL_TFLOPS,
                        help="half-precision matmul rate, TFLOP/s (--measured's, where given)")
    parser.add_argument("--float32-tflops", type=float, default=H200_FLOAT32_TFLOPS,
                        help="float32 matmul rate without TF32, TFLOP/s")
    parser.add_argument("--measured", default=None, help="a protocol.json of benchmarks/gpu_protocol.py")
    return parser.parse_args(argv)


def read_protocol(path):
    try:
        with open(path) as file:
            return json.load(file)
    except (OSError, ValueError) as error:
        raise SystemExit(f"--measured: cannot read a protocol.json at {path}: {error}")


def main(argv=None):
    args = parse_args(argv)
    protocol = read_protocol(args.measured) if args.measured else None
    matmul_tflops = protocol["matmul_tflops"] if protocol else args.matmul_tflops
    rates = dict(bandwidth=args.bandwidth_tbs * 1e12, matmul_flops=matmul_tflops * 1e12,
                 float32_flops=args.float32_tflops * 1e12)
    print(TABLE_HEADER, flush=True)
    result = {"settings": dict(batch=args.batch, training_batch=args.training_batch, latent_size=args.latent_size,
                               measured=args.measured),
              "rates": rates, "rows": measure(args, rates, protocol)}
    result["ratios"] = ratio_lines(result["rows"])
    print("\n".join(result["ratios"]), flush=True)
    gpu_protocol.write_report(result, markdown(result), args.out, "floor")
    return result


if __name__ == "__main__":
    main()
