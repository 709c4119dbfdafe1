"""A sample folder's manifest: which weights its PNGs were sampled from.

A folder's name records the checkpoint's file name, not its content: two training runs both
write `0400000.pt`. The manifest holds the sha256 of the weights loaded
(runtime.checkpoint.state_dict_sha256), so that a re-run into the folder resumes only from the
same weights, never mixing the images of two models in one npz.
"""
import os
import re

from runtime.io import read_json, write_json

from .images import PNG_NAME_DIGITS

MANIFEST_NAME = "manifest.json"
SAMPLE_PNG = re.compile(rf"\d{{{PNG_NAME_DIGITS}}}\.png")  # the names of sampling.images.png_path


class SampleFolderMismatchError(ValueError):
    """A folder that holds samples of other weights, or samples of unknown weights."""


def folder_record(loaded, ckpt, ckpt_key):
    """What the manifest records of a SamplingModel (with the class names, which arr_1's labels
    index); only the digest is compared."""
    return {"weights_sha256": loaded.weights_sha256, "checkpoint": os.path.abspath(ckpt),
            "ckpt_key": ckpt_key, "model": loaded.model_name, "class_names": loaded.class_names}


def has_samples(folder):
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return any(SAMPLE_PNG.fullmatch(name) for name in names)


def bind_sample_folders(folders, record, write):
    """Checks that each folder holds no samples but those of the weights in `record`; with write
    (the main process), records them in every folder that has no manifest yet. Raises
    SampleFolderMismatchError before anything is written to any folder."""
    unbound = [folder for folder in folders if not check_sample_folder(folder, record)]
    if write:
        for folder in unbound:
            write_json(os.path.join(folder, MANIFEST_NAME), record)


def check_sample_folder(folder, record):
    """True where the folder's manifest names these weights, False where it has neither manifest
    nor samples; SampleFolderMismatchError otherwise."""
    path = os.path.join(folder, MANIFEST_NAME)
    if os.path.exists(path):
        existing = read_json(path)
        if existing["weights_sha256"] != record["weights_sha256"]:
            raise SampleFolderMismatchError(
                f"{folder} holds samples of other weights ({existing['checkpoint']} "
                f"[{existing['ckpt_key']}], sha256 {existing['weights_sha256'][:12]}...; now "
                f"{record['checkpoint']} [{record['ckpt_key']}], sha256 {record['weights_sha256'][:12]}...): "
                f"choose another --output-dir or remove that folder")
        return True
    if has_samples(folder):
        raise SampleFolderMismatchError(
            f"{folder} holds samples but no {MANIFEST_NAME} saying which weights made them: "
            f"choose another --output-dir or remove that folder")
    return False
