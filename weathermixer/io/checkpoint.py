"""Layout-independent checkpoints in HDF5 (SPEC.md), written atomically.

    params/<name>                 the full global array of every parameter
    optimizer/<state>/<name>      optimizer state (e.g. optimizer/m/..., optimizer/v/...)
    attrs: format = "weathermixer-checkpoint", format_version, config (JSON), step,
           and `extra` (JSON: RNG seed, data position, normalisation, ...)

A checkpoint is written through `io.atomic.atomic_h5` (a temporary file, fsynced, renamed over
`path`): a crash leaves either the old file or the new one, never half of one. Nothing is pickled.
A reader takes any block of any array (`read_block`), so a run of any layout can resume from
a checkpoint written by any other.
"""
from __future__ import annotations

import json
import os

import h5py
import numpy as np

from weathermixer.autograd.xp import to_host
from weathermixer.config import Config, param_shapes
from weathermixer.io.atomic import atomic_h5
from weathermixer.jigsaw.shard import take

FORMAT = "weathermixer-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used, with the file and the dataset named."""


def save_checkpoint(path, params: dict, cfg: Config, optimizer: dict | None = None,
                    step: int = 0, extra: dict | None = None) -> None:
    """Write global arrays (numpy or CuPy) and metadata to `path`, atomically."""
    with atomic_h5(path) as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["config"] = cfg.to_json()
        f.attrs["step"] = int(step)
        f.attrs["extra"] = json.dumps(extra or {}, sort_keys=True)
        for name, value in params.items():
            f.create_dataset(f"params/{name}", data=to_host(value))
        for state, arrays in (optimizer or {}).items():
            for name, value in arrays.items():
                f.create_dataset(f"optimizer/{state}/{name}", data=to_host(value))


def open_checkpoint(path) -> h5py.File:
    """Open and validate a checkpoint file (format attribute and config)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CheckpointError(f"{path}: not a readable HDF5 file ({e})") from None
    if f.attrs.get("format") != FORMAT:
        f.close()
        raise CheckpointError(f"{path}: attribute 'format' is {f.attrs.get('format')!r}, "
                              f"expected {FORMAT!r}")
    return f


def checkpoint_config(f: h5py.File) -> Config:
    try:
        return Config.from_json(f.attrs["config"])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{f.filename}: attribute 'config' is not a valid Config: {e}") from None


def checkpoint_meta(f: h5py.File) -> dict:
    """step, extra (dict), the optimizer states present and the parameters' dtype."""
    states = sorted(f["optimizer"].keys()) if "optimizer" in f else []
    if "params/encoder/weight" not in f:
        raise CheckpointError(f"{f.filename}: dataset 'params/encoder/weight' is missing")
    return {"step": int(f.attrs.get("step", 0)), "extra": json.loads(f.attrs.get("extra", "{}")),
            "optimizer_states": states, "dtype": str(f["params/encoder/weight"].dtype)}


def read_header(path) -> tuple[Config, dict]:
    """(cfg, meta) of the checkpoint at `path`, without reading any array."""
    with open_checkpoint(path) as f:
        return checkpoint_config(f), checkpoint_meta(f)


def read_block(f: h5py.File, dataset: str, shape: tuple, index: tuple | None = None) -> np.ndarray:
    """The block `index` (slices and index arrays, as `ShardSpec.index` makes them) of the
    dataset, after checking that it exists with the global `shape`."""
    if dataset not in f:
        raise CheckpointError(f"{f.filename}: dataset '{dataset}' is missing")
    ds = f[dataset]
    if tuple(ds.shape) != tuple(shape):
        raise CheckpointError(f"{f.filename}: dataset '{dataset}' has shape {tuple(ds.shape)}, "
                              f"expected {tuple(shape)}")
    if index is None:
        return ds[()]
    # read the bounding box of the block in one hyperslab, then pick the index sets
    box, inner = [], []
    for ix in index:
        if isinstance(ix, slice):
            box.append(ix)
            inner.append(slice(None))
        else:
            lo, hi = int(ix.min()), int(ix.max()) + 1
            box.append(slice(lo, hi))
            inner.append(ix - lo)
    return take(ds[tuple(box)], tuple(inner))


def load_checkpoint(path):
    """(params, cfg): the global float arrays of a checkpoint as numpy arrays."""
    with open_checkpoint(path) as f:
        cfg = checkpoint_config(f)
        params = {name: read_block(f, f"params/{name}", shape)
                  for name, shape in param_shapes(cfg).items()}
    return params, cfg
