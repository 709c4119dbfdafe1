"""The training dataset over extracted features: memory-mapped shards, random flip per epoch."""
import numpy as np
import torch
from torch.utils.data import Dataset

from latents.shards import class_names, manifest_latent_norm, open_shard, read_manifest


class LatentDataset(Dataset):
    """Item i: (float32 latent (C, h, w), int64 label) of the i-th stored image.

    The stored latent of the image or of its horizontal flip is chosen by a table drawn from
    (seed, epoch): the same in every DataLoader worker and every process, different each epoch.
    Call `set_epoch` before each epoch. seed None draws a fresh one. `unconditional` labels
    every item 0 (the one class of an unconditional model). Latents stored raw
    (`normalised_on_read`, --latent-norm channel) are normalised here.

    The shards are memory-mapped lazily in each process and never pickled, so DataLoader
    workers start cheaply under any multiprocessing start method.
    """

    def __init__(self, features_path, seed=None, random_flip=True, unconditional=False):
        self.features_path = features_path
        self.manifest = read_manifest(features_path)
        self.labels = np.concatenate([labels for _, labels in self.open_shards()])  # (N,) int64
        if unconditional:
            self.labels = np.zeros_like(self.labels)
        # shard_ends[k] = number of items in shards 0..k
        self.shard_ends = np.cumsum([shard["count"] for shard in self.manifest["shards"]])
        self.features = None
        self.seed = np.random.SeedSequence().entropy if seed is None else seed
        self.random_flip = random_flip
        self.read_norm = self.latent_norm if self.manifest.get("normalised_on_read") else None
        self.set_epoch(0)

    def open_shards(self):
        return [open_shard(self.features_path, shard) for shard in self.manifest["shards"]]

    def __getstate__(self):
        return {**self.__dict__, "features": None}

    def set_epoch(self, epoch):
        if self.random_flip:
            rng = np.random.default_rng([self.seed, epoch])
            self.flips = rng.integers(0, 2, size=len(self), dtype=np.int8)
        else:
            self.flips = np.zeros(len(self), dtype=np.int8)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        shard = int(np.searchsorted(self.shard_ends, index, side="right"))
        offset = index - (self.shard_ends[shard - 1] if shard else 0)
        if self.features is None:
            self.features = [features for features, _ in self.open_shards()]
        latent = torch.from_numpy(self.features[shard][offset, self.flips[index]].astype(np.float32))  # (C, h, w)
        if self.read_norm is not None:
            latent = self.read_norm.normalise(latent)
        return latent, torch.tensor(self.labels[index])

    @property
    def latent_shape(self):
        return tuple(self.manifest["latent_shape"])

    @property
    def num_classes(self):
        return len(self.manifest["class_to_idx"])

    @property
    def image_size(self):
        return self.manifest["image_size"]

    @property
    def class_names(self):
        return class_names(self.manifest)

    @property
    def latent_norm(self):
        """What turns the VAE's latents into the model's (runtime.latent_norm.LatentNorm); None for pixels."""
        return manifest_latent_norm(self.manifest)

    @property
    def vae(self):
        """"ema", "mse", another VAE's name, or "none" for pixels in [-1, 1]."""
        return self.manifest["vae"]
