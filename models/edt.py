"""EDT: a U-shaped diffusion transformer with token down/up-sampling, long skips, relative
position bias, the Attention Modulation Matrix and token relation-enhanced masked training."""
import itertools

import torch
import torch.nn as nn

from .blocks import (LAYER_NORM_EPS, AdaLNBlock, FinalLayer, GuidedDiffusionModel, adaptive_modulation, modulate,
                     resolve_amm_blocks, unpatchify)
from .embeddings import sincos_buffer
from .fast_paths import FastPathSwitch
from .onednn import PackedLinear

NUM_STAGES = 5  # down, down, middle, up, up
NUM_DOWN_STAGES = NUM_STAGES // 2
# Drop-probability ranges of the keep masks before the first and second down-sampling.
DOWN_MASK_RATIOS = ((0.4, 0.5), (0.1, 0.2))
# EDT-XL's extra mask in stage 0, before this block; dropped tokens become the position embedding.
STAGE0_MASK_RATIO = (0.15, 0.25)
DEFAULT_INPUT_SIZE = 32  # latent side of 256x256 images
LATENT_SIZE_512 = 64  # latent side of 512x512 images


def token_keep_mask(x, ratio_range, mask_start=0):
    """(N, T) mask (dtype of x: (N, T, C)) of kept tokens for samples mask_start..N-1; earlier
    samples keep every token. The drop probability p ~ U(ratio_range) is drawn once per call
    and a token is kept when its U(0, 1) draw is >= p. Draws stay on x's device."""
    low, high = ratio_range
    drop_prob = low + (high - low) * torch.rand((), device=x.device)
    masked = (torch.rand(x.shape[0] - mask_start, x.shape[1], device=x.device) >= drop_prob).to(x.dtype)
    return torch.cat([masked.new_ones(mask_start, x.shape[1]), masked]) if mask_start else masked


#################################################################################
#                     Token Down-sampling and Up-sampling                       #
#################################################################################

class DownSample(nn.Module, FastPathSwitch):
    """Merges each 2x2 group of tokens: (N, (2h)(2w), C) -> (N, h w, C_out), with AdaLN token
    enhancement before the reduction and the output grid's position embedding added after."""

    def __init__(self, dim, out_dim, grid_size, cond_dim):
        super().__init__()
        self.grid_size = grid_size
        self.norm = nn.LayerNorm(4 * dim, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.adaLN_modulation = adaptive_modulation(cond_dim, 8 * dim)
        self.reduction = PackedLinear(4 * dim, out_dim, bias=False)
        self.register_buffer("pos_embed", sincos_buffer(out_dim, grid_size // 2))

    def forward(self, x, modulation, keep=None):
        """modulation: (N, 8C), `adaLN_modulation(c)`; keep: optional (N, (2h)(2w)) mask of the
        input tokens (masked training)."""
        N, _, C = x.shape
        half = self.grid_size // 2
        # Sub-token order [row 0 col 0, row 1 col 0, row 0 col 1, row 1 col 1] is the released one.
        x = x.view(N, half, 2, half, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(N, half * half, 4 * C)
        shift, scale = modulation.chunk(2, dim=1)
        x = modulate(self.norm(x), shift, scale, self.fast)  # (N, h w, 4C)
        if keep is not None:
            keep = keep.view(N, half, 2, half, 2).permute(0, 1, 3, 4, 2).reshape(N, half * half, 4, 1)
            x = (x.view(N, half * half, 4, C) * keep).view(N, half * half, 4 * C)
        return self.reduction(x) + self.pos_embed  # (N, h w, C_out)


class UpSample(nn.Module):
    """Expands each token into a 2x2 group: (N, h w, C_in) -> (N, (2h)(2w), C_out)."""

    def __init__(self, dim, out_dim, grid_size):
        super().__init__()
        self.grid_size = grid_size
        self.expand = PackedLinear(dim, 4 * out_dim, bias=False)

    def forward(self, x):
        N = x.shape[0]
        g = self.grid_size
        x = self.expand(x)  # (N, h w, 4 C_out), channels ordered (p1, p2, c)
        x = x.view(N, g, g, 2, 2, -1).permute(0, 1, 3, 2, 4, 5)  # (N, h, p1, w, p2, C_out)
        return x.reshape(N, 4 * g * g, -1)


class ConcatLayer(nn.Module, FastPathSwitch):
    """Fuses up-sampled tokens with their long skip: (N, T, 2C) -> (N, T, C)."""

    def __init__(self, dim, grid_size, cond_dim):
        super().__init__()
        self.grid_size = grid_size
        self.norm_final = nn.LayerNorm(2 * dim, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.adaLN_modulation = adaptive_modulation(cond_dim, 4 * dim)
        self.cat = PackedLinear(2 * dim, dim)
        self.register_buffer("pos_embed", sincos_buffer(dim, grid_size))

    def forward(self, x, modulation):
        """modulation: (N, 4C), `adaLN_modulation(c)`."""
        shift, scale = modulation.chunk(2, dim=1)
        return self.cat(modulate(self.norm_final(x), shift, scale, self.fast)) + self.pos_embed


#################################################################################
#                                 Core EDT Model                                #
#################################################################################

class EDT(GuidedDiffusionModel):
    """Five stages at grids n, n/2, n/4, n/2, n (n = input_size / patch_size); `blocks` is the
    flat list of all transformer blocks in stage order, which AMM block indices refer to.

    amm_variant: the AMM function, "256" or "512"; None picks the release's for the image size
    (default_amm_variant).
    """

    masked_training_flag = "enable_down_mask"
    fuses_masked_batch = True

    def __init__(
        self,
        input_size=DEFAULT_INPUT_SIZE,
        patch_size=2,
        in_channels=4,
        dims=(312, 416, 520, 416, 312),
        num_heads=(6, 8, 10, 8, 6),
        depths=(2, 2, 2, 3, 3),
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=True,
        amm_blocks=(),
        amm_variant=None,
        stage0_mask_block=None,
        fast_paths=True,
    ):
        super().__init__()
        check_stage_config(input_size, patch_size, dims, num_heads, depths)
        hidden_size = dims[0]
        grid = self.build_embedders(input_size, patch_size, in_channels, hidden_size, num_classes,
                                    class_dropout_prob, learn_sigma)
        self.depths = tuple(depths)
        block_ends = list(itertools.accumulate(depths))
        self.stage_ranges = list(zip([0] + block_ends[:-1], block_ends))  # flat block indices per stage
        self.stage0_mask_block = stage0_mask_block

        self.blocks = nn.ModuleList()
        self.down_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        self.concat_blocks = nn.ModuleList()
        for stage, (dim, heads, depth) in enumerate(zip(dims, num_heads, depths)):
            if stage > NUM_DOWN_STAGES:
                self.up_blocks.append(UpSample(dims[stage - 1], dim, grid))
                grid *= 2
                self.concat_blocks.append(ConcatLayer(dim, grid, hidden_size))
            for _ in range(depth):
                self.blocks.append(AdaLNBlock(dim, heads, grid, hidden_size, mlp_ratio))
            if stage < NUM_DOWN_STAGES:
                self.down_blocks.append(DownSample(dim, dims[stage + 1], grid, hidden_size))
                grid //= 2
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()
        self.set_amm_blocks(amm_blocks, amm_variant or default_amm_variant(input_size))
        self.set_fast_paths(fast_paths)

    def forward(self, x, t, y, enable_down_mask=False, mask_start=0):
        """
        x: (N, C, H, W) latents; t: (N,) timesteps; y: (N,) class labels.
        enable_down_mask: masked training, tokens dropped before each down-sampling.
        mask_start: with enable_down_mask, only samples mask_start..N-1 are masked, so that a
            training step can run its full-token and masked passes as one batch.
        """
        x = self.embed_patches(x)  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (N, D)
        modulation = self.modulations(c, self.modulated_modules)  # {module: (N, k C)}
        skips = []
        for stage, (first, last) in enumerate(self.stage_ranges):
            if stage < NUM_DOWN_STAGES:
                skips.append(x)
            if stage > NUM_DOWN_STAGES:
                up = stage - NUM_DOWN_STAGES - 1
                x = torch.cat([self.up_blocks[up](x), skips.pop()], dim=-1)  # (N, T_stage, 2 C_stage)
                concat = self.concat_blocks[up]
                x = concat(x, modulation[concat])  # (N, T_stage, C_stage)
            for index in range(first, last):
                if enable_down_mask and stage == 0 and index == self.stage0_mask_block:
                    x = self.replace_dropped_tokens(x, mask_start)
                block = self.blocks[index]
                x = block(x, modulation[block])  # (N, T_stage, C_stage)
            if stage < NUM_DOWN_STAGES:
                keep = token_keep_mask(x, DOWN_MASK_RATIOS[stage], mask_start) if enable_down_mask else None
                down = self.down_blocks[stage]
                x = down(x, modulation[down], keep)  # (N, T_stage / 4, C_next)
        x = self.final_layer(x, modulation[self.final_layer])  # (N, T, patch_size ** 2 * out_channels)
        return unpatchify(x, self.patch_size, self.out_channels)  # (N, out_channels, H, W)

    def replace_dropped_tokens(self, x, mask_start):
        keep = token_keep_mask(x, STAGE0_MASK_RATIO, mask_start).unsqueeze(-1)  # (N, T, 1)
        return x * keep + (1 - keep) * self.pos_embed


def default_amm_variant(input_size):
    """The release's AMM function for this latent size: its "use for 512x512" one, 1.3 cos(f d),
    at latent 64 (512x512 images), exp(cos(f d)) / 2 at every other size."""
    return "512" if input_size == LATENT_SIZE_512 else "256"


def check_stage_config(input_size, patch_size, dims, num_heads, depths):
    if not len(dims) == len(num_heads) == len(depths) == NUM_STAGES:
        raise ValueError(f"EDT has {NUM_STAGES} stages: dims, num_heads and depths need {NUM_STAGES} entries each")
    if any(dims[i] != dims[-1 - i] for i in range(NUM_DOWN_STAGES)):
        raise ValueError(f"EDT stage widths must be symmetric for the long skips, got {tuple(dims)}")
    if any(dim % heads for dim, heads in zip(dims, num_heads)):
        raise ValueError(f"every stage width must be divisible by its head count: {tuple(dims)} / {tuple(num_heads)}")
    grid = input_size // patch_size
    if input_size % patch_size or grid % (2 ** NUM_DOWN_STAGES):
        raise ValueError(f"the token grid ({input_size}/{patch_size}) must be divisible by {2 ** NUM_DOWN_STAGES}")


#################################################################################
#                                   EDT Configs                                 #
#################################################################################

EDT_SIZES = {
    "S": dict(dims=(312, 416, 520, 416, 312), num_heads=(6, 8, 10, 8, 6), depths=(2, 2, 2, 3, 3)),
    "B": dict(dims=(624, 832, 1040, 832, 624), num_heads=(12, 16, 20, 16, 12), depths=(2, 2, 2, 3, 3)),
    "XL": dict(dims=(936, 1248, 1560, 1248, 936), num_heads=(18, 24, 30, 24, 18), depths=(6, 4, 4, 7, 7),
               stage0_mask_block=4),
}

# AMM block presets per size: "default" for cfg 1 to 1.5 (the released arrangement),
# "high_cfg" suggested for cfg >= 2 (S, B) or the alternative arrangement (XL).
EDT_AMM_PRESETS = {
    "S": {"default": (7, 10), "high_cfg": (8,)},
    "B": {"default": (7, 10), "high_cfg": (8,)},
    "XL": {"default": (23, 25), "high_cfg": (24,)},
}
# At 512x512 the release's S/B arrangement is block 10 (its "for edt-s 512x512" line, in the
# branch that S and B share); it gives none for XL, which keeps its 256x256 one.
EDT_512_AMM_PRESETS = {"S": {"default": (10,)}, "B": {"default": (10,)}, "XL": {}}


def edt_amm_presets(size, input_size):
    if input_size == LATENT_SIZE_512:
        return {**EDT_AMM_PRESETS[size], **EDT_512_AMM_PRESETS[size]}
    return EDT_AMM_PRESETS[size]


def edt_constructor(size, amm):
    def build(amm_blocks=None, **kwargs):
        presets = edt_amm_presets(size, kwargs.get("input_size", DEFAULT_INPUT_SIZE))
        if amm_blocks is None:
            amm_blocks = presets["default"] if amm else ()
        amm_blocks = resolve_amm_blocks(f"EDT-{size}/2", amm_blocks, presets)
        return EDT(patch_size=2, amm_blocks=amm_blocks, **{**EDT_SIZES[size], **kwargs})
    return build


EDT_models = {}
for _size in EDT_SIZES:
    EDT_models[f"EDT-{_size}/2"] = edt_constructor(_size, amm=True)
    EDT_models[f"EDT-{_size}/2_noAMM"] = edt_constructor(_size, amm=False)
