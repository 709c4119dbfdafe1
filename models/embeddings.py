"""Input embeddings shared by EDT and DiT: patches, timesteps, class labels, sin-cos positions."""
import math

import torch
import torch.nn as nn

from .onednn import PackedLinear

TIMESTEP_FREQUENCY_DIM = 256
MAX_PERIOD = 10000


#################################################################################
#                        Patch, Timestep and Label Embedders                    #
#################################################################################

class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: (N, C, H, W) -> (N, T, D), T = (H / p) * (W / p)."""

    def __init__(self, patch_size, in_channels, hidden_size):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D), tokens in row-major order


class TimestepEmbedder(nn.Module):
    """Sinusoidal frequency features of t followed by a two-layer MLP."""

    def __init__(self, hidden_size):
        super().__init__()
        self.mlp = nn.Sequential(
            PackedLinear(TIMESTEP_FREQUENCY_DIM, hidden_size),
            nn.SiLU(),
            PackedLinear(hidden_size, hidden_size),
        )

    @staticmethod
    def frequency_features(t, dim=TIMESTEP_FREQUENCY_DIM):
        """(N,) float or int timesteps -> (N, dim) features [cos(t w_i), sin(t w_i)]."""
        half = dim // 2
        exponents = torch.arange(half, dtype=torch.float32, device=t.device) / half
        freqs = torch.exp(-math.log(MAX_PERIOD) * exponents)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t):
        features = self.frequency_features(t).to(self.mlp[0].weight.dtype)
        return self.mlp(features)  # (N, D)


class LabelEmbedder(nn.Module):
    """Class labels to vectors; row `num_classes` is the null class used for classifier-free
    guidance, and labels are replaced by it with probability `dropout_prob` in training."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + self.has_null_class, hidden_size)

    @property
    def has_null_class(self):
        """Without label dropout there is no null class, and so no classifier-free guidance."""
        return self.dropout_prob > 0

    def drop_labels(self, labels, force_drop_ids=None):
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, self.num_classes, labels)

    def forward(self, labels, force_drop_ids=None):
        if (self.training and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.drop_labels(labels, force_drop_ids)
        return self.embedding_table(labels)  # (N, D)


#################################################################################
#                        Sine/Cosine Positional Embedding                       #
#################################################################################

def sincos_1d(dim, positions):
    """(P,) positions -> (P, dim) features [sin(p w_i), cos(p w_i)], w_i = 10000^(-i / (dim/2))."""
    omega = 1.0 / MAX_PERIOD ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    args = positions.double()[:, None] * omega[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def sincos_2d(dim, grid_size):
    """Fixed 2-D position table (grid_size ** 2, dim) for tokens in row-major order: the first
    half of the channels encodes each token's column, the second half its row (MAE layout)."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    coords = torch.arange(grid_size)
    rows = coords.repeat_interleave(grid_size)  # (T,)
    cols = coords.repeat(grid_size)  # (T,)
    table = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)
    return table.float()


def sincos_buffer(dim, grid_size):
    return sincos_2d(dim, grid_size).unsqueeze(0)  # (1, T, D)
