"""MDTv2 (Gao et al., Masked Diffusion Transformer v2), the EDT paper's main baseline, with EDT's
Attention Modulation Matrix as a plug-in.

The state dict is MDTv2's (sail-sg/MDT, the `mdt_xl2_v2_ckpt.pt` format), so its released
checkpoints load with strict=True. As in EDT's copy of MDTv2 with the AMM, AMM blocks modulate
their attention in eval mode only.
"""
import math

import torch
import torch.nn as nn

from .attention import DEFAULT_AMM_VARIANT
from .blocks import AdaLNBlock, FinalLayer, GuidedDiffusionModel, resolve_amm_blocks, unpatchify, zero_module_output
from .onednn import PackedLinear

TRAINING_MASK_RATIO = 0.3  # MDT's published training setting (its run.sh: --mask_ratio 0.30)
MASK_RATIO_SPREAD = 0.2  # masked training drops mask_ratio + U(0, 0.2) of the tokens
MEAN_KEPT_FRACTION = 1 - TRAINING_MASK_RATIO - MASK_RATIO_SPREAD / 2  # of the tokens, at the training setting
MASK_TOKEN_STD = 0.02
DIFFUSION_STEPS = 1000
GUIDANCE_SCALE_POWER = 4.0


def power_cosine_guidance_scale(cfg_scale, t, diffusion_steps=DIFFUSION_STEPS, scale_pow=GUIDANCE_SCALE_POWER):
    """MDT's guidance schedule, (N,) timesteps -> (N,) scales: 1 at t = diffusion_steps, rising
    to cfg_scale at t = 0, (cfg_scale - 1) (1 - cos(pi (1 - t / steps) ** scale_pow)) / 2 + 1."""
    rise = (1 - torch.cos((1 - t / diffusion_steps) ** scale_pow * math.pi)) / 2
    return (cfg_scale - 1) * rise + 1


def random_token_subset(x, mask_ratio):
    """MAE's per-sample random masking of x (N, T, D): keeps int(T (1 - mask_ratio)) tokens, those
    with the smallest uniform draws. Returns the kept tokens (N, L, D), their grid positions
    ids_keep (N, L), ids_restore (N, T) that puts [kept, dropped] back in grid order, and the
    mask (N, T), 1 where a token was dropped."""
    N, T, D = x.shape
    num_kept = int(T * (1 - mask_ratio))
    ids_shuffle = torch.argsort(torch.rand(N, T, device=x.device), dim=1)  # ascending: the first are kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :num_kept]
    kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))  # (N, L, D)
    mask = (ids_restore >= num_kept).to(x.dtype)  # (N, T)
    return kept, ids_keep, ids_restore, mask


#################################################################################
#                                 MDT Block                                     #
#################################################################################

class MDTBlock(AdaLNBlock):
    """An adaLN-Zero block with MDT's relative position bias; a block with `skip` first fuses a
    long skip into its input: skip_linear([x, skip]), (N, T, 2D) -> (N, T, D)."""

    def __init__(self, dim, num_heads, grid_size, mlp_ratio=4.0, skip=False):
        super().__init__(dim, num_heads, grid_size, dim, mlp_ratio, bias_layout="mdt")
        self.skip_linear = PackedLinear(2 * dim, dim) if skip else None

    def forward(self, x, modulation, skip=None, token_ids=None):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))  # (N, T, D)
        return super().forward(x, modulation, token_ids)  # (N, T, D)


#################################################################################
#                               Core MDTv2 Model                                #
#################################################################################

class MDTv2(GuidedDiffusionModel):
    """An encoder of (depth - decode_layer) // 2 "in" blocks and as many "out" blocks, each
    fed the output of its mirror "in" block as a long skip, then `decode_layer` decoder blocks,
    each fed the embedded input tokens. `blocks` is the flat list in that order, which AMM
    block indices refer to; the side-interpolater block (`sideblocks`) runs in masked training only.

    mask_ratio: None builds a model that cannot be trained masked (its mask token is frozen).
    """

    masked_training_flag = "enable_mask"
    masking_keeps_shapes = False  # the masked pass keeps a random number of tokens

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=True,
        mask_ratio=None,
        decode_layer=4,
        amm_blocks=(),
        amm_variant=DEFAULT_AMM_VARIANT,
        fast_paths=True,
    ):
        super().__init__()
        decode_layer = int(decode_layer)
        half_depth = (depth - decode_layer) // 2
        if half_depth < 1 or decode_layer < 0:
            raise ValueError(f"MDTv2 needs depth - decode_layer >= 2, got depth {depth}, decode_layer {decode_layer}")
        grid = self.build_embedders(input_size, patch_size, in_channels, hidden_size, num_classes,
                                    class_dropout_prob, learn_sigma, learnable_pos_embed=True)
        self.mask_ratio = None if mask_ratio is None else float(mask_ratio)
        self.decode_layer = decode_layer

        def make_blocks(count, skip):
            return nn.ModuleList([MDTBlock(hidden_size, num_heads, grid, mlp_ratio, skip) for _ in range(count)])

        self.en_inblocks = make_blocks(half_depth, skip=False)
        self.en_outblocks = make_blocks(half_depth, skip=True)
        self.de_blocks = make_blocks(decode_layer, skip=True)
        self.sideblocks = make_blocks(1, skip=False)
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.decoder_pos_embed = nn.Parameter(self.pos_embed.detach().clone())
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size), requires_grad=self.mask_ratio is not None)
        self.initialize_weights()
        self.set_amm_blocks(amm_blocks, amm_variant)
        self.set_fast_paths(fast_paths)

    @property
    def blocks(self):
        return [*self.en_inblocks, *self.en_outblocks, *self.de_blocks]

    def initialize_weights(self):
        super().initialize_weights()
        for block in self.sideblocks:
            zero_module_output(block.adaLN_modulation[-1])
        if self.mask_ratio is not None:
            nn.init.normal_(self.mask_token, std=MASK_TOKEN_STD)

    def forward(self, x, t, y, enable_mask=False):
        """
        x: (N, C, H, W) latents; t: (N,) timesteps; y: (N,) class labels.
        enable_mask: masked training, a random subset of the tokens goes through the encoder.
        """
        if enable_mask and self.mask_ratio is None:
            raise ValueError("enable_mask needs an MDTv2 built with a mask_ratio")
        x = self.embed_patches(x)  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (N, D)
        # The side block runs only in masked training; an unused modulation would give its
        # weights zero gradients, which Adan's moments would count as a step.
        modules = [module for module in self.modulated_modules if enable_mask or module not in self.sideblocks]
        modulation = self.modulations(c, modules)  # {module: (N, k D)}
        input_tokens = x
        ids_keep = None
        if enable_mask:
            mask_ratio = self.mask_ratio + MASK_RATIO_SPREAD * torch.rand(1, device=x.device)
            x, ids_keep, ids_restore, mask = random_token_subset(x, mask_ratio)  # (N, L, D)
        skips = []
        for block in self.en_inblocks:
            x = block(x, modulation[block], token_ids=ids_keep)  # (N, L, D)
            skips.append(x)
        for block in self.en_outblocks:
            x = block(x, modulation[block], skip=skips.pop(), token_ids=ids_keep)  # (N, L, D)
        if enable_mask:
            x = self.interpolate_dropped_tokens(x, modulation, ids_restore, mask)  # (N, T, D)
        else:
            x = x + self.decoder_pos_embed
        for block in self.de_blocks:
            x = block(x, modulation[block], skip=input_tokens)  # (N, T, D)
        x = self.final_layer(x, modulation[self.final_layer])  # (N, T, patch_size ** 2 * out_channels)
        return unpatchify(x, self.patch_size, self.out_channels)  # (N, out_channels, H, W)

    def interpolate_dropped_tokens(self, x, modulation, ids_restore, mask):
        """The side-interpolater: (N, L, D) kept tokens -> (N, T, D), mask tokens in the dropped
        places, all in grid order; the side block's output replaces the dropped tokens only.
        modulation: the forward's {module: modulation}."""
        N, kept, D = x.shape
        mask_tokens = self.mask_token.expand(N, ids_restore.shape[1] - kept, D)
        x = torch.cat([x, mask_tokens], dim=1).gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, D))
        x = x + self.decoder_pos_embed  # (N, T, D)
        interpolated = x
        for block in self.sideblocks:
            interpolated = block(interpolated, modulation[block])
        dropped = mask.unsqueeze(-1)  # (N, T, 1)
        return interpolated * dropped + (1 - dropped) * x

    def forward_with_cfg(self, x, t, y, cfg_scale, diffusion_steps=DIFFUSION_STEPS, scale_pow=GUIDANCE_SCALE_POWER,
                         cfg_channels=3):
        """GuidedDiffusionModel.forward_with_cfg with MDT's power-cosine guidance schedule: the
        scale of image i follows its timestep t[i] (power_cosine_guidance_scale)."""
        half_t = t[: len(x) // 2]
        scale = power_cosine_guidance_scale(cfg_scale, half_t, diffusion_steps, scale_pow)
        return self.guided_forward(x, t, y, scale.view(-1, 1, 1, 1), cfg_channels)


#################################################################################
#                                  MDTv2 Configs                                #
#################################################################################

MDT_SIZES = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}

# The AMM arrangement the EDT authors published for MDTv2: block 8 (the first decoder block) of
# MDTv2-S/2 at 256x256, for cfg 1 and 3.8.
MDT_AMM_PRESETS = {
    "MDTv2-S/2": {"default": (8,)},
}


def mdt_constructor(name, size):
    def build(amm_blocks=(), **kwargs):
        amm_blocks = resolve_amm_blocks(name, amm_blocks, MDT_AMM_PRESETS.get(name, {}))
        return MDTv2(patch_size=2, amm_blocks=amm_blocks, **{**MDT_SIZES[size], **kwargs})
    return build


MDT_models = {f"MDTv2-{size}/2": mdt_constructor(f"MDTv2-{size}/2", size) for size in MDT_SIZES}
