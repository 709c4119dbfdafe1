"""Inference attention in one Triton kernel: softmax(q k^T scale + bias) v, with the Attention
Modulation Matrix (AMM) in the same pass.

The AMM multiplies the probabilities without renormalising them. A flash-style pass keeps a
running maximum m and the running sum l of exp(s - m) over the key blocks, as any fused
attention does; here only the accumulated values see the AMM, acc = sum exp(s - m) M v, so that
acc / l = sum softmax(s) M v: one pass where the log-sum-exp route (models/attention_kernels.py)
needs two. q, k and v are read where the qkv projection wrote them and the output is written in
(B, T, heads, D) order, so neither side is copied; a head width that is not a power of two is
read with masked loads, so nothing is padded.

Imported on first use (it imports Triton). On a machine without CUDA it runs only under
Triton's interpreter (TRITON_INTERPRET=1 before Triton is imported), which the tests use.
"""
from typing import Optional

import torch
import triton
import triton.language as tl

from .attention_kernels import TRITON, inference_kernel_unavailable, triton_interpreted

MIN_BLOCK = 16  # tl.dot's smallest operand side
INTERPRETED = triton_interpreted()  # as the kernel is compiled: at import
# (query rows, key columns, warps, pipeline stages) per program, tried on the first call of each
# shape; a GPU run decides (benchmarks/attention_kernels.py). The interpreter takes one.
GPU_TILINGS = ((16, 16, 2, 2), (32, 32, 4, 2), (64, 32, 4, 3), (64, 64, 4, 2), (128, 64, 8, 2))
INTERPRETER_TILING = (64, 64, 4, 1)


def tiling_configs(tilings):
    return [triton.Config({"BLOCK_M": rows, "BLOCK_N": columns}, num_warps=warps, num_stages=stages)
            for rows, columns, warps, stages in tilings]


def fitting_tilings(configs, named_args, **kwargs):
    """The tilings no wider than the token count (rounded up to a power of two), else the smallest."""
    width = max(MIN_BLOCK, triton.next_power_of_2(named_args["tokens"]))
    fitting = [config for config in configs if max(config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]) <= width]
    return fitting or configs[:1]


@triton.autotune(configs=tiling_configs((INTERPRETER_TILING,) if INTERPRETED else GPU_TILINGS),
                 key=["tokens", "head_dim", "HAS_BIAS", "HAS_AMM", "IEEE"],
                 prune_configs_by={"early_config_prune": fitting_tilings})
@triton.jit
def _attention_kernel(q_ptr, k_ptr, v_ptr, bias_ptr, amm_ptr, out_ptr,
                      stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                      stride_vb, stride_vh, stride_vt, stride_bb, stride_bh, stride_bq, stride_bk,
                      stride_aq, stride_ak, stride_ob, stride_oh, stride_ot,
                      heads, tokens, head_dim, scale,
                      HAS_BIAS: tl.constexpr, HAS_AMM: tl.constexpr, IEEE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program: BLOCK_M queries of one (sample, head) against all keys, BLOCK_N at a time."""
    row_block, batch_head = tl.program_id(0), tl.program_id(1)
    batch, head = (batch_head // heads).to(tl.int64), batch_head % heads  # 64-bit offsets: large batches
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    channels = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    row_valid, channel_valid = rows < tokens, channels < head_dim
    q = tl.load(q_ptr + batch * stride_qb + head * stride_qh + rows[:, None] * stride_qt + channels[None, :],
                mask=row_valid[:, None] & channel_valid[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    running_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    normaliser = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, tokens, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        col_valid = cols < tokens
        kv_mask = col_valid[:, None] & channel_valid[None, :]
        k = tl.load(k_ptr + batch * stride_kb + head * stride_kh + cols[:, None] * stride_kt + channels[None, :],
                    mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(v_ptr + batch * stride_vb + head * stride_vh + cols[:, None] * stride_vt + channels[None, :],
                    mask=kv_mask, other=0.0)  # (BLOCK_N, BLOCK_D)
        if IEEE:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = scores * scale  # (BLOCK_M, BLOCK_N) float32
        pair_valid = row_valid[:, None] & col_valid[None, :]
        if HAS_BIAS:
            scores += tl.load(bias_ptr + batch * stride_bb + head * stride_bh + rows[:, None] * stride_bq
                              + cols[None, :] * stride_bk, mask=pair_valid, other=0.0).to(tl.float32)
        scores = tl.where(col_valid[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        rescale = tl.exp(running_max - new_max)
        weights = tl.exp(scores - new_max[:, None])  # (BLOCK_M, BLOCK_N)
        normaliser = normaliser * rescale + tl.sum(weights, axis=1)
        if HAS_AMM:
            weights *= tl.load(amm_ptr + rows[:, None] * stride_aq + cols[None, :] * stride_ak,
                               mask=pair_valid, other=0.0).to(tl.float32)
        if IEEE:
            update = tl.dot(weights, v, input_precision="ieee")
        else:
            update = tl.dot(weights.to(v.dtype), v)
        acc = acc * rescale[:, None] + update
        running_max = new_max
    out = acc / normaliser[:, None]
    tl.store(out_ptr + batch * stride_ob + head * stride_oh + rows[:, None] * stride_ot + channels[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & channel_valid[None, :])


def last_tiling():
    """The tiling the last call ran with, as "rows x columns, warps, stages" (the autotuner's pick)."""
    config = _attention_kernel.best_config
    return f"{config.kwargs['BLOCK_M']} x {config.kwargs['BLOCK_N']}, {config.num_warps} warps, {config.num_stages} stages"


def bias_strides(bias):
    """bias broadcastable to (B, heads, T, T) -> its four strides, 0 along broadcast dimensions."""
    bias = bias[(None,) * (4 - bias.dim())]
    return [0 if size == 1 else stride for size, stride in zip(bias.shape, bias.stride())]


def attention(q, k, v, bias, amm, scale):
    """q, k, v: (B, heads, T, D), each channel-contiguous; bias: None or broadcastable to (B,
    heads, T, T); amm: None or (T, T). Returns (B, heads, T, D), a view of a (B, T, heads, D)
    tensor. float32 inputs take IEEE products unless TF32 matmuls are allowed."""
    if torch.compiler.is_compiling():
        return compiled_attention(q, k, v, bias, amm, scale)
    return launch(q, k, v, bias, amm, scale)


# torch.compile sees the kernel as one operator with a known output: Dynamo does not trace the
# autotuner's pruning, and Inductor cannot run a Triton kernel on the CPU, as the interpreter does.
# Eager calls skip the operator's dispatch, a few microseconds per call.
@torch.library.custom_op("edt::triton_attention", mutates_args=())
def compiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor],
                       amm: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    return launch(q, k, v, bias, amm, scale)


@compiled_attention.register_fake
def _(q, k, v, bias, amm, scale):
    return output_like(q)


def output_like(q):
    """(B, heads, T, D) for q (B, heads, T, D): a view of a new (B, T, heads, D) tensor."""
    batch, heads, tokens, head_dim = q.shape
    return q.new_empty(batch, tokens, heads, head_dim).transpose(1, 2)


def launch(q, k, v, bias, amm, scale):
    batch, heads, tokens, head_dim = q.shape
    unavailable = inference_kernel_unavailable(TRITON, q.device.type)
    if unavailable:
        raise RuntimeError(unavailable)
    if any(tensor.stride(-1) != 1 for tensor in (q, k, v)):
        raise ValueError("the Triton attention reads q, k and v with contiguous channels")
    if amm is not None and amm.dim() != 2:
        raise ValueError(f"the Triton attention takes a (T, T) AMM, got {tuple(amm.shape)}")
    out = output_like(q)
    # The legacy allow_tf32 flag raises once the new API has set the precision (runtime.distributed does).
    ieee = q.dtype == torch.float32 and torch.backends.cuda.matmul.fp32_precision != "tf32"
    bias_arg = q if bias is None else bias  # a pointer the kernel does not read without HAS_BIAS
    amm_arg = q if amm is None else amm
    amm_strides = (0, 0) if amm is None else amm.stride()

    def grid(meta):
        return triton.cdiv(tokens, meta["BLOCK_M"]), batch * heads
    _attention_kernel[grid](
        q, k, v, bias_arg, amm_arg, out,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *(bias_strides(bias) if bias is not None else (0, 0, 0, 0)), *amm_strides, *out.stride()[:3],
        heads, tokens, head_dim, scale,
        HAS_BIAS=bias is not None, HAS_AMM=amm is not None, IEEE=ieee,
        BLOCK_D=max(MIN_BLOCK, triton.next_power_of_2(head_dim)))
    return out
