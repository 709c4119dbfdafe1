"""Feature extraction: ImageFolder images -> center crop -> VAE latents (or pixels) of each
image and of its horizontal flip, written shard by shard (layout in latents/shards.py).

Everything stored depends only on the image, its global index and the global seed: the
posterior noise of image i comes from a generator seeded with (seed, i), so the output is the
same for any number of processes and any batch size.
"""
import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from tqdm import tqdm

from latents.shards import write_shard
from runtime.seeding import item_generator
from runtime.transforms import center_crop_arr

# What PIL raises for unreadable, truncated or malformed image files.
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
PIXEL_CHANNELS = 3


class BadImageError(Exception):
    def __init__(self, path, reason):
        super().__init__(f"cannot read image {path}: {reason}")
        self.path = path
        self.reason = reason


#################################################################################
#                                Image source                                   #
#################################################################################

@dataclass(frozen=True)
class ImageSource:
    root: str
    samples: list  # [(path, class index)] in ImageFolder order: sorted classes, sorted files
    class_to_idx: dict
    fingerprint: str  # changes when any file name or label changes

    def relative_path(self, index):
        return os.path.relpath(self.samples[index][0], self.root)


def load_image_source(root):
    """Lists the images of an ImageFolder tree (class index = sorted position, as torchvision)."""
    folder = ImageFolder(root)
    digest = hashlib.sha256()
    for path, label in folder.samples:
        digest.update(f"{os.path.relpath(path, root)}\t{label}\n".encode())
    return ImageSource(root, folder.samples, folder.class_to_idx, digest.hexdigest())


class CenterCroppedImages(Dataset):
    """Item i: (i, uint8 (S, S, 3) array or None, None or why the file could not be read)."""

    def __init__(self, samples, image_size):
        self.samples = samples
        self.image_size = image_size

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path = self.samples[index][0]
        try:
            with Image.open(path) as image:
                return index, np.asarray(center_crop_arr(image, self.image_size)), None
        except UNREADABLE_IMAGE_ERRORS as error:
            return index, None, f"{type(error).__name__}: {error}"


@dataclass
class ImageBatch:
    indices: list  # global indices of the readable images
    pixels: torch.Tensor  # (B, S, S, 3) uint8
    failures: list  # [(global index, reason)]


def collate_images(items):
    readable = [(index, array) for index, array, _ in items if array is not None]
    failures = [(index, reason) for index, array, reason in items if array is None]
    pixels = torch.from_numpy(np.stack([array for _, array in readable])) if readable else None
    return ImageBatch([index for index, _ in readable], pixels, failures)


#################################################################################
#                               Feature encoders                                #
#################################################################################

def to_model_input(pixels):
    """uint8 (B, S, S, 3) -> float32 (B, 3, S, S) in [-1, 1]."""
    return pixels.permute(0, 3, 1, 2).float() / 127.5 - 1


def with_flips(images):
    """(B, 3, S, S) -> (2B, 3, S, S): image 0, its flip, image 1, its flip, ..."""
    return torch.stack([images, images.flip(-1)], dim=1).flatten(0, 1)


def posterior_noise(seed, indices, latent_shape):
    """(2B, C, h, w): standard normal noise for each image and its flip, drawn on the CPU from a
    per-image generator so it is the same on every device and in every batch."""
    noise = [torch.randn((2, *latent_shape), generator=item_generator(seed, index)) for index in indices]
    return torch.cat(noise)


def make_feature_encoder(vae, image_size, seed, device, normalise=True):
    """Returns (encode, feature_shape); encode(pixels uint8 (B, S, S, 3), global indices)
    gives float16 numpy (B, 2, *feature_shape): the image and its flip.

    vae: a runtime.vae.LatentVAE, whose latents are stored normalised by its config's factors,
    or raw with `normalise` False; None stores the pixels themselves, in [-1, 1] (pixel-space
    training)."""
    if vae is None:
        feature_shape = (PIXEL_CHANNELS, image_size, image_size)

        def encode(pixels, indices):
            features = with_flips(to_model_input(pixels))
            return features.reshape(len(indices), 2, *feature_shape).half().numpy()
    else:
        feature_shape = vae.latent_shape(image_size)

        def encode(pixels, indices):
            images = with_flips(to_model_input(pixels)).to(device)
            noise = posterior_noise(seed, indices, feature_shape).to(device)
            latents = vae.sample_latents(images, noise)  # (2B, C, h, w)
            if normalise:
                latents = vae.norm.normalise(latents)
            return latents.reshape(len(indices), 2, *feature_shape).half().cpu().numpy()
    return encode, feature_shape


#################################################################################
#                                Extraction loop                                #
#################################################################################

class ShardBuffer:
    """Collects the batches of one shard until it can be written."""

    def __init__(self, spec):
        self.spec = spec
        self.features = []
        self.labels = []
        self.skipped = []

    def add(self, features, labels):
        self.features.append(features)
        self.labels.extend(labels)

    def write(self, features_path, feature_shape, settings):
        features = (np.concatenate(self.features) if self.features
                    else np.empty((0, 2, *feature_shape)))
        write_shard(features_path, self.spec, features, np.array(self.labels),
                    self.skipped, settings)


def extract_shards(specs, source, image_size, encode, feature_shape, features_path, settings,
                   batch_size, num_workers, skip_bad_images, logger, show_progress):
    """Computes and writes the shards `specs`. Batches never cross a shard boundary.

    An unreadable image raises BadImageError, or with skip_bad_images is logged, left out and
    recorded in its shard; the shards finished before it stay valid.
    """
    batches = [(spec, range(start, min(start + batch_size, spec.stop)))
               for spec in specs for start in range(spec.start, spec.stop, batch_size)]
    loader = DataLoader(CenterCroppedImages(source.samples, image_size),
                        batch_sampler=[indices for _, indices in batches],
                        num_workers=num_workers, collate_fn=collate_images)
    progress = tqdm(total=sum(spec.size for spec in specs), unit="img", disable=not show_progress)
    buffer = None
    for (spec, indices), batch in zip(batches, loader):
        if buffer is None:
            buffer = ShardBuffer(spec)
        for index, reason in batch.failures:
            if not skip_bad_images:
                raise BadImageError(source.samples[index][0], reason)
            logger.warning(f"skipping unreadable image {source.samples[index][0]}: {reason}")
            buffer.skipped.append({"index": index, "path": source.relative_path(index),
                                   "error": reason})
        if batch.indices:
            buffer.add(encode(batch.pixels, batch.indices),
                       [source.samples[index][1] for index in batch.indices])
        progress.update(len(indices))
        if indices[-1] == spec.stop - 1:
            buffer.write(features_path, feature_shape, settings)
            buffer = None
    progress.close()
