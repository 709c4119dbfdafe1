"""Checkpoint I/O: atomic saves, safe loads of the released layout, strict weight loading."""
import argparse
import hashlib
import pickle
import zipfile

import torch

from .io import atomic_path

# Training checkpoints (released and ours) hold these state dicts; `args` is an argparse.Namespace.
WEIGHT_KEYS = ("ema", "model")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or does not fit the model."""


def save_checkpoint(state, path):
    """Writes `state` with torch.save to a temporary name, then renames it onto `path`."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def read_checkpoint(path):
    """torch.load with weights_only=True, allow-listing argparse.Namespace (the `args` entry of
    released checkpoints) and nothing else: anything more exotic is refused with a clear error
    instead of silently unpickling arbitrary objects.

    A checkpoint in torch's zip format (torch.save since 1.6) is memory-mapped, copy-on-write:
    a tensor is read from the file when it is used, so a reader that needs only `ema` never reads
    the optimizer state, and a full load needs no second, private copy of the file in memory.
    The legacy format cannot be mapped and is read whole.
    """
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"cannot read checkpoint {path} safely: {first_line}") from None


def is_state_dict(obj):
    return isinstance(obj, dict) and obj and all(torch.is_tensor(value) for value in obj.values())


def extract_state_dict(checkpoint, key="ema", path="checkpoint"):
    """The weights of a raw state dict, or `checkpoint[key]` of a training checkpoint."""
    if is_state_dict(checkpoint):
        return checkpoint
    if isinstance(checkpoint, dict) and is_state_dict(checkpoint.get(key)):
        return checkpoint[key]
    found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
    raise CheckpointError(f"{path} has no {key!r} weights (found: {found})")


def state_dict_sha256(state_dict):
    """sha256 hex digest of a state dict's weights: each key in sorted order with its dtype,
    shape and raw bytes. The same weights give the same digest whatever file holds them (a raw
    state dict or a training checkpoint, re-saved or not), the key order or the other entries."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}\t{tensor.dtype}\t{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def load_checkpoint(model, path, key="ema", model_name=None):
    """Loads a raw state dict or a training checkpoint's `key` weights ("ema" or "model") into
    `model` with strict key and shape checking; returns the whole checkpoint object."""
    checkpoint = read_checkpoint(path)
    load_weights(model, checkpoint, key, path, model_name)
    return checkpoint


def load_weights(model, checkpoint, key="ema", source="checkpoint", model_name=None):
    """load_checkpoint for a checkpoint already read with read_checkpoint; returns the state
    dict loaded."""
    state_dict = extract_state_dict(checkpoint, key, source)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [f"{name} {tuple(state_dict[name].shape)} != {tuple(expected[name].shape)}"
                  for name in sorted(set(expected) & set(state_dict))
                  if state_dict[name].shape != expected[name].shape]
    if missing or unexpected or mismatched:
        expected_name = model_name or type(model).__name__
        raise CheckpointError(
            f"{source} does not fit {expected_name}: "
            f"{len(missing)} missing keys {summarise(missing)}, "
            f"{len(unexpected)} unexpected keys {summarise(unexpected)}, "
            f"{len(mismatched)} shape mismatches {summarise(mismatched)}"
        )
    model.load_state_dict(state_dict, strict=True)
    return state_dict


def summarise(names, shown=5):
    if len(names) <= shown:
        return names
    return names[:shown] + [f"... {len(names) - shown} more"]
