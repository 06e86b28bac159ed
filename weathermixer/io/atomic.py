"""Atomic HDF5 writes: a file is complete or absent, never half-written."""
from __future__ import annotations

import contextlib
import os

import h5py


@contextlib.contextmanager
def atomic_h5(path):
    """Yield an h5py.File open for writing at `<path>.tmp-<pid>`; on success it is flushed,
    fsynced and renamed over `path` (os.replace is atomic on POSIX), on failure removed."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with h5py.File(tmp, "w") as f:
            yield f
            f.flush()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
