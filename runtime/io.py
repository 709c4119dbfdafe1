"""Atomic file writes: a reader never sees a half-written checkpoint, shard, npz or manifest."""
import contextlib
import json
import os


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path next to `path`; renames it onto `path` only if the block succeeds.

    The temporary name keeps the final extension, so writers that append one (numpy.savez)
    write exactly where they are told.
    """
    path = os.fspath(path)
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".tmp-{os.getpid()}-{name}")
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
