"""Communication operators as conjugate pairs: each forward sits beside its adjoint.

Convention (one, used everywhere): every rank's local array is a variable of its own, and an
inner product of distributed arrays is the sum over ranks of the local inner products. A
value that one collective makes identical on several ranks (a gathered weight panel, the
LayerNorm statistics) is then used by each rank for *different* outputs, so the gradient that
reaches each copy is a per-rank partial, and the adjoint of the collective sums those
partials. Under this convention

    gather          (allgather)       <->  gather_adjoint          (reduce-scatter)
    scatter_sum     (reduce-scatter)  <->  scatter_sum_adjoint     (allgather)
    scatter_parts   (reduce-scatter)  <->  scatter_parts_adjoint   (allgather)
    allreduce_sum   (allreduce)       <->  allreduce_sum           (self-adjoint)

and the adjoint test <F x, y> = <x, F* y> (sums over ranks) holds for each pair
(tests/mpi/test_ops_mpi.py). A group of size 1 makes every operator the identity.

Some operators also come in a form that overlaps compute on GPUs: `start_gather` and
`start_gather_adjoint` (begun now, taken by `.get()`), `scatter_parts_as_computed` (fed block
by block) and `scatter_parts_adjoint_own_first` (read block by block, own block first). They
compute the same values as the plain forms (which `scatter_parts` and `scatter_parts_adjoint`
are written through, so the adjoint tests cover both).

A `Partition` gives the part sizes along the axis, in group-rank order; parts must be
contiguous ranges in order (`Partition.even` / `Partition.contiguous`), so a gather is a
concatenation.
"""
from __future__ import annotations

from weathermixer.autograd.xp import get_array_module
from weathermixer.jigsaw.shard import Partition


def gather(x, group, axis: int, part: Partition, tag: str = "gather"):
    """forward: allgather of the blocks along `axis` over `group`; backward: reduce-scatter."""
    return group.allgather(x, axis, part.sizes, tag=tag)


def gather_adjoint(dy, group, axis: int, part: Partition, tag: str = "gather_adjoint"):
    """forward: reduce-scatter along `axis` over `group` (the adjoint of `gather`)."""
    return group.reduce_scatter(dy, axis, part.sizes, tag=tag)


def start_gather(x, group, axis: int, part: Partition, tag: str = "gather"):
    """`gather` begun now and taken later: a `backend.InFlight` whose `get()` returns the
    gathered array. On GPUs the gather runs on the group's side stream meanwhile."""
    return group.start_allgather(x, axis, part.sizes, tag=tag)


def start_gather_adjoint(dy, group, axis: int, part: Partition, tag: str = "gather_adjoint"):
    """`gather_adjoint` begun now and taken later by `get()` (see `start_gather`)."""
    return group.start_reduce_scatter(dy, axis, part.sizes, tag=tag)


def scatter_sum(x, group, axis: int, part: Partition, tag: str = "scatter_sum"):
    """forward: reduce-scatter of partial sums along `axis` over `group`; backward: allgather."""
    return group.reduce_scatter(x, axis, part.sizes, tag=tag)


def scatter_sum_adjoint(dy, group, axis: int, part: Partition, tag: str = "scatter_sum_adjoint"):
    """forward: allgather along `axis` over `group` (the adjoint of `scatter_sum`)."""
    return group.allgather(dy, axis, part.sizes, tag=tag)


def scatter_parts(parts, group, tag: str = "scatter_parts"):
    """forward: reduce-scatter of a stack of per-member partial blocks [size, ...] over
    `group` -> this member's block [...]; backward: `scatter_parts_adjoint`.
    The parts axis leads, so nothing is transposed for the wire (blocks padded to one shape).
    `scatter_parts_as_computed` with every block ready at once."""
    exchange = scatter_parts_as_computed(parts, group, tag)
    for p in exchange.order:
        exchange.ready(p)
    return exchange.result()


def scatter_parts_adjoint(dy, group, tag: str = "scatter_parts_adjoint"):
    """forward: allgather of equal-shaped blocks over `group` -> [size, ...].
    `scatter_parts_adjoint_own_first` with every block read."""
    gathered = scatter_parts_adjoint_own_first(dy, group, tag)
    xp = get_array_module(dy)
    return xp.stack([gathered.block(p) for p in range(group.size)])


def scatter_parts_as_computed(store, group, tag: str = "scatter_parts"):
    """`scatter_parts` fed block by block: a `backend.PartsExchange` over `store` [size, ...]
    (`order`, `ready(p)`, `result()`), so that finished blocks travel while the caller
    computes the next (`jigsaw.matmul.xwt_forward`)."""
    return group.parts_exchange(store, tag=tag)


def scatter_parts_adjoint_own_first(dy, group, tag: str = "scatter_parts_adjoint"):
    """`scatter_parts_adjoint` read block by block: a `backend.PartsGather` (`order`,
    `block(p)`), this rank's own block first and usable while the others arrive
    (`jigsaw.matmul.xwt_backward`)."""
    return group.parts_gather(dy, tag=tag)


def allreduce_sum(x, group, tag: str = "allreduce_sum", overlap: bool = False):
    """forward: allreduce-sum over `group`; backward: allreduce-sum (self-adjoint). With
    `overlap` the sum may still be in flight on return, complete after `group.wait()`."""
    return group.allreduce(x, "sum", tag=tag, overlap=overlap)


def broadcast(x, group, root: int = 0, tag: str = "broadcast"):
    """forward: root's array to every member of `group` (setup data such as normalisation
    statistics; not differentiated)."""
    return group.bcast(x, root=root, tag=tag)
