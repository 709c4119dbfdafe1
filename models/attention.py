"""Multi-head self-attention with an optional BEiT-style relative position bias and an optional
Attention Modulation Matrix (AMM), the training-free locality prior of EDT."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention_kernels import (AMM_LSE, EXPLICIT, FLEX, SDPA, TRITON, KernelChoice, amm_attention,
                                choose_attention_kernel, compute_dtype, explicit_attention, flex_inference_attention,
                                pad_heads, sdpa_attention, triton_inference_attention)
from .fast_paths import FastPathSwitch
from .kept_tensor import KeptTensor, as_autocast_casts, inference_autocast_dtype
from .onednn import PackedLinear

MIN_AMM_GRID = 3  # the radius token (row 2, column n - 1) must exist
# The release's two AMM functions: "256" for 256x256 images, "512" (commented "use for 512x512").
AMM_VARIANTS = ("256", "512")
DEFAULT_AMM_VARIANT = "256"
AMM_512_AMPLITUDE = 1.3
BEIT_CLASS_TOKEN_ROWS = 3  # BEiT's bias table rows for class-token pairs, kept by MDT
# How a checkpoint stores the relative position bias: EDT's table has only the grid's rows and no
# index; MDT's (BEiT's) has three more rows and its index table.
BIAS_LAYOUTS = {
    "edt": dict(extra_rows=0, persistent_index=False),
    "mdt": dict(extra_rows=BEIT_CLASS_TOKEN_ROWS, persistent_index=True),
}


#################################################################################
#                         Attention Modulation Matrix                           #
#################################################################################

def grid_coordinates(grid_size):
    """(T, 2) integer (row, column) of each token of a grid_size x grid_size grid, row-major."""
    coords = torch.arange(grid_size)
    return torch.stack(torch.meshgrid(coords, coords, indexing="ij")).flatten(1).T


def attention_modulation_matrix(grid_size, variant=DEFAULT_AMM_VARIANT):
    """(T, T) AMM of the Euclidean token distance d with period P = 4 (n - 1) sqrt(2):
    M = exp(cos(2 pi d / P)) / 2 (variant "256") or M = 1.3 cos(2 pi d / P) (variant "512"),
    zeroed beyond the radius R = sqrt((n - 1)^2 + 4), i.e. wherever M is below its value at the
    token (row 2, column n - 1) seen from token 0.

    Computed in float32 as the reference does, so the cut-off keeps exactly the same entries.
    """
    if grid_size < MIN_AMM_GRID:
        raise ValueError(f"the AMM needs a token grid of at least {MIN_AMM_GRID}x{MIN_AMM_GRID}, got {grid_size}x{grid_size}")
    check_amm_variant(variant)
    coords = grid_coordinates(grid_size).float()
    distance = ((coords[:, None, :] - coords[None, :, :]) ** 2).sum(-1).sqrt()
    period = 4 * (grid_size - 1) * math.sqrt(2)
    cosine = torch.cos(2 * math.pi / period * distance)
    matrix = torch.exp(cosine) / 2 if variant == "256" else AMM_512_AMPLITUDE * cosine
    radius_token = 3 * grid_size - 1  # row 2, column n - 1
    threshold = matrix[0, radius_token]
    return torch.where(matrix < threshold, torch.zeros_like(matrix), matrix)


def check_amm_variant(variant):
    if variant not in AMM_VARIANTS:
        raise ValueError(f"unknown AMM variant {variant!r}; choose from {', '.join(AMM_VARIANTS)}")
    return variant


#################################################################################
#                           Relative Position Bias                              #
#################################################################################

def relative_position_index(grid_size):
    """(T, T) index into a ((2n - 1)^2)-row table: (dh + n - 1)(2n - 1) + (dw + n - 1) with
    dh, dw the query's row and column minus the key's."""
    coords = grid_coordinates(grid_size)
    delta = coords[:, None, :] - coords[None, :, :] + (grid_size - 1)  # (T, T, 2)
    return delta[..., 0] * (2 * grid_size - 1) + delta[..., 1]


class RelativePositionBias(nn.Module):
    """The (1, heads, T, T) bias gathered from a learned ((2n - 1)^2 + extra_rows, heads) table.
    Without autograd (sampling) the gathered bias is kept until the table changes (KeptTensor).

    extra_rows: BEiT's three class-token rows, unused by the grid but part of MDT's checkpoints.
    persistent_index: MDT's checkpoints also store the index table; EDT's do not.
    """

    def __init__(self, grid_size, num_heads, extra_rows=0, persistent_index=False):
        super().__init__()
        num_rows = (2 * grid_size - 1) ** 2 + extra_rows
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_rows, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", relative_position_index(grid_size),
                             persistent=persistent_index)
        self.kept_bias = KeptTensor()

    def gather(self):
        # Gathered from the transposed table, the bias comes out contiguous, as SDPA's fused CPU kernel wants its mask.
        return self.relative_position_bias_table.T[:, self.relative_position_index].unsqueeze(0)  # (1, heads, T, T)

    def forward(self, token_ids=None, dtype=None):
        """token_ids: optional (B, L) indices of the tokens present (MDT's masked training);
        then the bias between those tokens, (B, heads, L, L). dtype: the kept bias's, for a
        kernel that would cast it at every call (None: the table's)."""
        if token_ids is not None:
            return gather_token_pairs(self.gather(), token_ids)

        def derive():
            return self.gather() if dtype is None else self.gather().to(dtype)
        return self.kept_bias.get_at_inference(self.relative_position_bias_table, derive, context=dtype)


def gather_token_pairs(matrix, token_ids):
    """(1, H, T, T) or (T, T) matrix over all token pairs -> (B, H, L, L) (H = 1 for the
    latter) over the pairs of each sample's present tokens token_ids (B, L)."""
    matrix = matrix.view(1, -1, *matrix.shape[-2:])  # (1, H, T, T)
    batch, present = token_ids.shape
    heads, total = matrix.shape[1], matrix.shape[-1]
    rows = token_ids.view(batch, 1, present, 1).expand(batch, heads, present, total)
    matrix = matrix.expand(batch, heads, total, total).gather(2, rows)  # (B, H, L, T)
    columns = token_ids.view(batch, 1, 1, present).expand(batch, heads, present, present)
    return matrix.gather(3, columns)  # (B, H, L, L)


#################################################################################
#                                 Attention                                     #
#################################################################################

class Attention(nn.Module, FastPathSwitch):
    """Self-attention over a square token grid, through the kernel that
    `choose_attention_kernel` picks for each call (see models/attention_kernels.py).

    Where the kernel wants a wider head (CUDA's fused kernels and EDT's 52-wide heads in half
    precision), q, k and v come out of the qkv projection already padded with zero channels:
    the weight is padded, not the activations, and the output projection reads the padded
    attention output through a weight with zero columns there. `fast = False` is the plain
    path, kept for comparison: explicit attention everywhere, a new tensor for every
    intermediate, ATen's Linear.
    """

    def __init__(self, dim, num_heads, grid_size, relative_bias=True, amm_in_training=False, bias_layout="edt"):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.grid_size = grid_size
        self.scale = self.head_dim ** -0.5
        self.amm_in_training = amm_in_training
        self.qkv = PackedLinear(dim, 3 * dim)
        self.proj = PackedLinear(dim, dim)
        self.rel_pos_bias = (RelativePositionBias(grid_size, num_heads, **BIAS_LAYOUTS[bias_layout])
                             if relative_bias else None)
        self.register_buffer("amm", None, persistent=False)
        self.amm_variant = None  # of the AMM built
        self.padded_weights = {}  # (parameter name, width) -> KeptTensor

    def set_amm(self, enabled, variant=DEFAULT_AMM_VARIANT):
        """Turns the AMM of this block on or off; the matrix is built once and kept as a buffer."""
        if not enabled:
            self.amm = None
        elif self.amm is None or variant != self.amm_variant:
            device = self.qkv.weight.device
            self.amm = attention_modulation_matrix(self.grid_size, variant).to(device)
            self.amm_variant = variant

    def amm_active(self):
        # The mode first: a compiled training block then never reads the AMM buffer, so blocks with
        # and without one share a graph.
        return (self.amm_in_training or not self.training) and self.amm is not None

    def amm_for(self, token_ids):
        """The AMM this forward multiplies by: None outside active AMM blocks, (T, T) over the
        whole grid, (B, 1, L, L) over the tokens present."""
        if not self.amm_active():
            return None
        return self.amm if token_ids is None else gather_token_pairs(self.amm, token_ids)

    def kernel_choice(self, x):
        """The kernel and head width for attention over x (B, T, C) in the current mode."""
        if not self.fast:
            return KernelChoice(EXPLICIT, self.head_dim)
        grad_enabled = torch.is_grad_enabled()
        bias_needs_grad = (self.rel_pos_bias is not None and grad_enabled
                           and self.rel_pos_bias.relative_position_bias_table.requires_grad)
        return choose_attention_kernel(x.device.type, compute_dtype(x), self.head_dim, amm=self.amm_active(),
                                       bias_needs_grad=bias_needs_grad, grad_enabled=grad_enabled)

    def forward(self, x, token_ids=None):
        """x: (B, T, C); token_ids: optional (B, T) grid positions of x's tokens, when only
        some of the grid's tokens are present (MDT's masked training)."""
        B, T, _ = x.shape
        choice = self.kernel_choice(x)
        width = choice.head_width
        qkv = self.project_qkv(x, width).view(B, T, 3, self.num_heads, width)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, T, width)
        bias = None
        if self.rel_pos_bias is not None:  # (1 or B, heads, T, T)
            bias = self.rel_pos_bias(token_ids, dtype=q.dtype if choice.kernel == SDPA else None)
        if choice.kernel == SDPA:
            x = sdpa_attention(q, k, v, bias, self.scale)
        elif choice.kernel == AMM_LSE:
            x = amm_attention(q, k, v, bias, self.amm_for(token_ids), self.scale)
        elif choice.kernel == FLEX:
            x = flex_inference_attention(q, k, v, bias, self.amm_for(token_ids), self.scale)
        elif choice.kernel == TRITON:
            x = triton_inference_attention(q, k, v, bias, self.amm_for(token_ids), self.scale)
        else:
            in_place = self.fast and not torch.is_grad_enabled()
            x = explicit_attention(q, k, v, bias, self.amm_for(token_ids), self.scale, in_place)
        x = x.transpose(1, 2).reshape(B, T, self.num_heads * width)
        return self.project_output(x, width)  # (B, T, C)

    def project_qkv(self, x, width):
        """(B, T, C) -> (B, T, 3 heads width), each head's q, k and v zero-padded to width."""
        if width == self.head_dim:
            return self.qkv(x)
        weight = self.padded("qkv.weight", self.qkv.weight, axis=0, width=width)
        bias = self.padded("qkv.bias", self.qkv.bias, axis=0, width=width)
        return F.linear(x, weight, bias)

    def project_output(self, x, width):
        """(B, T, heads width) -> (B, T, C); the padding channels meet zero weight columns."""
        if width == self.head_dim:
            return self.proj(x)
        return F.linear(x, self.padded("proj.weight", self.proj.weight, axis=1, width=width), self.proj.bias)

    def padded(self, name, parameter, axis, width):
        """The parameter with zero-padded heads: derived anew under autograd (its gradient flows
        to the parameter) and under torch.compile, else kept until the parameter changes, in
        autocast's dtype under autocast."""
        dtype = inference_autocast_dtype(parameter.device.type)

        def derive():
            return as_autocast_casts((pad_heads(parameter, axis, self.head_dim, width),), dtype)[0]
        kept = self.padded_weights.setdefault((name, width), KeptTensor())
        return kept.get_at_inference(parameter, derive, context=dtype)
