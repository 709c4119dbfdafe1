"""DiT (Peebles & Xie) with EDT's Attention Modulation Matrix as a plug-in.

The state dict is the official DiT one, so the released DiT checkpoints load with strict=True.
Unlike EDT, a DiT AMM block modulates its attention in training as well as in evaluation, as
the reference plug-in does.
"""
import torch.nn as nn

from .attention import DEFAULT_AMM_VARIANT
from .blocks import AdaLNBlock, FinalLayer, GuidedDiffusionModel, resolve_amm_blocks, unpatchify


class DiT(GuidedDiffusionModel):
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
        amm_blocks=(),
        amm_variant=DEFAULT_AMM_VARIANT,
        fast_paths=True,
    ):
        super().__init__()
        grid = self.build_embedders(input_size, patch_size, in_channels, hidden_size, num_classes,
                                    class_dropout_prob, learn_sigma)
        self.blocks = nn.ModuleList([
            AdaLNBlock(hidden_size, num_heads, grid, hidden_size, mlp_ratio,
                       relative_bias=False, amm_in_training=True)
            for _ in range(depth)
        ])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()
        self.set_amm_blocks(amm_blocks, amm_variant)
        self.set_fast_paths(fast_paths)

    def forward(self, x, t, y):
        """x: (N, C, H, W) latents; t: (N,) timesteps; y: (N,) class labels."""
        x = self.embed_patches(x)  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (N, D)
        modulation = self.modulations(c, self.modulated_modules)  # {module: (N, k D)}
        for block in self.blocks:
            x = block(x, modulation[block])  # (N, T, D)
        x = self.final_layer(x, modulation[self.final_layer])  # (N, T, patch_size ** 2 * out_channels)
        return unpatchify(x, self.patch_size, self.out_channels)  # (N, out_channels, H, W)


#################################################################################
#                                   DiT Configs                                 #
#################################################################################

DIT_SIZES = {
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
DIT_PATCH_SIZES = (2, 4, 8)

# AMM arrangements the EDT authors published for DiT at 256x256 (latent 32x32).
DIT_AMM_PRESETS = {
    "DiT-S/2": {"default": (8, 10)},
    "DiT-XL/2": {"default": (15, 17, 19, 22, 24)},
}


def dit_constructor(name, size, patch_size):
    def build(amm_blocks=(), **kwargs):
        amm_blocks = resolve_amm_blocks(name, amm_blocks, DIT_AMM_PRESETS.get(name, {}))
        return DiT(patch_size=patch_size, amm_blocks=amm_blocks, **{**DIT_SIZES[size], **kwargs})
    return build


DiT_models = {
    f"DiT-{size}/{patch}": dit_constructor(f"DiT-{size}/{patch}", size, patch)
    for size in DIT_SIZES for patch in DIT_PATCH_SIZES
}
