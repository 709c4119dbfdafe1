"""Extracted features: the shard files (shards.py), their extraction (extract.py) and the
training dataset that reads them (dataset.py)."""
from latents.dataset import LatentDataset

__all__ = ["LatentDataset"]
