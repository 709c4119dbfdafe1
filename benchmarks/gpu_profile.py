"""Where the time of the protocol's measurements goes: a torch.profiler breakdown of EDT against
MDTv2, per kernel category, per model part and step phase, with the device's busy fraction.

    python -m benchmarks.gpu_profile --out results/profile                      # one GPU, bf16
    python -m benchmarks.gpu_profile --out /tmp/profile --tiny --device cpu     # small models, a check

Cases (benchmarks/gpu_protocol.py's models, inputs and steps): EDT-S/2 and MDTv2-S/2 inference at
--inference-batch (256), their masked training steps at --training-batch (32), and those of
EDT-XL/2 and MDTv2-XL/2. Each case is warmed up, timed without the profiler (wall ms), then
profiled for --steps iterations. Reported per iteration: kernel launches and kernel time (on CPU:
ATen operator calls and their own time), the busy fraction (kernel time over wall time: well
below 1 means the host's launches, not the device, set the pace), kernel time by category
(matmul, attention, normalisation, elementwise, layout and copies, reductions, optimizer), by
part (forward of each model part, backward, optimizer, EMA) and the top kernels. Writes
OUT/profile.md, OUT/profile.json, OUT/tables/<case>.txt (torch's operator table) and
OUT/traces/<case>.json.gz (Chrome traces, for chrome://tracing or Perfetto).
"""
import argparse
import collections
import contextlib
import dataclasses
import os
import re
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import gpu_protocol, speed  # noqa: E402
from runtime.io import atomic_path  # noqa: E402

PART_PREFIX = "part: "
TOP_KERNELS = 12
TABLE_ROWS = 40
# Kernel (or CPU operator) names to categories, the first match wins.
CATEGORIES = (
    ("attention", r"flash|fmha|attention|softmax"),
    ("optimizer", r"foreach|multi_tensor|lerp"),
    ("matmul", r"gemm|cutlass|cublas|nvjet|xmma|wgmma|aten::(mm|addmm|bmm|linear|matmul|_linear_pointwise|baddbmm)"),
    ("normalisation", r"layer_?norm|LayerNorm"),
    ("layout and copies", r"copy|cpy|memset|cat|transpose|permute|contiguous|index|gather|scatter|clone|_to_copy|reshape|fill"),
    ("reduction", r"reduce|sum|mean|norm"),
    ("elementwise", r"elementwise|vectorized|unrolled|add|mul|gelu|silu|exp|div|sub|where|rand|neg|sqrt|pow|tanh"),
)


@dataclasses.dataclass(frozen=True)
class Case:
    model: str
    measurement: str  # "inference" or "train_masked"

    @property
    def label(self):
        return f"{self.model} {gpu_protocol.MEASUREMENT_NAMES[self.measurement]}"

    @property
    def file_stem(self):
        return re.sub(r"[^A-Za-z0-9]+", "_", self.label).strip("_")


def cases(args):
    sizes = ("S",) if args.tiny else args.sizes
    found = []
    for measurement in args.measurements:
        for size in sizes:
            if measurement == "inference" and size != "S":
                continue  # at B and XL inference is matmul-bound (see the protocol's TFLOP/s)
            found += [Case(f"EDT-{size}/2", measurement), Case(f"MDTv2-{size}/2", measurement)]
    return found


#################################################################################
#                                 Attribution                                   #
#################################################################################

def category_of(name):
    for category, pattern in CATEGORIES:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return category
    return "other"


def part_of(event):
    """The innermost label around a CPU operator: a model part, a step phase or the backward."""
    parent = event
    while parent is not None:
        if parent.name.startswith(PART_PREFIX):
            return "forward: " + parent.name.removeprefix(PART_PREFIX)
        if parent.name.startswith(speed.STEP_PHASE_PREFIX):
            phase = parent.name.removeprefix(speed.STEP_PHASE_PREFIX)
            return "forward: rest" if phase == "forward" else phase
        if parent.name.startswith("autograd::engine"):
            return "backward"
        parent = parent.cpu_parent
    return "forward: rest"


def kernel_records(events, device):
    """[(kernel name, microseconds, part)]: on CUDA every kernel a CPU operator launched, on CPU
    every ATen operator with its own time (children excluded)."""
    records = []
    for event in events:
        if device.type == "cuda":
            records += [(kernel.name, kernel.duration, part_of(event)) for kernel in event.kernels]
        elif event.name.startswith("aten::") and event.self_cpu_time_total > 0:
            records.append((event.name, event.self_cpu_time_total, part_of(event)))
    return records


def model_parts(model):
    """[(label, module)] of the model's top-level parts; EDT's blocks by stage."""
    stage_of = {}
    for stage, (first, last) in enumerate(getattr(model, "stage_ranges", [])):
        stage_of.update({index: stage for index in range(first, last)})
    parts = []
    for name, child in model.named_children():
        if not isinstance(child, torch.nn.ModuleList):
            parts.append((name, child))
            continue
        parts += [(f"{name}, stage {stage_of[index]}" if name == "blocks" and index in stage_of else name, module)
                  for index, module in enumerate(child)]
    return parts


def runs_amm(module):
    """Whether this block's attention applies the AMM in this call (inference only, by default)."""
    attention = getattr(module, "attn", None)
    return attention is not None and hasattr(attention, "amm_active") and attention.amm_active()


@contextlib.contextmanager
def labelled_parts(model):
    """Each top-level part's forward inside a profiler range "part: <label>", AMM blocks apart."""
    handles = []
    for label, module in model_parts(model):
        open_ranges = []

        def enter(module, _inputs, label=label, open_ranges=open_ranges):
            name = PART_PREFIX + label + (" (AMM)" if runs_amm(module) else "")
            open_ranges.append(record_function(name).__enter__())

        def leave(_module, _inputs, _output, open_ranges=open_ranges):
            open_ranges.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


#################################################################################
#                                   Profiling                                   #
#################################################################################

def case_operation(case, args, device):
    """(the case's variant, its callable), built as the protocol builds and runs it."""
    model = gpu_protocol.build_ours(case.model, args, device)
    settings = gpu_protocol.speed_settings(args, args.precision, args.compile)
    variant = speed.Variant(case.model, case.model, model, True, settings, device)
    training = case.measurement == "train_masked"
    batch = args.training_batch if training else args.inference_batch
    x, y, t = speed.make_inputs(batch, args.input_size, device, torch.Generator().manual_seed(args.seed))
    if training:
        return variant, speed.training_step_fn(variant, True, x, y, settings, device)
    return variant, speed.inference_fn(variant, x, y, t, False, settings, device)


def profile_case(case, args, device):
    variant, operation = case_operation(case, args, device)
    speed.prepare_mode(variant, case.measurement)
    with gpu_protocol.matmul_precision(args.precision):
        for _ in range(args.warmup):
            operation()
        wall_s = statistics.median(speed.timed(operation, device) for _ in range(args.repeats))
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        # Hooks inside compiled blocks would be traced into their graphs: compiled runs are not split by part.
        labels = contextlib.nullcontext() if args.compile else labelled_parts(variant.model)
        with labels, profile(activities=activities) as profiler:
            for _ in range(args.steps):
                operation()
            speed.synchronize(device)
    summary = summarize(kernel_records(profiler.events(), device), args.steps, wall_s)
    write_raw(case, profiler, device, args.out)
    gpu_protocol.release_memory(device)
    return {"case": case.label, "model": case.model, "measurement": case.measurement, **summary}


def summarize(records, steps, wall_s):
    """Per iteration: launches, kernel ms, busy fraction, ms by category and part, top kernels."""
    if not records:
        raise RuntimeError("the profiler recorded no kernels: this torch build reports no device activity")
    by_category, by_part = collections.Counter(), collections.Counter()
    by_kernel, calls = collections.Counter(), collections.Counter()
    for name, micros, part in records:
        by_category[category_of(name)] += micros
        by_part[part] += micros
        by_kernel[name] += micros
        calls[name] += 1
    kernel_ms = sum(by_category.values()) / 1e3 / steps
    top = [{"kernel": name, "ms": micros / 1e3 / steps, "calls": calls[name] / steps,
            "category": category_of(name)} for name, micros in by_kernel.most_common(TOP_KERNELS)]
    return {"wall_ms": wall_s * 1e3, "kernel_ms": kernel_ms, "busy_fraction": kernel_ms / (wall_s * 1e3),
            "launches": len(records) / steps, "category_ms": ms_per_iteration(by_category, steps),
            "part_ms": ms_per_iteration(by_part, steps), "top_kernels": top}


def ms_per_iteration(micros_by_key, steps):
    return {key: micros / 1e3 / steps for key, micros in micros_by_key.most_common()}


def write_raw(case, profiler, device, out):
    """torch's operator table and the gzipped Chrome trace of the profiled iterations."""
    sort_by = "device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    os.makedirs(os.path.join(out, "tables"), exist_ok=True)
    os.makedirs(os.path.join(out, "traces"), exist_ok=True)
    with atomic_path(os.path.join(out, "tables", case.file_stem + ".txt")) as path, open(path, "w") as file:
        file.write(profiler.key_averages().table(sort_by=sort_by, row_limit=TABLE_ROWS, max_name_column_width=90))
    with atomic_path(os.path.join(out, "traces", case.file_stem + ".json.gz")) as path:
        profiler.export_chrome_trace(path)  # gzipped for the .gz suffix, which the temporary name keeps


#################################################################################
#                                    Report                                     #
#################################################################################

def markdown(result):
    settings = result["settings"]
    unit = "kernels" if settings["device"].startswith("cuda") else "ATen operators"
    lines = [f"Device: {settings['device_name']}; torch {settings['torch']}; {settings['precision']}; inference "
             f"batch {settings['inference_batch']}, training batch {settings['training_batch']}, latent "
             f"{settings['input_size']}; compile: {settings['compile']}; per iteration, {unit}", "",
             "| case | wall ms | kernel ms | busy | launches | " + " | ".join(category for category, _ in CATEGORIES)
             + " | other |", "|---" * (6 + len(CATEGORIES)) + "|"]
    for row in result["rows"]:
        categories = [row["category_ms"].get(category, 0.0) for category, _ in CATEGORIES + (("other", ""),)]
        lines.append(f"| {row['case']} | {row['wall_ms']:.2f} | {row['kernel_ms']:.2f} | {row['busy_fraction']:.0%} | "
                     f"{row['launches']:.0f} | " + " | ".join(f"{ms:.2f}" for ms in categories) + " |")
    for row in result["rows"]:
        lines += ["", f"### {row['case']}", "", "By part (kernel ms per iteration): " + ", ".join(
            f"{part} {ms:.2f}" for part, ms in row["part_ms"].items()), "", "| kernel | category | calls | ms |",
            "|---|---|---|---|"]
        lines += [f"| `{top['kernel'][:100]}` | {top['category']} | {top['calls']:.0f} | {top['ms']:.3f} |"
                  for top in row["top_kernels"]]
    return "\n".join(lines) + "\n"


#################################################################################
#                                     Main                                      #
#################################################################################

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for profile.md, profile.json, tables/ and traces/")
    gpu_protocol.add_device_arguments(parser)
    parser.add_argument("--precision", choices=gpu_protocol.PRECISIONS, default="bf16")
    parser.add_argument("--sizes", nargs="+", choices=gpu_protocol.SIZES, default=["S", "XL"],
                        help="sizes of the masked training step (inference: S)")
    parser.add_argument("--measurements", nargs="+", choices=tuple(gpu_protocol.MEASUREMENT_NAMES),
                        default=list(gpu_protocol.MEASUREMENT_NAMES))
    parser.add_argument("--compile", action="store_true", help="compile the models' blocks")
    parser.add_argument("--flat-adan", action="store_true", help="the training steps with training.flat_adan.FlatAdan")
    parser.add_argument("--repeats", type=int, default=5, help="timed iterations without the profiler")
    parser.add_argument("--steps", type=int, default=3, help="profiled iterations")
    args = parser.parse_args(argv)
    gpu_protocol.check_device_arguments(args)
    for name in ("repeats", "steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name} must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    started = time.perf_counter()
    result = {"settings": gpu_protocol.settings_record(args, device), "rows": []}
    for case in cases(args):
        row = profile_case(case, args, device)
        result["rows"].append(row)
        print(f"{row['case']}: wall {row['wall_ms']:.2f} ms, kernels {row['kernel_ms']:.2f} ms "
              f"({row['busy_fraction']:.0%} busy), {row['launches']:.0f} launches", flush=True)
        result["seconds"] = time.perf_counter() - started
        # After every case, so that a run stopped by a time limit keeps what it measured.
        gpu_protocol.write_report(result, markdown(result), args.out, "profile")
    print(markdown(result))
    print(f"profile: {result['seconds']:.0f} s; written to {args.out}/profile.md, profile.json, tables/, traces/")
    return result


if __name__ == "__main__":
    main()
