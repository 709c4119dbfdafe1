"""On-disk layout of extracted features: a few large shards plus a JSON manifest.

Shard k holds the images with global indices [k * shard_size, (k + 1) * shard_size) in
ImageFolder order, so its contents depend only on that range, never on how many processes
wrote it. Each shard is three files, each written under a temporary name and renamed:

    shard-00000.latents.npy   float16 (n, 2, C, h, w): [image, horizontal flip]
    shard-00000.labels.npy    int64 (n,)
    shard-00000.json          the record (range, count, skipped images, settings);
                              written last, so its presence marks a finished shard.

`manifest.json` is written once every shard is finished and lists them in order.
"""
import os
import re
from dataclasses import dataclass

import numpy as np

from runtime.io import atomic_path, read_json, write_json

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
FEATURE_DTYPE = np.float16
LABEL_DTYPE = np.int64


class SettingsMismatchError(ValueError):
    pass


#################################################################################
#                                 Shard plan                                    #
#################################################################################

@dataclass(frozen=True)
class ShardSpec:
    index: int
    start: int  # first global image index
    stop: int  # one past the last

    @property
    def size(self):
        return self.stop - self.start


def plan_shards(num_images, shard_size):
    return [ShardSpec(index, start, min(start + shard_size, num_images))
            for index, start in enumerate(range(0, num_images, shard_size))]


def shard_file(index, kind):
    """kind: "latents" or "labels" (.npy), or "record" (.json)."""
    stem = f"shard-{index:05d}"
    return f"{stem}.json" if kind == "record" else f"{stem}.{kind}.npy"


RECORD_NAME = re.compile(r"shard-(\d+)\.json")  # matches shard_file(index, "record")


#################################################################################
#                              Writing shards                                   #
#################################################################################

def write_shard(features_path, spec, features, labels, skipped, settings):
    """features: (n, 2, *feature_shape); labels: (n,); skipped: a list of
    {"index", "path", "error"} for the images of this range that could not be read."""
    assert len(features) == len(labels) == spec.size - len(skipped)
    for kind, array, dtype in (("latents", features, FEATURE_DTYPE), ("labels", labels, LABEL_DTYPE)):
        with atomic_path(os.path.join(features_path, shard_file(spec.index, kind))) as tmp:
            np.save(tmp, np.ascontiguousarray(array, dtype=dtype))
    record = {"index": spec.index, "start": spec.start, "stop": spec.stop, "count": len(labels),
              "latents": shard_file(spec.index, "latents"),
              "labels": shard_file(spec.index, "labels"),
              "skipped": skipped, "settings": settings}
    write_json(os.path.join(features_path, shard_file(spec.index, "record")), record)


def finished_shards(features_path):
    """Indices of the shards whose record exists (temporary files are ignored)."""
    names = os.listdir(features_path) if os.path.isdir(features_path) else []
    return {int(match[1]) for match in map(RECORD_NAME.fullmatch, names) if match}


def check_settings(features_path, settings):
    """Refuses to add to a folder whose shards or manifest were made with other settings."""
    paths = [os.path.join(features_path, shard_file(index, "record"))
             for index in sorted(finished_shards(features_path))]
    manifest_path = os.path.join(features_path, MANIFEST_NAME)
    if os.path.exists(manifest_path):
        paths.append(manifest_path)
    for path in paths:
        existing = read_json(path)["settings"]
        if existing != settings:
            differing = sorted(key for key in settings.keys() | existing.keys()
                               if settings.get(key) != existing.get(key))
            details = ", ".join(f"{key}: {existing.get(key)} there, {settings.get(key)} now"
                                for key in differing)
            raise SettingsMismatchError(
                f"{path} was made with other settings ({details}); "
                f"use a new features folder or remove the old one")


#################################################################################
#                                  Manifest                                     #
#################################################################################

def write_manifest(features_path, specs, description):
    """Joins the records of all shards into the manifest; `description` adds the fields that
    readers need (image_size, latent_shape, vae, scale_factor, class_to_idx, settings)."""
    records = []
    for spec in specs:
        path = os.path.join(features_path, shard_file(spec.index, "record"))
        if not os.path.exists(path):
            raise FileNotFoundError(f"shard {spec.index} is not finished: {path} is missing")
        records.append(read_json(path))
    shards = [{key: record[key] for key in ("latents", "labels", "start", "stop", "count")}
              for record in records]
    manifest = {"format_version": FORMAT_VERSION,
                "count": sum(shard["count"] for shard in shards),
                **description,
                "dtype": np.dtype(FEATURE_DTYPE).name,
                "shards": shards,
                "skipped": [entry for record in records for entry in record["skipped"]]}
    write_json(os.path.join(features_path, MANIFEST_NAME), manifest)
    return manifest


def read_manifest(features_path):
    path = os.path.join(features_path, MANIFEST_NAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {features_path}: extract features first "
                                f"(extract_features.py), or let an interrupted extraction finish")
    manifest = read_json(path)
    if manifest["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path} has format version {manifest['format_version']}, "
                         f"this code reads version {FORMAT_VERSION}")
    return manifest


def open_shard(features_path, shard):
    """Memory-mapped (features, labels) of one manifest shard entry."""
    features = np.load(os.path.join(features_path, shard["latents"]), mmap_mode="r")
    labels = np.load(os.path.join(features_path, shard["labels"]), mmap_mode="r")
    return features, labels
