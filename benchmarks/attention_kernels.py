"""The attention kernels at the shapes EDT, MDTv2 and DiT run, each timed and checked against the
explicit path in float32: the measurements behind `models.attention_kernels.choose_attention_kernel`.

    python -m benchmarks.attention_kernels --device cuda --out results/attention
    python -m benchmarks.attention_kernels --device cpu --tiny

For every case (model, stage, batch, mode) and dtype it times the explicit path and every fused
candidate (SDPA at the head's width and zero-padded to 56 or 64, the AMM through two
log-sum-exp passes), forward only at inference and forward plus backward in training, and
marks the candidate that `choose_attention_kernel` takes. Three more candidates, taken by no
default yet, are measured beside them: FlexAttention (the models' flex path, which
`attention_kernel_at_inference("flex")` turns on: the bias added in its score function, compiled
on CUDA; on the CPU eager and at inference only, a check of its values), on CUDA cuDNN's fused
attention, each also for the AMM through their log-sum-exp, and at inference the one-pass Triton
kernel (models/triton_attention.py; on the CPU only under TRITON_INTERPRET=1), the AMM in the same
pass. A candidate the device cannot run is reported as such.
"""
import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.attention import attention_modulation_matrix, gather_token_pairs  # noqa: E402
from models.attention_kernels import (AMM_LSE, FLEX, SDPA, TRITON, amm_attention,  # noqa: E402
                                      choose_attention_kernel, explicit_attention, flex_with_lse, padded_head_width,
                                      sdpa_attention, triton_inference_attention, triton_interpreted)
from runtime.io import atomic_path  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MDT_KEPT_FRACTION = 0.6  # MDTv2's masked pass keeps 1 - (0.3 + U(0, 0.2)) of the tokens, 0.6 on average


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch: int
    heads: int
    grid: int
    head_dim: int
    bias: str  # "none", "shared" (EDT's (1, heads, T, T)) or "gathered" (MDT's (B, heads, L, L))
    training: bool
    amm: bool = False


def cases(tiny):
    """The shapes of one forward of the protocol's measurements (benchmarks/gpu_protocol.py)."""
    if tiny:
        return [Case("EDT-S/2 tiny, inference", 4, 2, 8, 52, "shared", False),
                Case("EDT-S/2 tiny, training", 4, 2, 8, 52, "shared", True),
                Case("EDT-S/2 tiny AMM, inference", 4, 2, 8, 52, "shared", False, amm=True),
                Case("MDTv2 tiny masked, training", 4, 2, 8, 64, "gathered", True),
                Case("DiT tiny, inference", 4, 2, 8, 72, "none", False)]
    return [
        Case("EDT-S/2 stage 0, inference", 256, 6, 16, 52, "shared", False),
        Case("EDT-S/2 stage 1, inference", 256, 8, 8, 52, "shared", False),
        Case("EDT-S/2 AMM block 10, inference", 256, 6, 16, 52, "shared", False, amm=True),
        Case("EDT-S/2 stage 0, masked step (2 x 32)", 64, 6, 16, 52, "shared", True),
        Case("EDT-XL/2 stage 0, masked step (2 x 32)", 64, 18, 16, 52, "shared", True),
        Case("EDT-XL/2 AMM block 23, inference", 256, 18, 16, 52, "shared", False, amm=True),
        Case("MDTv2-S/2 encoder, masked pass", 32, 6, 16, 64, "gathered", True),
        Case("MDTv2-S/2, inference", 256, 6, 16, 64, "shared", False),
        Case("DiT-XL/2, inference", 256, 16, 16, 72, "none", False),
    ]


#################################################################################
#                                 Candidates                                    #
#################################################################################

def pad_last(tensors, width):
    return [F.pad(tensor, (0, width - tensor.shape[-1])) for tensor in tensors]


CUDNN = "cudnn"


def candidates(case, device_type, dtype):
    """{name: (kernel, head width or None for explicit, fn(q, k, v, bias, amm, scale))}. The
    log-sum-exp kernels are called directly, without SDPA's checks: only at widths they take."""
    found = {"explicit": (None, None, lambda q, k, v, bias, amm, scale: explicit_attention(
        q, k, v, bias, amm, scale, in_place=not case.training))}
    widths = sorted({case.head_dim, 56, 64} - {width for width in (56, 64) if width < case.head_dim})
    # FlexAttention at the width the models give it and at 64 (a compilation each), without a CPU backward.
    flex_widths = (padded_head_width(case.head_dim, device_type, dtype), 64)
    for width in widths:
        label = "" if width == case.head_dim else f", padded to {width}"
        with_flex = width in flex_widths and (device_type == "cuda" or not case.training)
        if case.amm:
            if case.training:
                continue  # the AMM in training runs explicit: no fused kernel differentiates its log-sum-exp
            if width == padded_head_width(width, device_type, dtype):
                found[f"amm-lse{label}"] = (AMM_LSE, width, padded_call(amm_attention, case.head_dim, width))
            if with_flex:
                found[f"amm-lse, flex{label}"] = (FLEX, width, padded_call(amm_with(flex_with_lse), case.head_dim, width))
            if device_type == "cuda":
                found[f"amm-lse, cudnn{label}"] = (CUDNN, width,
                                                   padded_call(amm_with(cudnn_with_lse), case.head_dim, width))
        else:
            found[f"sdpa{label}"] = (SDPA, width, padded_call(
                lambda q, k, v, bias, amm, scale: sdpa_attention(q, k, v, bias, scale), case.head_dim, width))
            if with_flex:
                found[f"flex{label}"] = (FLEX, width, padded_call(
                    lambda q, k, v, bias, amm, scale: flex_with_lse(q, k, v, bias, scale)[0], case.head_dim, width))
            if device_type == "cuda":
                found[f"cudnn{label}"] = (CUDNN, width, padded_call(cudnn_attention, case.head_dim, width))
    if not case.training and (device_type == "cuda" or triton_interpreted()):
        found["triton, one pass" if case.amm else "triton"] = (TRITON, case.head_dim, triton_inference_attention)
    return found


def cudnn_attention(q, k, v, bias, amm, scale):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return sdpa_attention(q, k, v, bias, scale)


def cudnn_with_lse(q, k, v, bias, scale):
    mask = None if bias is None else bias.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, mask, True, scale=scale)[:2]
    return out, lse.reshape(q.shape[:-1])


def amm_with(with_lse):
    """amm_attention through another kernel that returns the log-sum-exp."""
    return functools.partial(amm_attention, with_lse=with_lse)


def padded_call(kernel, head_dim, width):
    def call(q, k, v, bias, amm, scale):
        q, k, v = pad_last((q, k, v), width)
        return kernel(q, k, v, bias, amm, scale)[..., :head_dim]
    return call


#################################################################################
#                                 Measuring                                     #
#################################################################################

def inputs(case, dtype, device, generator):
    tokens = case.grid ** 2
    present = round(tokens * MDT_KEPT_FRACTION) if case.bias == "gathered" else tokens
    q, k, v = (torch.randn(case.batch, case.heads, present, case.head_dim, generator=generator).to(device, dtype)
               for _ in range(3))
    table_bias = torch.randn(1, case.heads, tokens, tokens, generator=generator).to(device)
    bias = None
    if case.bias == "shared":
        bias = table_bias
    elif case.bias == "gathered":
        token_ids = torch.stack([torch.randperm(tokens, generator=generator)[:present] for _ in range(case.batch)])
        bias = gather_token_pairs(table_bias, token_ids.to(device))
    if bias is not None and case.training:
        bias.requires_grad_(True)
    amm = attention_modulation_matrix(case.grid).to(device) if case.amm else None
    if case.training:
        for tensor in (q, k, v):
            tensor.requires_grad_(True)
    return q, k, v, bias, amm


def run_once(fn, args, training, dtype):
    """Under autocast in half precision, as the models run (the bias and the AMM stay float32)."""
    autocast = torch.autocast(args[0].device.type, dtype=dtype, enabled=dtype != torch.float32)
    with autocast, torch.set_grad_enabled(training):
        out = fn(*args)
        if training:
            out.float().square().mean().backward()
    return out


def time_ms(fn, args, training, dtype, repeats):
    device = args[0].device

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    for _ in range(2):
        run_once(fn, args, training, dtype)
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        run_once(fn, args, training, dtype)
        synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure(case, dtype_name, device, repeats, batch_size=None):
    dtype = DTYPES[dtype_name]
    case = dataclasses.replace(case, batch=batch_size or case.batch)
    q, k, v, bias, amm = inputs(case, dtype, device, torch.Generator().manual_seed(0))
    scale = case.head_dim ** -0.5
    with torch.no_grad():
        reference = explicit_attention(q.float(), k.float(), v.float(), None if bias is None else bias.float(),
                                       amm, scale)
    bias_needs_grad = bias is not None and case.training
    chosen = choose_attention_kernel(device.type, dtype, case.head_dim, amm=case.amm,
                                     bias_needs_grad=bias_needs_grad, grad_enabled=case.training)
    rows = []
    for name, (kernel, width, fn) in candidates(case, device.type, dtype).items():
        row = {"case": case.name, "batch": case.batch, "dtype": dtype_name, "candidate": name,
               "chosen": (kernel or "explicit") == chosen.kernel and (width or case.head_dim) == chosen.head_width}
        try:
            out = run_once(fn, (q, k, v, bias, amm, scale), False, dtype)
            row["relative_error"] = ((out.float() - reference).abs().max() / reference.abs().max()).item()
            row["ms"] = time_ms(fn, (q, k, v, bias, amm, scale), case.training, dtype, repeats)
            if kernel == TRITON:
                from models.triton_attention import last_tiling  # imports Triton
                row["candidate"] += f" ({last_tiling()})"
        except RuntimeError as error:  # a kernel this device or dtype does not have
            row["error"] = str(error).splitlines()[0][:120]
        rows.append(row)
    return rows


#################################################################################
#                                   Report                                      #
#################################################################################

def table(rows, header=True):
    lines = ["| case | batch | dtype | candidate | ms | rel. error vs fp32 explicit | chosen |",
             "|---|---|---|---|---|---|---|"] if header else []
    for row in rows:
        timing = f"{row['ms']:.3f}" if "ms" in row else f"not run: {row['error']}"
        error = f"{row['relative_error']:.1e}" if "relative_error" in row else ""
        lines.append(f"| {row['case']} | {row['batch']} | {row['dtype']} | {row['candidate']} | {timing} | {error} | "
                     f"{'yes' if row['chosen'] else ''} |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=None,
                        help="default: fp32 and bf16 on CUDA (fp16 too), fp32 on the CPU")
    parser.add_argument("--tiny", action="store_true", help="small shapes (a quick check)")
    parser.add_argument("--batch-size", type=int, default=None, help="every case at this batch size")
    parser.add_argument("--only", default="", help="the cases whose name holds this text, e.g. EDT-S/2")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None, help="folder for attention_kernels.md and .json")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available")
    args.dtypes = args.dtypes or (["fp32", "bf16", "fp16"] if args.device.startswith("cuda") else ["fp32"])
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    rows = []
    print(table(rows), flush=True)
    for case in [case for case in cases(args.tiny) if args.only in case.name]:
        for dtype in args.dtypes:
            measured = measure(case, dtype, device, args.repeats, args.batch_size)
            print(table(measured, header=False), flush=True)  # a run cut short keeps what it printed
            rows += measured
    report = table(rows)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        for name, text in (("attention_kernels.md", report + "\n"), ("attention_kernels.json", json.dumps(rows, indent=2))):
            with atomic_path(os.path.join(args.out, name)) as path, open(path, "w") as file:
                file.write(text)
    return rows


if __name__ == "__main__":
    main()
