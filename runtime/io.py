"""Atomic file writes: a reader never sees a half-written checkpoint, shard or npz."""
import contextlib
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
