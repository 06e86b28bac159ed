"""Index partitions and shard specs: which rank holds which block of every array.

A `Partition` cuts one global axis into parts, one per member of a process group. A part is
a contiguous range or, for the composite axes of JIGSAW.md section 1 (the patch axis K, the
decoder concat 2E, the head concat 2P), a sorted index set. `split_sizes` follows
`numpy.array_split`: the first n mod p parts are one longer.

A `ShardSpec` names, for each axis of a parameter, the partition and the grid group
("domain" or "channel") whose coordinate picks the part, plus the group over which the
resulting block is replicated (its gradient is summed over that group, JIGSAW.md section 1).
Every block shape is derived from (global shape, grid, coordinates): shapes never travel.
"""
from __future__ import annotations

import dataclasses

import numpy as np


def split_sizes(n: int, p: int) -> list[int]:
    """Sizes of the p parts of an axis of length n, as numpy.array_split cuts it."""
    base, extra = divmod(n, p)
    return [base + 1 if r < extra else base for r in range(p)]


def offsets(sizes) -> list[int]:
    """Start of every part, plus the total at the end."""
    return [0] + list(np.cumsum(sizes, dtype=np.int64).tolist())


@dataclasses.dataclass(frozen=True)
class Partition:
    """A cut of one axis of length `n` into parts; part p is `parts[p]` (a slice or index array)."""
    n: int
    parts: tuple

    @classmethod
    def even(cls, n: int, p: int) -> "Partition":
        """p contiguous parts of split_sizes(n, p)."""
        return cls.contiguous(n, split_sizes(n, p))

    @classmethod
    def contiguous(cls, n: int, sizes) -> "Partition":
        o = offsets(sizes)
        if o[-1] != n:
            raise ValueError(f"part sizes {list(sizes)} do not add up to {n}")
        return cls(n, tuple(slice(o[p], o[p + 1]) for p in range(len(sizes))))

    @classmethod
    def blocks(cls, outer: "Partition", inner: int) -> "Partition":
        """Each part of `outer` scaled to whole blocks of `inner` consecutive elements
        (variables -> variables x pl x pw when the variable index is slowest)."""
        parts = []
        for part in outer.parts:
            idx = outer.indices(part)
            parts.append(_as_part((idx[:, None] * inner + np.arange(inner)).ravel()))
        return cls(outer.n * inner, tuple(parts))

    @classmethod
    def concat(cls, *pieces: "Partition") -> "Partition":
        """Part p is the union of part p of every piece, each piece offset by the ones before
        (the decoder concat 2E: E_j then E + E_j)."""
        counts = {len(pc.parts) for pc in pieces}
        if len(counts) != 1:
            raise ValueError("concatenated partitions must have the same number of parts")
        parts, base = [[] for _ in range(counts.pop())], 0
        for pc in pieces:
            for p, part in enumerate(pc.parts):
                parts[p].append(pc.indices(part) + base)
            base += pc.n
        return cls(base, tuple(_as_part(np.concatenate(ix)) for ix in parts))

    @property
    def count(self) -> int:
        return len(self.parts)

    def indices(self, part) -> np.ndarray:
        if isinstance(part, slice):
            return np.arange(part.start, part.stop, dtype=np.int64)
        return np.asarray(part, dtype=np.int64)

    def index(self, p: int):
        return self.parts[p]

    def size(self, p: int) -> int:
        part = self.parts[p]
        return part.stop - part.start if isinstance(part, slice) else len(part)

    @property
    def sizes(self) -> list[int]:
        return [self.size(p) for p in range(self.count)]


def _as_part(idx: np.ndarray):
    """A slice where the index set is a range, else the sorted index array."""
    idx = np.asarray(idx, dtype=np.int64)
    if idx.size and np.all(np.diff(idx) == 1):
        return slice(int(idx[0]), int(idx[-1]) + 1)
    if idx.size == 0:
        return slice(0, 0)
    return idx


@dataclasses.dataclass(frozen=True)
class Split:
    """Axis cut by `partition`, part chosen by the coordinate of this rank in `group`."""
    partition: Partition
    group: str  # "domain" or "channel"


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """How one global array is held: one `Split` or None (whole axis) per axis, and the group
    (or None) over which the block is replicated."""
    shape: tuple
    splits: tuple
    replicated_over: str | None = None

    def index(self, coords: dict) -> tuple:
        """The global index of the block held at grid coordinates {"domain": i, "channel": j}."""
        return tuple(slice(None) if s is None else s.partition.index(coords[s.group])
                     for s in self.splits)

    def block_shape(self, coords: dict) -> tuple:
        """The shape of the block held at `coords`."""
        return tuple(n if s is None else s.partition.size(coords[s.group])
                     for n, s in zip(self.shape, self.splits))


def take(global_array, index: tuple):
    """The block `global_array[index]`, for an index of slices and index arrays (one axis at a
    time, since numpy pairs up several index arrays instead of taking their product)."""
    out = global_array
    for axis, ix in enumerate(index):
        if isinstance(ix, slice):
            if ix != slice(None):
                out = out[(slice(None),) * axis + (ix,)]
        else:
            out = out.take(ix, axis=axis)
    return out


def put(global_array, index: tuple, block) -> None:
    """Write `block` into `global_array[index]` (the inverse of `take`)."""
    grids = []
    for axis, ix in enumerate(index):
        n = global_array.shape[axis]
        grids.append(np.arange(n)[ix] if not isinstance(ix, np.ndarray) else ix)
    global_array[np.ix_(*grids)] = block
