"""On-disk layout of extracted features: a few large shards plus a JSON manifest.

Shard k holds the images with global indices [k * shard_size, (k + 1) * shard_size) in
ImageFolder order, so its contents depend only on that range, never on how many processes
wrote it. Each shard is three files, each written under a temporary name and renamed:

    shard-00000.latents.npy   float16 (n, 2, C, h, w): [image, horizontal flip]
    shard-00000.labels.npy    int64 (n,)
    shard-00000.json          the record (range, count, skipped images, per-channel sums,
                              settings); written last, so its presence marks a finished shard.

`manifest.json` is written once every shard is finished and lists them in order, with the
per-channel mean and standard deviation of everything stored (images and flips), summed shard
by shard in shard order, so they do not depend on the number of processes either. The latents
are stored normalised (`latent_norm` of kind "vae"), or raw and normalised when read
(`normalised_on_read`: kind "channel", whose statistics are known only once all are stored).
"""
import os
import re
from dataclasses import dataclass

import numpy as np

from runtime.io import atomic_path, read_json, write_json
from runtime.latent_norm import LatentNorm

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
              "skipped": skipped, "channel_sums": channel_sums(features), "settings": settings}
    write_json(os.path.join(features_path, shard_file(spec.index, "record")), record)


def channel_sums(features):
    """Per-channel count, sum and sum of squares of stored features (n, 2, C, h, w), in float64
    from the float16 values stored."""
    values = np.asarray(features, dtype=FEATURE_DTYPE).astype(np.float64)
    axes = (0, 1, 3, 4)
    return {"count": int(values.size // max(values.shape[2], 1)),
            "sum": values.sum(axis=axes).tolist(), "sum_squares": np.square(values).sum(axis=axes).tolist()}


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

def read_records(features_path, specs):
    """The records of the shards `specs`, in order; FileNotFoundError for an unfinished one."""
    records = []
    for spec in specs:
        path = os.path.join(features_path, shard_file(spec.index, "record"))
        if not os.path.exists(path):
            raise FileNotFoundError(f"shard {spec.index} is not finished: {path} is missing")
        records.append(read_json(path))
    return records


def stored_statistics(records):
    """(mean, std) per channel of everything the shards store, summed in shard order."""
    count = sum(record["channel_sums"]["count"] for record in records)
    if count == 0:
        raise ValueError("no latents were stored")
    totals = [np.sum([record["channel_sums"][key] for record in records], axis=0) for key in ("sum", "sum_squares")]
    mean = totals[0] / count
    std = np.sqrt(np.maximum(totals[1] / count - np.square(mean), 0))
    return mean.tolist(), std.tolist()


def write_manifest(features_path, specs, description):
    """Joins the records of all shards into the manifest; `description` adds the fields that
    readers need (image_size, latent_shape, vae, latent_norm, normalised_on_read, class_to_idx,
    settings). The stored values' per-channel statistics go in as `stored_statistics`."""
    records = read_records(features_path, specs)
    shards = [{key: record[key] for key in ("latents", "labels", "start", "stop", "count")}
              for record in records]
    count = sum(shard["count"] for shard in shards)
    mean, std = stored_statistics(records) if count else ([], [])
    manifest = {"format_version": FORMAT_VERSION,
                "count": count,
                **description,
                "stored_statistics": {"mean": mean, "std": std},
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


def manifest_latent_norm(manifest):
    """The manifest's LatentNorm (None for pixels); manifests written before it was recorded
    hold the SD VAEs' `scale_factor` instead."""
    if "latent_norm" in manifest:
        return LatentNorm.from_record(manifest["latent_norm"])
    scale = manifest.get("scale_factor")
    return None if scale is None else LatentNorm("vae", scaling_factor=scale)


def class_names(manifest):
    """The ImageFolder's class names in class-index order."""
    return [name for name, _ in sorted(manifest["class_to_idx"].items(), key=lambda item: item[1])]


def open_shard(features_path, shard):
    """Memory-mapped (features, labels) of one manifest shard entry."""
    features = np.load(os.path.join(features_path, shard["latents"]), mmap_mode="r")
    labels = np.load(os.path.join(features_path, shard["labels"]), mmap_mode="r")
    return features, labels
