"""Transformer building blocks shared by EDT and DiT: adaLN-Zero block, final layer, guidance."""
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import DEFAULT_AMM_VARIANT, Attention, check_amm_variant
from .embeddings import LabelEmbedder, PatchEmbed, TimestepEmbedder, sincos_buffer
from .fast_paths import FastPathSwitch
from .kept_tensor import KeptTensor, as_autocast_casts, inference_autocast_dtype
from .onednn import PackedLinear

LAYER_NORM_EPS = 1e-6
COMPILED_GRAPHS_PER_BLOCK = 64
# Devices where a forward with autograd stacks the modulation weights anew for one matmul: on a GPU
# the launches saved outweigh the copy; on the CPU the copy costs more (EDT-S/2, batch 16:
# forward and backward of the modulations 48 ms stacked, 29 ms one by one).
STACKED_MODULATION_TRAINING_DEVICES = ("cuda",)


def modulate(x, shift, scale, fused=True):
    """x (1 + scale) + shift, fused: one multiply-add instead of two passes; x: (N, T, C); shift, scale: (N, C).
    At inference under autocast the fused result is written in autocast's dtype: a Linear reads it
    next, and autocast would cast it there in a pass of its own, to the same values."""
    if not fused:
        return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
    dtype = inference_autocast_dtype(x.device.type)
    if dtype is None or x.dtype != torch.float32:
        return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1), out=out)


def gated_residual(x, gate, branch, fused=True):
    """x + gate * branch, fused: one multiply-add instead of two passes; x, branch: (N, T, C); gate: (N, C).
    The multiply-add reads a lower-precision branch as it is: CUDA's autocast would first cast it
    to x's float32 in a pass of its own, to the same values (the CPU's casts nothing here)."""
    if not fused:
        return x + gate.unsqueeze(1) * branch
    if x.device.type != "cuda" or not torch.is_autocast_enabled("cuda"):
        return torch.addcmul(x, gate.unsqueeze(1), branch)
    with torch.autocast(x.device.type, enabled=False):
        return torch.addcmul(x, gate.unsqueeze(1), branch)


def adaptive_modulation(cond_dim, out_dim):
    """SiLU then Linear(cond -> out); the Sequential keeps the released key `adaLN_modulation.1`."""
    return nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, out_dim))


def unpatchify(x, patch_size, channels):
    """(N, T, p * p * C) -> (N, C, H, W) for a square grid of T tokens."""
    N, T, _ = x.shape
    side = int(T ** 0.5)
    x = x.reshape(N, side, side, patch_size, patch_size, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(N, channels, side * patch_size, side * patch_size)


class Mlp(nn.Module):
    """Linear, tanh-GELU, Linear. On the fast path, CPU float32 inference fuses the GELU into the
    first Linear through oneDNN: ATen's tanh-GELU alone takes about as long as that matmul."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = PackedLinear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = PackedLinear(hidden_dim, dim)

    def forward(self, x):
        if self.fc1.uses_onednn(x):
            hidden = self.fc1.onednn_forward(x, activation="gelu_tanh")
        else:
            hidden = self.act(self.fc1(x))
        return self.fc2(hidden)


class AdaLNBlock(nn.Module, FastPathSwitch):
    """A transformer block with adaLN-Zero conditioning (DiT), over a grid_size x grid_size grid.
    Its forward takes its modulation, `adaLN_modulation(c)`, from the model's `modulations`."""

    def __init__(self, dim, num_heads, grid_size, cond_dim, mlp_ratio=4.0, **attention_kwargs):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, grid_size, **attention_kwargs)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = adaptive_modulation(cond_dim, 6 * dim)

    def forward(self, x, modulation, token_ids=None):
        """modulation: (N, 6C); token_ids: see Attention.forward."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)
        attended = self.attn(modulate(self.norm1(x), shift_msa, scale_msa, self.fast), token_ids)
        x = gated_residual(x, gate_msa, attended, self.fast)
        return gated_residual(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp, self.fast)),
                              self.fast)  # (N, T, C)


class FinalLayer(nn.Module, FastPathSwitch):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.linear = PackedLinear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = adaptive_modulation(hidden_size, 2 * hidden_size)

    def forward(self, x, modulation):
        """modulation: (N, 2C), `adaLN_modulation(c)`."""
        shift, scale = modulation.chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale, self.fast))  # (N, T, p * p * out)


def init_linear_layers(module):
    """Xavier-uniform weights and zero biases for every Linear; the patch conv like a Linear."""
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, nn.Conv2d):
            nn.init.xavier_uniform_(layer.weight.view(layer.weight.shape[0], -1))
            nn.init.zeros_(layer.bias)


def zero_module_output(linear):
    nn.init.zeros_(linear.weight)
    nn.init.zeros_(linear.bias)


def resolve_amm_blocks(model_name, amm_blocks, presets):
    """AMM block indices as given, or those of a preset name ("default", ...) in `presets`."""
    if not isinstance(amm_blocks, str):
        return amm_blocks
    if amm_blocks not in presets:
        raise ValueError(f"no AMM preset {amm_blocks!r} for {model_name}; pass explicit block indices")
    return presets[amm_blocks]


class GuidedDiffusionModel(nn.Module, FastPathSwitch):
    """What EDT, DiT and MDTv2 share as class-conditional diffusion transformers with
    `x_embedder`, `t_embedder`, `y_embedder`, AdaLNBlock `blocks` and a `final_layer`: weight
    initialisation, the adaLN modulations, classifier-free guidance and AMM control."""

    # The forward's keyword that turns on masked training (None: the model has none).
    masked_training_flag = None
    # The AMM function of AMM blocks ("256" or "512"); see set_amm_blocks.
    amm_variant = DEFAULT_AMM_VARIANT
    # Whether the forward takes `mask_start`, masking only part of the batch, so that a training
    # step can run its full-token and masked passes as one batch.
    fuses_masked_batch = False
    # Whether the masked training forward keeps its tensors' shapes (CUDA graphs of the training step).
    masking_keeps_shapes = True

    def __init__(self):
        super().__init__()
        self.kept_modulation_weights = {}  # ids of the modulation Linears -> KeptTensor

    def build_embedders(self, input_size, patch_size, in_channels, hidden_size, num_classes, class_dropout_prob,
                        learn_sigma, learnable_pos_embed=False):
        """Patch, timestep and label embedders and the sin-cos position table (fixed, or a
        parameter that starts from it); returns the token grid side."""
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.patch_size = patch_size
        grid = input_size // patch_size
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        if learnable_pos_embed:
            self.pos_embed = nn.Parameter(sincos_buffer(hidden_size, grid))
        else:
            self.register_buffer("pos_embed", sincos_buffer(hidden_size, grid))
        return grid

    def embed_patches(self, x):
        """(N, C, H, W) latents -> (N, T, D) tokens with their positions, in row-major memory. The
        patch convolution gives the tokens as a transposed view, and a sum takes the layout of its
        first operand that is not broadcast: so the position table comes first (the same values),
        and the blocks, their compiled graphs included, see one layout at every stage."""
        return self.pos_embed + self.x_embedder(x)  # (N, T, D), where T = H * W / patch_size ** 2

    def initialize_weights(self):
        init_linear_layers(self)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity (EDT's down and concat layers are not zeroed).
        for block in self.blocks:
            zero_module_output(block.adaLN_modulation[-1])
        zero_module_output(self.final_layer.adaLN_modulation[-1])
        zero_module_output(self.final_layer.linear)

    @functools.cached_property
    def modulated_modules(self):
        """The modules with an adaLN modulation, in registration order."""
        return [module for module in self.modules() if hasattr(module, "adaLN_modulation")]

    def modulations(self, c, modules):
        """{module: module.adaLN_modulation(c) (N, k C)} for each of `modules`, the ones this forward
        runs. On the fast path one SiLU and one matmul over the modules' stacked weights give them
        all: a model modulates the same c once per block and more (33 times in EDT-XL/2), each two
        to five kernel launches, and launches set the pace of small-batch steps on a GPU. Under
        autocast the fast path returns them in c's dtype, float32 like the residual stream they
        modulate: CUDA's autocast would otherwise cast two operands of every multiply-add."""
        if not self.fast or (torch.is_grad_enabled() and c.device.type not in STACKED_MODULATION_TRAINING_DEVICES):
            return {module: module.adaLN_modulation(c) for module in modules}
        linears = [module.adaLN_modulation[-1] for module in modules]
        weight, bias = self.stacked_weights(linears)
        stacked = F.linear(F.silu(c), weight, bias).to(c.dtype)  # (N, sum of k C)
        return dict(zip(modules, stacked.split([linear.out_features for linear in linears], dim=1)))

    def stacked_weights(self, linears):
        """(weight, bias) of the Linears stacked along their outputs: concatenated anew under
        autograd and torch.compile, else kept until one of them changes, in autocast's dtype
        under autocast."""
        dtype = inference_autocast_dtype(linears[0].weight.device.type)

        def derive():
            stacked = torch.cat([linear.weight for linear in linears]), torch.cat([linear.bias for linear in linears])
            return as_autocast_casts(stacked, dtype)
        kept = self.kept_modulation_weights.setdefault(tuple(map(id, linears)), KeptTensor())
        parameters = [parameter for linear in linears for parameter in (linear.weight, linear.bias)]
        return kept.get_at_inference(parameters, derive, context=dtype)

    @property
    def unconditional(self):
        """One class and no null class: trained without labels (train_mask_adan.py --unconditional)."""
        return self.y_embedder.num_classes == 1 and not self.y_embedder.has_null_class

    def forward_with_cfg(self, x, t, y, cfg_scale, cfg_channels=3):
        """Runs the first half of the batch twice, with the labels as given (conditional first,
        null labels second), and applies guidance to the first `cfg_channels` output channels
        (None: all). The remaining channels (e.g. the learned variance) pass through."""
        return self.guided_forward(x, t, y, cfg_scale, cfg_channels)

    def guided_forward(self, x, t, y, scale, cfg_channels):
        """forward_with_cfg with the guidance scale a number, or a tensor (N, 1, 1, 1) for the
        N images of the first half."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)  # (2N, C_out, H, W)
        guided, rest = (out, out[:, :0]) if cfg_channels is None else (out[:, :cfg_channels], out[:, cfg_channels:])
        cond, uncond = guided.chunk(2, dim=0)
        half_guided = uncond + scale * (cond - uncond)
        return torch.cat([torch.cat([half_guided, half_guided], dim=0), rest], dim=1)

    def set_amm_blocks(self, block_indices, variant=None):
        """Enables the AMM in exactly these blocks (flat indices into `self.blocks`), with the AMM
        function `variant` ("256" or "512"; None keeps the model's `amm_variant`)."""
        block_indices = sorted(set(block_indices or ()))
        if block_indices and not 0 <= block_indices[0] <= block_indices[-1] < len(self.blocks):
            raise ValueError(f"AMM block indices {block_indices} out of range for {len(self.blocks)} blocks")
        if variant is not None:
            self.amm_variant = check_amm_variant(variant)
        for index, block in enumerate(self.blocks):
            block.attn.set_amm(index in block_indices, self.amm_variant)

    @property
    def amm_blocks(self):
        return [index for index, block in enumerate(self.blocks) if block.attn.amm is not None]

    def compile_blocks(self):
        """torch.compile each transformer block in place (regional compilation): blocks of one
        shape and mode share a compiled graph, so a model compiles a few small graphs instead of
        one large one, and its parameter names and state dict stay as they are."""
        blocks = [module for module in self.modules() if isinstance(module, AdaLNBlock)]
        # One graph per block shape, AMM or not, training or not, and batch size (a second size
        # compiles one graph for all sizes): more than the default 8 per block for EDT.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILED_GRAPHS_PER_BLOCK)
        for block in blocks:
            block.compile()
        return self

    def set_fast_paths(self, enabled):
        """The fast paths (the default) or the plain path, the reference implementation's operations
        one by one; outputs agree to float rounding."""
        for module in self.modules():
            if isinstance(module, FastPathSwitch):
                module.fast = enabled
