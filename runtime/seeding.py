"""Per-item random streams: an item's randomness depends only on (global seed, item index), so
results do not depend on the number of processes or the batch size."""
import numpy as np
import torch


def item_seed(global_seed, index):
    """A well-mixed 64-bit generator seed for one item (image, sample) of a run."""
    low, high = np.random.SeedSequence([global_seed, index]).generate_state(2, dtype=np.uint32)
    return int(high) << 32 | int(low)


def item_generator(global_seed, index):
    """A CPU torch.Generator for one item; draw on the CPU and move, so every device agrees."""
    return torch.Generator().manual_seed(item_seed(global_seed, index))
