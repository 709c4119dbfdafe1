"""A straightforward timm-style DiT, the yardstick for our DiT's speed.

Built from timm's `Attention`, `Mlp` and `PatchEmbed` the way the original DiT code is, with the
same configuration as our DiT of the same name, so that any speed difference is the
implementation's. Only the benchmark builds it; it loads no checkpoint.
"""
import torch
import torch.nn as nn
from timm.models.vision_transformer import Attention, Mlp, PatchEmbed

from models.blocks import LAYER_NORM_EPS, FinalLayer, gated_residual, modulate, unpatchify
from models.dit import DiT_models
from models.embeddings import LabelEmbedder, TimestepEmbedder, sincos_buffer


class PlainDiTBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        # The original DiT's two-pass modulation and residuals (ours fuse each into one multiply-add).
        attention_input = modulate(self.norm1(x), shift_msa, scale_msa, fused=False)
        x = gated_residual(x, gate_msa, self.attn(attention_input), fused=False)
        mlp_input = modulate(self.norm2(x), shift_mlp, scale_mlp, fused=False)
        x = gated_residual(x, gate_mlp, self.mlp(mlp_input), fused=False)
        return x  # (N, T, C)


class PlainDiT(nn.Module):
    def __init__(self, input_size, patch_size, hidden_size, depth, num_heads, in_channels=4,
                 mlp_ratio=4.0, num_classes=1000, class_dropout_prob=0.1):
        super().__init__()
        self.patch_size = patch_size
        self.out_channels = 2 * in_channels
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.register_buffer("pos_embed", sincos_buffer(hidden_size, input_size // patch_size))
        self.blocks = nn.ModuleList([PlainDiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.final_layer.fast = False

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (N, D)
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, self.final_layer.adaLN_modulation(c))  # (N, T, p * p * out_channels)
        return unpatchify(x, self.patch_size, self.out_channels)  # (N, out_channels, H, W)

    def forward_with_cfg(self, x, t, y, cfg_scale, cfg_channels=3):
        """Guidance on the first cfg_channels output channels, as our models do by default."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half]), t, y)  # (2N, C_out, H, W)
        eps, rest = out[:, :cfg_channels], out[:, cfg_channels:]
        cond, uncond = eps.chunk(2)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided]), rest], dim=1)


def plain_dit_like(name, input_size):
    """The plain DiT with the configuration of our registered DiT `name` (e.g. "DiT-S/2")."""
    reference = DiT_models[name](input_size=input_size)
    attention = reference.blocks[0].attn
    return PlainDiT(input_size, reference.patch_size, attention.proj.in_features, len(reference.blocks),
                    attention.num_heads)
