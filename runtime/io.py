"""Atomic file writes: a reader never sees a half-written checkpoint, shard, npz, manifest or
pipeline folder."""
import contextlib
import json
import os
import shutil


def temporary_sibling(path):
    """A temporary name next to `path` (its folder created), keeping its extension."""
    directory, name = os.path.split(os.path.abspath(os.fspath(path)))
    os.makedirs(directory, exist_ok=True)
    return os.path.join(directory, f".tmp-{os.getpid()}-{name}")


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path next to `path`; renames it onto `path` only if the block succeeds.

    The temporary name keeps the final extension, so writers that append one (numpy.savez)
    write exactly where they are told.
    """
    tmp = temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, content):
    with atomic_path(path) as tmp:
        with open(tmp, "w") as file:
            json.dump(content, file, indent=1)


def read_json(path):
    with open(path) as file:
        return json.load(file)


@contextlib.contextmanager
def atomic_directory(path):
    """atomic_path for a folder: yields a temporary folder next to `path`, renamed onto `path`
    (which must not exist, or be empty) only if the block succeeds."""
    tmp = temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
