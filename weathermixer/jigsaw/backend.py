"""Collectives on one process group: the only place where bytes leave a process.

`Group` is the interface the operators of `ops.py` call. Two implementations:

- `LocalGroup`: a group of one rank. Every collective returns its input unchanged, so the
  serial model runs through exactly the parallel code at no cost.
- `MPIGroup`: mpi4py over an MPI communicator, with upper-case (buffer) methods only, so no
  object is ever pickled. A group's `cuda_aware` is `mpi_cuda_aware()`: where the MPI library
  reports CUDA device memory among its memory allocation kinds (MPI 4.1), CuPy arrays go to
  MPI as they are, after the current stream is synchronised (MPI does not see CuPy's
  streams), and receive buffers are CuPy arrays. Everywhere else CuPy arrays are staged
  through host memory (the copy synchronises the stream), because the usual MPI builds are
  not CUDA-aware and crash when handed device pointers.

Every collective takes `tag`, the name of the operator that calls it, and records the bytes
this rank sends and the seconds it waits in `COMM_LOG` (for `weathermixer bench`).
Sizes along the gathered or scattered axis are passed in (from a `Partition`): shapes never
travel on the wire.
"""
from __future__ import annotations

import collections
import functools
import json
import os
import time

import numpy as np

from weathermixer.autograd.xp import get_array_module, is_device_array, to_host, to_module
from weathermixer.jigsaw import peer
from weathermixer.jigsaw.shard import offsets


class CommLog:
    """Per-operator counters of calls, bytes sent by this rank and seconds spent.
    With `synchronize` set (by the bench), device collectives wait for the stream before and
    after, so their seconds are the transfer's own and not just the launch."""

    def __init__(self):
        self.synchronize = False
        self.reset()

    def reset(self):
        self.calls = collections.Counter()
        self.bytes_sent = collections.Counter()
        self.seconds = collections.Counter()

    def record(self, tag: str, nbytes: float, seconds: float):
        self.calls[tag] += 1
        self.bytes_sent[tag] += int(nbytes)
        self.seconds[tag] += seconds

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


COMM_LOG = CommLog()


class InFlight:
    """The result of a collective begun with `start_*`: on `NCCLGroup` it may still run on
    the group's side stream. `get()` makes the current stream wait for that collective alone
    (the host does not wait) and returns the array; elsewhere it is complete already."""

    def __init__(self, array, event=None, keep=(), finish=None):
        self.array, self.event, self.keep, self.finish = array, event, keep, finish

    def get(self):
        if self.event is not None:
            get_array_module(self.array).cuda.get_current_stream().wait_event(self.event)
            self.event, self.keep = None, ()  # the buffers on the wire may go now
        if self.finish is not None:
            self.array, self.finish = self.finish(self.array), None
        return self.array


class PartsExchange:
    """A reduce-scatter whose partial blocks are handed over one by one as they are computed:

        ex = group.parts_exchange(store, tag)   # store [size, ...]: a block per member
        for p in ex.order:                      # the other members' blocks first, own last
            store[p] = ...                      # this rank's partial for member p
            ex.ready(p)
        mine = ex.result()                      # [...] = sum over members of their store[rank]

    This base form waits for every block, then makes one reduce-scatter; `NCCLGroup` sends
    each block while the next one is computed (`PairwiseExchange`)."""

    split_own = False  # whether the own block is computed in pieces (`own_pieces`)

    def __init__(self, group, store, tag: str):
        self.group, self.store, self.tag = group, store, tag
        self.order = list(range(group.size))

    def ready(self, p: int):
        """Block p of `store` holds its final value."""

    def result(self):
        return self.group.reduce_scatter_parts(self.store, tag=self.tag)


class PartsGather:
    """An allgather of equal-shaped blocks whose own block is usable before the others arrive:

        g = group.parts_gather(mine, tag)
        for p in g.order:          # own block first
            use(g.block(p))        # member p's block [...]

    With `overlap` (`NCCLGroup`) the gather runs on the group's side stream while the caller
    works on its own block, and the first `block(p)` of another member waits for it; without,
    every block is gathered up front."""

    def __init__(self, group, x, tag: str, overlap: bool = False):
        self.group, self.mine, self.overlap = group, x, overlap
        self.order = [group.rank] + [p for p in range(group.size) if p != group.rank]
        self.stacked = (group.allgather_parts(x, tag=tag, overlap=overlap)  # [size, ...]
                        if group.size > 1 else None)

    def block(self, p: int):
        if p == self.group.rank:
            return self.mine
        if self.overlap:
            self.group.wait()
            self.overlap = False
        return self.stacked[p]


class LocalGroup:
    """A group of one rank: every collective is the identity."""
    size = 1
    rank = 0

    def __init__(self, name: str = "local"):
        self.name = name

    def transport(self) -> str:
        """How device arrays travel in this group (the bench reports it)."""
        return "none (one rank)"

    def allreduce(self, x, op: str = "sum", tag: str = "allreduce", overlap: bool = False):
        return x

    def wait(self):
        """Nothing is ever in flight on a group of one."""

    def allgather(self, x, axis: int, sizes, tag: str = "allgather"):
        return x

    def reduce_scatter(self, x, axis: int, sizes, tag: str = "reduce_scatter"):
        return x

    def start_allgather(self, x, axis: int, sizes, tag: str = "allgather"):
        return InFlight(x)

    def start_reduce_scatter(self, x, axis: int, sizes, tag: str = "reduce_scatter"):
        return InFlight(x)

    def reduce_scatter_parts(self, parts, tag: str = "reduce_scatter"):
        return parts[0]

    def allgather_in_place(self, flat, sizes, tag: str = "allgather", overlap: bool = False,
                           kept: bool = False):
        """The one part is the whole array already (nothing in flight: returns None)."""

    def allgather_parts(self, x, tag: str = "allgather", overlap: bool = False):
        return x[None]

    def parts_exchange(self, store, tag: str = "reduce_scatter"):
        return PartsExchange(self, store, tag)

    def parts_gather(self, x, tag: str = "allgather"):
        return PartsGather(self, x, tag)

    def bcast(self, x, root: int = 0, tag: str = "bcast"):
        return x

    def gather(self, x, root: int = 0, tag: str = "gather"):
        return [x]

    def agree(self, flag: bool, op: str = "min") -> bool:
        return bool(flag)

    def gather_json(self, obj, root: int = 0):
        return [json.loads(json.dumps(obj))]

    def bcast_json(self, obj=None, root: int = 0):
        return json.loads(json.dumps(obj))

    def barrier(self):
        pass


_MPI_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}
CUDA_AWARE_ENV = "WEATHERMIXER_CUDA_AWARE_MPI"


def _memory_alloc_kinds() -> str | None:
    """MPI_COMM_WORLD's `mpi_memory_alloc_kinds` info value (MPI 4.1), e.g. "mpi,system" or
    "mpi,system,cuda:device"; None where the MPI library does not set the key."""
    from mpi4py import MPI
    info = MPI.COMM_WORLD.Get_info()
    try:
        return info.Get("mpi_memory_alloc_kinds")
    finally:
        info.Free()


@functools.cache
def mpi_cuda_aware() -> bool:
    """True only where the MPI library reports at run time that it takes CUDA device memory:
    "cuda" (every CUDA allocation) or "cuda:device" among its memory allocation kinds.
    False where it reports neither, where it does not set the key (MPI before 4.1), where the
    query fails, and where WEATHERMIXER_CUDA_AWARE_MPI=0. No setting turns it on where MPI
    does not report it: device pointers handed to an MPI that is not CUDA-aware crash the
    process. Cached: the first answer holds for the process."""
    if os.environ.get(CUDA_AWARE_ENV) == "0":
        return False
    try:
        kinds = _memory_alloc_kinds()
    except Exception:  # no mpi4py, or an MPI that fails the query: stage through the host
        return False
    return kinds is not None and not {"cuda", "cuda:device"}.isdisjoint(
        k.strip() for k in kinds.split(","))


def _synchronize(x):
    """Wait for the work queued on the current stream of device array `x`'s module."""
    get_array_module(x).cuda.get_current_stream().synchronize()


class MPIGroup:
    """A group over an mpi4py communicator: host buffers, and CuPy buffers where `cuda_aware`
    (CuPy arrays are staged through the host otherwise)."""

    def __init__(self, comm, name: str):
        from mpi4py import MPI
        self.MPI = MPI
        self.comm = comm
        self.name = name
        self.size = comm.Get_size()
        self.rank = comm.Get_rank()
        self.cuda_aware = mpi_cuda_aware()

    def transport(self) -> str:
        """How device arrays travel in this group (the bench reports it)."""
        if self.size == 1:
            return "none (one rank)"
        return "MPI, CUDA-aware" if self.cuda_aware else "MPI (device arrays via host memory)"

    # -- helpers -------------------------------------------------------------------------
    def _op(self, op: str):
        return getattr(self.MPI, _MPI_OPS[op])

    def _wire(self, x):
        """`x` as it goes to MPI, C-contiguous: on the device, with the current stream
        synchronised, where this group is CUDA-aware and `x` is a device array; otherwise
        on the host (a copy of a device array)."""
        if self.cuda_aware and is_device_array(x):
            x = get_array_module(x).ascontiguousarray(x)
            _synchronize(x)
            return x
        return np.ascontiguousarray(to_host(x))

    @staticmethod
    def _empty(shape, dtype, like):
        """An uninitialised receive buffer in the module (numpy or CuPy) of `like`."""
        return get_array_module(like).empty(shape, dtype=dtype)

    # -- collectives ---------------------------------------------------------------------
    def allreduce(self, x, op: str = "sum", tag: str = "allreduce", overlap: bool = False):
        """The sum (max, min) over the group. `overlap` is a hint that only the device
        backend acts on (`NCCLGroup`); over MPI the result is complete on return."""
        if self.size == 1:
            return x
        xp, t0 = get_array_module(x), time.perf_counter()
        send = self._wire(x)
        recv = self._empty(send.shape, send.dtype, send)
        self.comm.Allreduce(send, recv, op=self._op(op))
        out = to_module(recv, xp)
        COMM_LOG.record(tag, 2 * send.nbytes * (self.size - 1) / self.size, time.perf_counter() - t0)
        return out

    def wait(self):
        """Nothing is left in flight: MPI collectives complete before they return."""

    def allgather(self, x, axis: int, sizes, tag: str = "allgather"):
        """Concatenate the members' blocks along `axis`, in group-rank order."""
        if self.size == 1:
            return x
        xp, t0 = get_array_module(x), time.perf_counter()
        send = self._wire(xp.moveaxis(x, axis, 0))  # [sizes[rank], ...rest]
        rest = send.shape[1:]
        inner = int(np.prod(rest, dtype=np.int64))
        recv = self._empty((sum(sizes),) + rest, send.dtype, send)  # [sum(sizes), ...rest]
        self.comm.Allgatherv(send, [recv, [s * inner for s in sizes]])
        out = xp.moveaxis(to_module(recv, xp), 0, axis)
        COMM_LOG.record(tag, send.nbytes * (self.size - 1), time.perf_counter() - t0)
        return out

    def reduce_scatter(self, x, axis: int, sizes, tag: str = "reduce_scatter"):
        """Sum the members' arrays and keep this rank's part (sizes[rank]) along `axis`."""
        if self.size == 1:
            return x
        xp, t0 = get_array_module(x), time.perf_counter()
        send = self._wire(xp.moveaxis(x, axis, 0))  # [sum(sizes), ...rest]
        rest = send.shape[1:]
        inner = int(np.prod(rest, dtype=np.int64))
        recv = self._empty((sizes[self.rank],) + rest, send.dtype, send)
        self.comm.Reduce_scatter(send, recv, recvcounts=[s * inner for s in sizes],
                                 op=self.MPI.SUM)
        out = xp.moveaxis(to_module(recv, xp), 0, axis)
        COMM_LOG.record(tag, send.nbytes * (self.size - 1) / self.size, time.perf_counter() - t0)
        return out

    def start_allgather(self, x, axis: int, sizes, tag: str = "allgather"):
        """`allgather` begun now, its result taken by `.get()` (`InFlight`); over MPI it is
        complete on return."""
        return InFlight(MPIGroup.allgather(self, x, axis, sizes, tag))

    def start_reduce_scatter(self, x, axis: int, sizes, tag: str = "reduce_scatter"):
        """`reduce_scatter` begun now, its result taken by `.get()` (`InFlight`)."""
        return InFlight(MPIGroup.reduce_scatter(self, x, axis, sizes, tag))

    def allgather_in_place(self, flat, sizes, tag: str = "allgather", overlap: bool = False,
                           kept: bool = False):
        """flat [sum(sizes)], contiguous, holds this rank's part at its offset; every part is
        written in place from its member. `overlap` and `kept` are hints that only
        `NCCLGroup` acts on (it returns the event after which `flat` is whole; None: whole on
        return). `kept`: the caller keeps `flat` alive and writes this rank's part again only
        after a later collective of this group (a parameter between optimizer steps)."""
        if self.size == 1:
            return
        t0 = time.perf_counter()
        buf = self._wire(flat)  # flat itself, or its host copy
        self.comm.Allgatherv(self.MPI.IN_PLACE, [buf, list(sizes)])
        if buf is not flat:
            flat[...] = to_module(buf, get_array_module(flat))
        COMM_LOG.record(tag, sizes[self.rank] * flat.itemsize * (self.size - 1),
                        time.perf_counter() - t0)

    def reduce_scatter_parts(self, parts, tag: str = "reduce_scatter"):
        """parts [size, ...]: one equal-shaped block per member; returns the sum over members
        of block `rank` [...]. No transpose: the blocks are already whole on the wire."""
        if self.size == 1:
            return parts[0]
        xp, t0 = get_array_module(parts), time.perf_counter()
        send = self._wire(parts)
        recv = self._empty(send.shape[1:], send.dtype, send)
        self.comm.Reduce_scatter_block(send, recv, op=self.MPI.SUM)
        COMM_LOG.record(tag, send.nbytes * (self.size - 1) / self.size, time.perf_counter() - t0)
        return to_module(recv, xp)

    def allgather_parts(self, x, tag: str = "allgather", overlap: bool = False):
        """x [...] (equal shapes on all members) -> [size, ...] in group-rank order. `overlap`
        is a hint that only `NCCLGroup` acts on."""
        if self.size == 1:
            return x[None]
        xp, t0 = get_array_module(x), time.perf_counter()
        send = self._wire(x)
        recv = self._empty((self.size,) + send.shape, send.dtype, send)
        self.comm.Allgather(send, recv)
        COMM_LOG.record(tag, send.nbytes * (self.size - 1), time.perf_counter() - t0)
        return to_module(recv, xp)

    def parts_exchange(self, store, tag: str = "reduce_scatter"):
        """A reduce-scatter fed block by block (`PartsExchange`): one collective at the end."""
        return PartsExchange(self, store, tag)

    def parts_gather(self, x, tag: str = "allgather"):
        """An allgather read block by block (`PartsGather`): one collective up front."""
        return PartsGather(self, x, tag)

    def bcast(self, x, root: int = 0, tag: str = "bcast"):
        """Root's array on every member. Elsewhere `x` gives the shape and dtype, and is
        overwritten where it can serve as the receive buffer itself."""
        if self.size == 1:
            return x
        xp = get_array_module(x)
        buf = self._wire(x)
        self.comm.Bcast(buf, root=root)
        return to_module(buf, xp)

    def gather(self, x, root: int = 0, tag: str = "gather"):
        """Every member's array (shapes may differ) as a list on `root`, in the module of
        root's `x`; None elsewhere."""
        xp = get_array_module(x)
        send = self._wire(x)
        dims = np.array(send.shape, dtype=np.int64)
        ndim = len(dims)
        all_dims = np.empty((self.size, ndim), dtype=np.int64)
        self.comm.Allgather(dims, all_dims)
        counts = [int(np.prod(d)) for d in all_dims]
        recv = self._empty(sum(counts), send.dtype, send) if self.rank == root else None
        self.comm.Gatherv(send.ravel(), [recv, counts] if self.rank == root else None, root=root)
        if self.rank != root:
            return None
        recv, out, o = to_module(recv, xp), [], 0
        for d, c in zip(all_dims, counts):
            out.append(recv[o:o + c].reshape(tuple(d)))
            o += c
        return out

    def agree(self, flag: bool, op: str = "min") -> bool:
        """A collective decision: MIN (all agree) or MAX (any) of a flag over the group."""
        buf = np.array([1 if flag else 0], dtype=np.int32)
        out = np.empty_like(buf)
        self.comm.Allreduce(buf, out, op=self._op(op))
        return bool(out[0])

    def bcast_json(self, obj=None, root: int = 0):
        """Broadcast a JSON-serialisable object from `root` (no pickle)."""
        data = json.dumps(obj).encode() if self.rank == root else b""
        n = np.array([len(data)], dtype=np.int64)
        self.comm.Bcast(n, root=root)
        buf = np.frombuffer(data, dtype=np.uint8).copy() if self.rank == root else np.empty(int(n[0]), np.uint8)
        self.comm.Bcast(buf, root=root)
        return json.loads(buf.tobytes().decode())

    def gather_json(self, obj, root: int = 0):
        """Every member's JSON-serialisable object, as a list on `root` (None elsewhere)."""
        data = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)
        blocks = self.gather(data, root=root, tag="gather_json")
        return None if blocks is None else [json.loads(b.tobytes().decode()) for b in blocks]

    def barrier(self):
        self.comm.Barrier()


class NCCLGroup(MPIGroup):
    """An MPI group that also holds an NCCL communicator: CuPy arrays travel over NCCL (on
    the current stream, or overlapped on a side stream; no host copy), host arrays over MPI
    as in `MPIGroup`.

    The NCCL unique id is made on group rank 0 and broadcast over the group's MPI
    communicator; the CUDA device must be chosen before the group is made. NCCL collectives
    need equal counts, so uneven parts are padded to the largest part on the wire.

    In a pair on one host, allgathers, reduce-scatters and the pairwise exchange move their
    blocks by the copy engines instead (`jigsaw.peer`, no SM taken from the GEMMs beside them,
    no padding); small allreduces stay on NCCL.
    """

    def __init__(self, comm, name: str):
        super().__init__(comm, name)
        from cupy.cuda import nccl
        self._nccl = nccl
        uid = nccl.get_unique_id()  # every rank makes one to learn its type; rank 0's is used
        buf = np.frombuffer(bytes(uid) if isinstance(uid, bytes) else
                            np.asarray(uid, dtype=np.int8).tobytes(), dtype=np.uint8).copy()
        self.comm.Bcast(buf, root=0)  # [128] bytes
        uid = bytes(buf) if isinstance(uid, bytes) else tuple(int(v) for v in buf.view(np.int8))
        self.nccl = nccl.NcclCommunicator(self.size, uid, self.rank)
        self._side, self._in_flight = None, []  # stream and arrays of overlapped collectives
        self._pending = False  # work queued on the side stream since the last `wait()`
        self._peer = None  # `peer.PeerCopies` of a pair on one host, False where none

    def transport(self) -> str:
        """Collective where not yet settled (the copy-engine set-up)."""
        if self.size == 1:
            return "none (one rank)"
        return "NCCL kernels + copy engines (CUDA IPC)" if self._peer_copies() else "NCCL kernels"

    def _peer_copies(self):
        """The copy-engine transfers of a 2-rank group on one host (`jigsaw.peer`), set up
        by the first collective that asks (both members ask at the same point); None where
        the group is larger, spans hosts, has no CUDA IPC, or WEATHERMIXER_PEER_COPIES=0."""
        if self._peer is None:
            self._peer = (peer.PeerCopies.connect(self) if self.size == 2 and peer.wanted()
                          else None) or False
        return self._peer or None

    def _pair_copy(self, tag: str, region, into, overlap: bool, keep=(), kept: bool = False,
                   then=None):
        """One copy-engine exchange of the pair (`peer.PeerCopies`): expose `region` to the
        other member and copy its region into `into`, then `then(stream)` on the same stream
        (where given), on the stream `_launch` picks. Returns `_launch`'s event."""
        pull = self._peer.begin(region, kept=kept)

        def collective(stream):
            pull.into(into, stream)
            if then is not None:
                then(stream)

        return self._launch(tag, region.nbytes, collective, overlap, keep=keep)

    # -- helpers -------------------------------------------------------------------------
    def _dtype(self, x):
        codes = {"float32": self._nccl.NCCL_FLOAT32, "float64": self._nccl.NCCL_FLOAT64,
                 "int32": self._nccl.NCCL_INT32, "int64": self._nccl.NCCL_INT64}
        return codes[x.dtype.name]

    def _launch(self, tag: str, nbytes: float, collective, overlap: bool = False, keep=()):
        """Queue collective(stream pointer). On the current stream by default (timed on its
        own while the bench asks: `COMM_LOG.synchronize`); with `overlap`, on this group's
        side stream once the work queued so far on the current stream is done, while the
        current stream goes on at once: `wait()` joins the two, and the arrays in `keep`
        (the buffers on the wire) stay alive until then. Returns an event recorded on the
        side stream after this collective (None on the current stream)."""
        import cupy
        current = cupy.cuda.get_current_stream()
        if overlap and not COMM_LOG.synchronize:
            side = self._side_stream()
            side.wait_event(current.record())
            collective(side.ptr)
            self._in_flight.extend(keep)
            self._pending = True
            COMM_LOG.record(tag, nbytes, 0.0)
            return side.record()
        if COMM_LOG.synchronize:  # wait for queued compute first: it is not communication
            current.synchronize()
        t0 = time.perf_counter()
        collective(current.ptr)
        if COMM_LOG.synchronize:
            current.synchronize()
        COMM_LOG.record(tag, nbytes, time.perf_counter() - t0)
        return None

    # -- collectives on device arrays ----------------------------------------------------
    def allreduce(self, x, op: str = "sum", tag: str = "allreduce", overlap: bool = False):
        """With `overlap`, the sum runs in place on this group's side stream (see `_launch`):
        the result is complete after `wait()`."""
        if self.size == 1 or not is_device_array(x):
            return super().allreduce(x, op, tag, overlap)
        xp = get_array_module(x)
        send = xp.ascontiguousarray(x)
        recv = send if overlap else xp.empty_like(send)
        ops = {"sum": self._nccl.NCCL_SUM, "max": self._nccl.NCCL_MAX, "min": self._nccl.NCCL_MIN}
        self._launch(tag, 2 * send.nbytes * (self.size - 1) / self.size,
                     lambda stream: self.nccl.allReduce(send.data.ptr, recv.data.ptr, send.size,
                                                        self._dtype(send), ops[op], stream),
                     overlap, keep=(send,))
        return recv

    def _side_stream(self):
        import cupy
        if self._side is None:
            self._side = cupy.cuda.Stream(non_blocking=True)
        return self._side

    def wait(self):
        """Make the current stream wait for every overlapped collective of this group."""
        if self._pending:
            import cupy
            cupy.cuda.get_current_stream().wait_event(self._side.record())
            self._in_flight.clear()
            self._pending = False

    def allgather(self, x, axis: int, sizes, tag: str = "allgather"):
        return self.start_allgather(x, axis, sizes, tag, overlap=False).get()

    def reduce_scatter(self, x, axis: int, sizes, tag: str = "reduce_scatter"):
        return self.start_reduce_scatter(x, axis, sizes, tag, overlap=False).get()

    def start_allgather(self, x, axis: int, sizes, tag: str = "allgather", overlap: bool = True):
        """The parts form on the side stream (`InFlight`), this rank's block padded to the
        largest part on the wire where parts differ."""
        if self.size == 1 or not is_device_array(x):
            return super().start_allgather(x, axis, sizes, tag)
        xp = get_array_module(x)
        if self._peer_copies():
            return self._pair_allgather(x, axis, sizes, tag, overlap)
        m, even = max(sizes), all(s == max(sizes) for s in sizes)
        part = xp.moveaxis(x, axis, 0)  # [sizes[rank], ...rest]
        send = xp.ascontiguousarray(part) if even else _pad_first(part, m)  # [m, ...rest]
        recv = xp.empty((self.size,) + send.shape, dtype=send.dtype)  # [parts, m, ...rest]
        event = self._launch(tag, send.nbytes * (self.size - 1),
                             lambda stream: self.nccl.allGather(send.data.ptr, recv.data.ptr,
                                                                send.size, self._dtype(send),
                                                                stream), overlap)

        def concatenate(stacked):
            full = (stacked.reshape((-1,) + stacked.shape[2:]) if even else  # no copy
                    xp.concatenate([stacked[p, :s] for p, s in enumerate(sizes)]))
            return xp.moveaxis(full, 0, axis)

        return InFlight(recv, event, keep=(send,), finish=concatenate)

    def _pair_allgather(self, x, axis: int, sizes, tag: str, overlap: bool):
        """`start_allgather` by the copy engines: the other member's part is copied from its
        memory into ours, unpadded."""
        xp, r, q, o = get_array_module(x), self.rank, 1 - self.rank, offsets(sizes)
        mine = xp.ascontiguousarray(xp.moveaxis(x, axis, 0))  # [sizes[r], ...rest]
        full = xp.empty((o[-1],) + mine.shape[1:], dtype=x.dtype)  # [sum(sizes), ...rest]
        event = self._pair_copy(tag, mine, full[o[q]:o[q + 1]], overlap,
                                then=lambda stream: _copy_async(full[o[r]:o[r + 1]], mine,
                                                                stream))
        return InFlight(full, event, keep=(mine,), finish=lambda f: xp.moveaxis(f, 0, axis))

    def start_reduce_scatter(self, x, axis: int, sizes, tag: str = "reduce_scatter",
                             overlap: bool = True):
        """The parts form on the side stream (`InFlight`), every part padded to the largest
        one on the wire where parts differ."""
        if self.size == 1 or not is_device_array(x):
            return super().start_reduce_scatter(x, axis, sizes, tag)
        xp = get_array_module(x)
        if self._peer_copies():
            return self._pair_reduce_scatter(x, axis, sizes, tag, overlap)
        m = max(sizes)
        full = xp.moveaxis(x, axis, 0)  # [sum(sizes), ...rest]
        if all(s == m for s in sizes):
            parts = xp.ascontiguousarray(full).reshape((self.size, m) + full.shape[1:])
        else:
            parts = xp.zeros((self.size, m) + full.shape[1:], dtype=x.dtype)  # padded parts
            o = offsets(sizes)
            for p, s in enumerate(sizes):
                parts[p, :s] = full[o[p]:o[p + 1]]
        recv = xp.empty(parts.shape[1:], dtype=parts.dtype)  # [m, ...rest]
        event = self._launch(tag, parts.nbytes * (self.size - 1) / self.size,
                             lambda stream: self.nccl.reduceScatter(
                                 parts.data.ptr, recv.data.ptr, recv.size, self._dtype(recv),
                                 self._nccl.NCCL_SUM, stream), overlap)
        return InFlight(recv, event, keep=(parts,),
                        finish=lambda mine: xp.moveaxis(mine[:sizes[self.rank]], 0, axis))

    def _pair_reduce_scatter(self, x, axis: int, sizes, tag: str, overlap: bool):
        """`start_reduce_scatter` by the copy engines: the other member's partial sum of our
        part is copied from its memory, then ours is added to it on the same stream."""
        import cupy
        xp, r, q, o = get_array_module(x), self.rank, 1 - self.rank, offsets(sizes)
        full = xp.ascontiguousarray(xp.moveaxis(x, axis, 0))  # [sum(sizes), ...rest]
        recv = xp.empty((sizes[r],) + full.shape[1:], dtype=x.dtype)  # [sizes[r], ...rest]

        def add_ours(stream):
            with cupy.cuda.ExternalStream(stream):
                cupy.add(recv, full[o[r]:o[r + 1]], out=recv)

        event = self._pair_copy(tag, full[o[q]:o[q + 1]], recv, overlap, then=add_ours)
        return InFlight(recv, event, keep=(full,), finish=lambda mine: xp.moveaxis(mine, 0, axis))

    def allgather_in_place(self, flat, sizes, tag: str = "allgather", overlap: bool = False,
                           kept: bool = False):
        """With `overlap`, on the side stream: complete after `wait()`. Equal parts gather in
        place (NCCL's in-place allgather: the send buffer is this rank's part of `flat`);
        unequal ones through a padded buffer, copied back on the same stream."""
        if self.size == 1 or not is_device_array(flat):
            return super().allgather_in_place(flat, sizes, tag, overlap, kept)
        import cupy
        m, o = max(sizes), offsets(sizes)
        if self._peer_copies():  # the other member's part copied straight into `flat`
            r, q = self.rank, 1 - self.rank
            return self._pair_copy(tag, flat[o[r]:o[r + 1]], flat[o[q]:o[q + 1]], overlap,
                                   keep=(flat,), kept=kept)
        if all(s == m for s in sizes):
            send, recv, keep = flat[o[self.rank]:o[self.rank + 1]], flat, (flat,)
        else:
            send = _pad_first(flat[o[self.rank]:o[self.rank + 1]], m)  # [m]
            recv = cupy.empty((self.size, m), dtype=flat.dtype)  # [parts, m]
            keep = (flat, send, recv)

        def collective(stream):
            self.nccl.allGather(send.data.ptr, recv.data.ptr, m, self._dtype(flat), stream)
            if recv is not flat:
                with cupy.cuda.ExternalStream(stream):
                    for p, s in enumerate(sizes):
                        flat[o[p]:o[p + 1]] = recv[p, :s]

        return self._launch(tag, m * flat.itemsize * (self.size - 1), collective, overlap,
                            keep=keep)

    def allgather_parts(self, x, tag: str = "allgather", overlap: bool = False):
        """With `overlap`, on the side stream: complete after `wait()`. By the copy engines the
        own slot is left unset: the caller holds that block (`PartsGather` reads it there)."""
        if self.size == 1 or not is_device_array(x):
            return super().allgather_parts(x, tag)
        xp = get_array_module(x)
        send = xp.ascontiguousarray(x)
        recv = xp.empty((self.size,) + send.shape, dtype=send.dtype)
        if self._peer_copies():  # the own slot is left unset: the caller holds its block
            self._pair_copy(tag, send, recv[1 - self.rank], overlap, keep=(send, recv))
            return recv
        self._launch(tag, send.nbytes * (self.size - 1),
                     lambda stream: self.nccl.allGather(send.data.ptr, recv.data.ptr, send.size,
                                                        self._dtype(send), stream),
                     overlap, keep=(send, recv))
        return recv

    def parts_exchange(self, store, tag: str = "reduce_scatter"):
        if self.size == 1 or not is_device_array(store):
            return super().parts_exchange(store, tag)
        return PairwiseExchange(self, store, tag)

    def parts_gather(self, x, tag: str = "allgather"):
        if self.size == 1 or not is_device_array(x):
            return super().parts_gather(x, tag)
        return PartsGather(self, x, tag, overlap=True)


def _copy_async(dst, src, stream_ptr: int):
    """dst <- src (C-contiguous device arrays of one size) on the stream `stream_ptr`."""
    import cupy
    cupy.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, src.nbytes,
                                  cupy.cuda.runtime.memcpyDeviceToDevice, stream_ptr)


def _pad_first(a, m: int):
    """a [s, ...] -> [m, ...], zeros after s (uneven parts travel padded to one shape)."""
    out = get_array_module(a).zeros((m,) + a.shape[1:], dtype=a.dtype)
    out[:a.shape[0]] = a
    return out


class PairwiseExchange(PartsExchange):
    """`PartsExchange` over NCCL. In round s = 1 .. size-1 this rank sends its partial for
    member rank+s and receives member rank-s's partial for its own block (a send and a recv,
    grouped, on the group's side stream) as soon as the block is computed, while the caller
    computes the next one (by the copy engines for a pair, `_pair_copy`); the own block comes
    last (in two pieces where `split_own` and the caller asks for `own_pieces`), and the
    received partials are added to it. The same bytes as one reduce-scatter, hidden behind the
    GEMMs of the later blocks."""

    def __init__(self, group, store, tag: str):
        super().__init__(group, store, tag)
        r, n = group.rank, group.size
        # NCCL's send needs SMs, which a GEMM holds until it ends: the own block is computed
        # in two pieces so that the send of the block before starts between them. The copy
        # engines need none, and start as soon as the block is done: one GEMM then.
        self.split_own = not group._peer_copies()
        self.order = [(r + s) % n for s in range(1, n)] + [r]
        self.received = get_array_module(store).empty((n - 1,) + store.shape[1:],
                                                      dtype=store.dtype)  # [size - 1, ...]
        self.pieces = None

    def own_pieces(self, width: int):
        """Where the caller computes its own block, whose first `width` columns hold values:
        two column halves [(c0, c1, piece [.., R, c1 - c0])], each a C-contiguous array laid
        in the own slot of `store` (which never travels). A cuBLAS GEMM on Hopper keeps every
        SM until it ends, so the send of the block before could start only after a
        whole-block GEMM; it starts between the halves, and runs beside the second."""
        lead = self.store.shape[1:-1]  # (.., R)
        slot = self.store[self.group.rank].reshape(-1)  # the own slot's memory, in order
        cuts = sorted({0, width // 2, width})
        self.pieces, start = [], 0
        for c0, c1 in zip(cuts, cuts[1:]):
            n = int(np.prod(lead, dtype=np.int64)) * (c1 - c0)
            self.pieces.append((c0, c1, slot[start:start + n].reshape(lead + (c1 - c0,))))
            start += n
        return self.pieces

    def ready(self, p: int):
        g, r, n = self.group, self.group.rank, self.group.size
        if p == r:
            return
        s = (p - r) % n
        send = get_array_module(self.store).ascontiguousarray(self.store[p])
        recv, dtype = self.received[s - 1], g._dtype(send)
        if g._peer_copies():
            g._pair_copy(self.tag, send, recv, overlap=True, keep=(send, self.received))
            return

        def exchange(stream):
            g._nccl.groupStart()
            g.nccl.send(send.data.ptr, send.size, dtype, p, stream)
            g.nccl.recv(recv.data.ptr, recv.size, dtype, (r - s) % n, stream)
            g._nccl.groupEnd()

        g._launch(self.tag, send.nbytes, exchange, overlap=True, keep=(send, self.received))

    def result(self):
        """[.., R, m]: the own block plus the received partials (columns past the `width` of
        `own_pieces`, if used, are left unset: they are padding)."""
        self.group.wait()
        xp = get_array_module(self.store)
        mine = xp.empty(self.store.shape[1:], dtype=self.store.dtype)
        pieces = self.pieces or [(0, mine.shape[-1], self.store[self.group.rank])]
        for c0, c1, piece in pieces:
            out = mine[..., c0:c1]
            xp.add(piece, self.received[0][..., c0:c1], out=out)
            for extra in self.received[1:]:
                out += extra[..., c0:c1]
        return mine
