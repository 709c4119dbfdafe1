"""Samples of chosen classes with AMM in some blocks and without, from the same noise: image k
of both sets uses the generator of (seed, k), so the two differ by the AMM alone."""
import numpy as np
import torch

from .images import enlarge, make_grid, side_by_side
from .sampler import sample_images


def sample_labels(sample, vae, seed, labels, batch_size, num_classes):
    """uint8 (N, H, W, 3): image k of class labels[k] from the noise of (seed, k)."""
    labels = torch.as_tensor(labels)
    indices = list(range(len(labels)))
    batches = sample_images(sample, vae, seed, indices, batch_size, num_classes, labels)
    return np.concatenate([images for _, images in batches])


def sample_with_and_without_amm(sample, loaded, amm_blocks, seed, labels, batch_size):
    """(with AMM in `amm_blocks`, without AMM): two uint8 (N, H, W, 3) from the same noise.
    Leaves loaded.model without AMM."""
    results = []
    for blocks in (amm_blocks, []):
        loaded.model.set_amm_blocks(blocks)
        results.append(sample_labels(sample, loaded.vae, seed, labels, batch_size, loaded.num_classes))
    return tuple(results)


def comparison_image(with_amm, without_amm, columns, zoom=1):
    """Both sets as grids of `columns`, with AMM on the left, enlarged `zoom` times."""
    rows = -(-len(with_amm) // columns)
    grids = [make_grid(images, rows, columns) for images in (with_amm, without_amm)]
    return enlarge(side_by_side(*grids), zoom)
