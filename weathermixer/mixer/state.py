"""Global <-> sharded model state: what makes checkpoints layout-independent.

`gather_global` assembles the global arrays of a sharded dict on world rank 0 (the model
group of replica 0 sends its blocks there; other replicas hold the same values). `save` writes
them in the SPEC checkpoint format; `load` has every rank read only its own blocks, so a run of
any layout resumes from a checkpoint written by any other.
"""
from __future__ import annotations

import numpy as np

from weathermixer.autograd.xp import to_host, to_module
from weathermixer.io import checkpoint as ckpt
from weathermixer.jigsaw.shard import put


def gather_global(local, layout) -> dict | None:
    """{name: global numpy array} on world rank 0, None on every other rank. Every rank
    reads every block of `local` in the same order (a mapping whose reads are collectives
    over `data` may be given: `optim.WholeBlocks`)."""
    grid = layout.grid
    out = {} if grid.is_root else None
    for name, spec in layout.specs.items():
        block = local[name]
        if grid.replica != 0:
            continue
        blocks = grid.model.gather(to_host(block), root=0, tag="checkpoint")
        if out is None:
            continue
        full = np.empty(spec.shape, dtype=blocks[0].dtype)  # global shape
        for q, b in enumerate(blocks):
            i, j = divmod(q, grid.pc)
            put(full, spec.index({"domain": i, "channel": j}), b)
        out[name] = full
    return out


def save(path, params: dict, cfg, layout, optimizer=None, step: int = 0, extra=None) -> None:
    """Write a layout-independent checkpoint of sharded `params` (and AdamW state)."""
    glob = gather_global(params, layout)
    states = {}
    if optimizer is not None:
        for state, arrays in optimizer.state(layout).items():
            if arrays:
                states[state] = gather_global(arrays, layout)
    if layout.grid.is_root:
        ckpt.save_checkpoint(path, glob, cfg, optimizer=states, step=step,
                             extra=dict(extra or {}, optimizer_t=getattr(optimizer, "t", 0)))
    # every rank leaves only once the file is complete (a collective decision)
    layout.grid.world.agree(True)


def load(path, layout, dtype, xp, optimizer=None) -> tuple[dict, dict]:
    """(params, meta): this rank's blocks of a checkpoint of the same Config as `layout`.
    With `optimizer`, its moments and step count are restored too."""
    with ckpt.open_checkpoint(path) as f:
        cfg = ckpt.checkpoint_config(f)
        if cfg != layout.cfg:
            raise ckpt.CheckpointError(f"{path}: attribute 'config' is {cfg}, but this run "
                                       f"is configured as {layout.cfg}")
        meta = ckpt.checkpoint_meta(f)

        def blocks(prefix):
            return {name: to_module(np.ascontiguousarray(
                        ckpt.read_block(f, f"{prefix}/{name}", spec.shape,
                                        spec.index(layout.coords)), dtype=dtype), xp)
                    for name, spec in layout.specs.items()}

        params = blocks("params")
        if optimizer is not None and meta["optimizer_states"]:
            optimizer.load_state({s: blocks(f"optimizer/{s}") for s in ("m", "v")},
                                 meta["extra"].get("optimizer_t", meta["step"]), layout)
    return params, meta
