"""The attention kernels, and the one function that chooses among them for a device, a dtype, a
head width and a mask.

Every kernel computes softmax(q k^T scale + bias) v, the probabilities multiplied elementwise by
the Attention Modulation Matrix (AMM) where one is given, without renormalising:

- explicit: scores, probabilities and AMM as (B, heads, T, T) tensors, the reference's operations.
- sdpa: `scaled_dot_product_attention` with the bias as its float mask. On CUDA its fused
  kernels read q, k and v in 16-byte vectors: a head width that is not a multiple of 16 bytes
  (EDT's 52 in bf16 or fp16) sends it to the unfused math path, so q, k and v are computed at
  the next multiple with zeros in the extra channels (`padded_head_width`).
- amm-lse: the AMM as part of the bias, with the softmax's normaliser put back:
  softmax(s) * M = softmax(s + log M) * exp(lse(s + log M) - lse(s)), from two fused passes that
  return the log-sum-exp `lse` of each row.
- flex: FlexAttention, the bias added in its score function, the AMM as amm-lse through its
  log-sum-exp; compiled on CUDA, eager (unfused) on the CPU.
- triton: one Triton kernel with the AMM in the same pass, at the head's own width, reading q, k
  and v where the qkv projection wrote them (models/triton_attention.py); CUDA, or the CPU
  under Triton's interpreter.

flex and triton are taken only at inference and only where `attention_kernel_at_inference` turns
one on: they await their measurement on a GPU (`benchmarks.gpu_protocol --attention-kernel flex`
or `triton`) before any default takes them.
"""
import contextlib
import functools
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

EXPLICIT = "explicit"
SDPA = "sdpa"
AMM_LSE = "amm-lse"
FLEX = "flex"
TRITON = "triton"
KERNELS = (EXPLICIT, SDPA, AMM_LSE, FLEX, TRITON)
INFERENCE_KERNELS = (FLEX, TRITON)  # opt-in, for every call without autograd

CUDA_VECTOR_BYTES = 16  # the fused CUDA kernels' load width
HALF_PRECISION_BYTES = 2
# The memory-efficient CUDA kernel reads the bias rows in aligned vectors of this many elements.
EFFICIENT_BIAS_ALIGNMENT = 16
# Compiled FlexAttention specialises on every shape and dtype it meets: each stage, batch and pass.
FLEX_GRAPHS = 128

inference_kernel = None  # one of INFERENCE_KERNELS, set by `attention_kernel_at_inference`


@dataclass(frozen=True)
class KernelChoice:
    kernel: str  # one of KERNELS
    head_width: int  # the width q, k and v are computed at: the head's, or padded with zeros


def compute_dtype(x):
    """The dtype that attention on x runs in: autocast's where autocast is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def padded_head_width(head_dim, device_type, dtype):
    """head_dim rounded up to the fused CUDA kernels' vector width; unchanged elsewhere."""
    if device_type != "cuda":
        return head_dim
    multiple = CUDA_VECTOR_BYTES // dtype.itemsize
    return -(-head_dim // multiple) * multiple


def choose_attention_kernel(device_type, dtype, head_dim, amm=False, bias_needs_grad=False, grad_enabled=False):
    """The kernel for one attention call (benchmarks/attention_kernels.py measures the choices):

    - AMM blocks: amm-lse on CUDA at inference in half precision (an H200: 1.1 against 1.5 ms
      for EDT-S/2's block 10 at batch 256 in bf16). Explicit with autograd (the fused kernels do
      not differentiate their log-sum-exp), in float32 on CUDA (2.2 against 1.6 ms: float32
      fused attention runs without tensor cores, twice) and on the CPU, where the in-place
      explicit pass is as fast as two fused ones.
    - Otherwise sdpa, except for a CPU bias that needs its gradient (training EDT): the fused
      CPU kernel has no mask gradient, and SDPA's math fallback is slower than the explicit path.
    - FlexAttention or the Triton kernel for every call without autograd, on any device, where
      `attention_kernel_at_inference` has turned one on; FlexAttention at the padded width,
      Triton at the head's own.
    """
    if inference_kernel == TRITON and not grad_enabled:
        return KernelChoice(TRITON, head_dim)
    if inference_kernel == FLEX and not grad_enabled:
        return KernelChoice(FLEX, padded_head_width(head_dim, device_type, dtype))
    if amm:
        if grad_enabled or device_type != "cuda" or dtype.itemsize > HALF_PRECISION_BYTES:
            return KernelChoice(EXPLICIT, head_dim)
        return KernelChoice(AMM_LSE, padded_head_width(head_dim, device_type, dtype))
    if device_type == "cpu" and bias_needs_grad:
        return KernelChoice(EXPLICIT, head_dim)
    return KernelChoice(SDPA, padded_head_width(head_dim, device_type, dtype))


#################################################################################
#                                   Kernels                                     #
#################################################################################

def explicit_attention(q, k, v, bias, amm, scale, in_place=False):
    """q, k, v: (B, heads, T, D); bias: None or broadcastable to (B, heads, T, T); amm: None or
    broadcastable to the probabilities. in_place (no autograd) keeps one (B, heads, T, T) buffer:
    at inference, allocating three costs more than the arithmetic."""
    scores = (q * scale) @ k.transpose(-2, -1)  # (B, heads, T, T)
    if bias is not None:
        scores = scores.add_(bias) if in_place else scores + bias
    probs = torch.softmax(scores, dim=-1, out=scores) if in_place else scores.softmax(dim=-1)
    if amm is not None:
        probs = probs.mul_(amm) if in_place else probs * amm
    return probs @ v  # (B, heads, T, D)


def sdpa_attention(q, k, v, bias, scale):
    mask = None if bias is None else bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # (B, heads, T, D)


def attention_with_lse(q, k, v, bias, scale):
    """(softmax(q k^T scale + bias) v (B, heads, T, D), lse (B, heads, T)) from a fused kernel:
    the memory-efficient one on CUDA, the flash one on the CPU."""
    mask = None if bias is None else bias.to(q.dtype)
    if q.device.type == "cuda":
        mask = None if mask is None else efficient_kernel_bias(mask, q, k)
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, mask, True, scale=scale)[:2]
        return out, lse[..., :q.shape[-2]]  # the kernel pads lse's rows to its tile
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask, scale=scale)


def efficient_kernel_bias(bias, q, k):
    """The bias as the memory-efficient CUDA kernel reads it, as SDPA hands it over: rows
    starting at aligned addresses (padded, then sliced back), expanded to (B, heads, T_q, T_k)."""
    strides_aligned = all(stride % EFFICIENT_BIAS_ALIGNMENT == 0 for stride in bias.stride()[:-1])
    if not strides_aligned or bias.stride(-1) != 1:
        length = bias.shape[-1]
        padding = -length % EFFICIENT_BIAS_ALIGNMENT or EFFICIENT_BIAS_ALIGNMENT
        bias = F.pad(bias, (0, padding))[..., :length]
    return bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def amm_attention(q, k, v, bias, amm, scale, with_lse=attention_with_lse):
    """softmax(s) * amm @ v with s = q k^T scale + bias, from two fused passes of `with_lse(q, k,
    v, bias, scale)`, which returns the attention and its log-sum-exp. amm: (T, T) or
    broadcastable to (B, heads, T, T), zero where no attention is allowed (every row keeps its
    diagonal, so no row is empty)."""
    log_amm = amm.log()
    modulated_bias = log_amm if bias is None else bias + log_amm
    modulated, modulated_lse = with_lse(q, k, v, modulated_bias, scale)
    _, lse = with_lse(q, k, v, bias, scale)
    renormalisation = torch.exp(modulated_lse - lse).unsqueeze(-1)  # (B, heads, T, 1), sum of the modulated probabilities
    # The float32 product rounded to q's dtype as it is written: one pass instead of a product and a cast.
    out = torch.empty_like(modulated, dtype=q.dtype)
    return torch.mul(modulated, renormalisation, out=out)  # (B, heads, T, D)


@contextlib.contextmanager
def attention_kernel_at_inference(kernel):
    """Within it, inference attention runs through `kernel`, one of INFERENCE_KERNELS, or through
    the default choice for None (see `choose_attention_kernel`)."""
    global inference_kernel
    if kernel is not None and kernel not in INFERENCE_KERNELS:
        raise ValueError(f"unknown inference attention kernel {kernel!r}; choose from {', '.join(INFERENCE_KERNELS)}")
    before, inference_kernel = inference_kernel, kernel
    try:
        yield
    finally:
        inference_kernel = before


def inference_kernel_unavailable(kernel, device_type):
    """Why `kernel`, one of INFERENCE_KERNELS, cannot run on device_type; None where it can."""
    if kernel == TRITON and device_type != "cuda" and not triton_interpreted():
        return ("the Triton attention runs on a GPU, or on the CPU under Triton's interpreter "
                "(TRITON_INTERPRET=1 in the environment, slow)")
    return None


@functools.cache
def flex_kernel(device_type):
    """flex_attention compiled for CUDA (for more shapes than dynamo's default limit); eager
    elsewhere, also inside compiled code (the CPU's compiled kernel returns no log-sum-exp)."""
    from torch.nn.attention.flex_attention import flex_attention  # on first use: its import takes 0.25 s
    if device_type != "cuda":
        warnings.filterwarnings("ignore", "flex_attention called without torch.compile")
        return torch.compiler.disable(flex_attention)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, FLEX_GRAPHS)
    return torch.compile(flex_attention, dynamic=False)


def bias_score_mod(bias):
    """The score function adding bias, broadcastable to (B, heads, T_q, T_k), to q k^T scale. It
    indexes the bias's own (1 or B, 1 or heads) leading dimensions, so a kernel reads it as stored."""
    if bias is None:
        return None
    bias = bias[(None,) * (4 - bias.dim())]  # (1 or B, 1 or heads, T_q, T_k)
    per_sample, per_head = bias.shape[0] > 1, bias.shape[1] > 1

    def add_bias(score, batch, head, q_index, kv_index):
        return score + bias[batch if per_sample else 0, head if per_head else 0, q_index, kv_index]
    return add_bias


def flex_with_lse(q, k, v, bias, scale):
    """(attention (B, heads, T, D), its log-sum-exp (B, heads, T)) from FlexAttention."""
    from torch.nn.attention.flex_attention import AuxRequest
    out, aux = flex_kernel(q.device.type)(q, k, v, score_mod=bias_score_mod(bias), scale=scale,
                                          return_aux=AuxRequest(lse=True))
    return out, aux.lse


def flex_inference_attention(q, k, v, bias, amm, scale):
    """Attention (B, heads, T, D) through FlexAttention; its log-sum-exp only where an AMM needs it."""
    if amm is None:
        return flex_kernel(q.device.type)(q, k, v, score_mod=bias_score_mod(bias), scale=scale)
    return amm_attention(q, k, v, bias, amm, scale, with_lse=flex_with_lse)


def triton_interpreted():
    """Triton runs kernels on the host (TRITON_INTERPRET=1): how a machine without CUDA runs ours."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on")


def triton_inference_attention(q, k, v, bias, amm, scale):
    """Attention (B, heads, T, D) from the Triton kernel, a view of a (B, T, heads, D) tensor."""
    from . import triton_attention  # on first use: it imports Triton
    return triton_attention.attention(q, k, v, bias, amm, scale)


#################################################################################
#                              Head-width padding                               #
#################################################################################

def pad_heads(tensor, axis, head_dim, width):
    """Zero-pads each group of head_dim entries along `axis` to `width` entries, e.g. the qkv
    weight (3 heads head_dim, C) -> (3 heads width, C) along axis 0. Differentiable."""
    axis %= tensor.dim()
    grouped = tensor.unflatten(axis, (-1, head_dim))  # (..., groups, head_dim, ...)
    trailing = grouped.dim() - axis - 2
    return F.pad(grouped, (0, 0) * trailing + (0, width - head_dim)).flatten(axis, axis + 1)
