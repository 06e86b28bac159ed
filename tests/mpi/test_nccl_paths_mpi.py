"""`NCCLGroup`'s device paths on CPUs: padding, pairwise exchanges, side-stream results.

No GPU here, so stand-ins take the place of CuPy and NCCL. `Dev` is a numpy array that
answers `.data.ptr` as a CuPy array does, a fake `cupy` gives streams and events that do
nothing (every call completes at once), and `FakeNccl` carries out each NCCL call with the
matching MPI collective on the memory behind the pointers it is given. What this checks is
the bookkeeping of the device paths: which bytes go where, padding of uneven parts, the
partner order of `PairwiseExchange`, the `finish` of an `InFlight`. The overlap itself (streams
and events) runs only on the GPU machine (tests/test_gpu.py). The expected results are those
of tests/mpi/test_backend_mpi.py, built from every rank's seed without the backend.
"""
import ctypes
import sys
import types

import numpy as np
import pytest
from mpi4py import MPI

from tests.mpi.harness import WORLD, assert_all
from tests.mpi.test_backend_mpi import N, RANK, SIZES, error, expected, gather_in_place, inputs
from weathermixer.jigsaw import backend
from weathermixer.jigsaw.backend import MPIGroup, NCCLGroup


class Dev(np.ndarray):
    """A host array posing as a device array: `.data.ptr` is its address."""

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)


def _dev(a):
    return np.asarray(a).view(Dev)


def _at(ptr: int, count: int, dtype):
    """The `count` elements of `dtype` at address `ptr`, as a writable numpy array."""
    size = count * np.dtype(dtype).itemsize
    return np.frombuffer((ctypes.c_char * size).from_address(ptr), dtype=dtype, count=count)


class _Stream:
    ptr = 0

    def __init__(self, ptr=0):
        self.ptr = ptr

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def record(self):
        return object()

    def wait_event(self, event):
        pass

    def synchronize(self):
        pass


def _fake_cupy():
    """What backend.py asks of CuPy, on host arrays: the array functions return `Dev`."""
    mod = types.ModuleType("cupy")
    stream = _Stream()
    mod.cuda = types.SimpleNamespace(get_current_stream=lambda: stream,
                                     Stream=lambda **kw: _Stream(),
                                     ExternalStream=_Stream)
    mod.empty = lambda shape, dtype: _dev(np.empty(shape, dtype))
    mod.zeros = lambda shape, dtype: _dev(np.zeros(shape, dtype))
    mod.empty_like = lambda a: _dev(np.empty_like(a))
    mod.ascontiguousarray = lambda a: _dev(np.ascontiguousarray(a))
    mod.concatenate = lambda arrays: _dev(np.concatenate(arrays))
    mod.moveaxis = lambda a, src, dst: _dev(np.moveaxis(a, src, dst))
    mod.add = np.add
    return mod


class FakeNccl:
    """An NCCL communicator whose calls are MPI collectives on the memory at the pointers.
    Also stands in for the `cupy.cuda.nccl` module (dtype and op codes, group calls)."""
    NCCL_FLOAT32, NCCL_FLOAT64 = np.float32, np.float64
    NCCL_INT32, NCCL_INT64 = np.int32, np.int64
    NCCL_SUM, NCCL_MAX, NCCL_MIN = MPI.SUM, MPI.MAX, MPI.MIN

    def __init__(self, comm):
        self.comm, self.n, self.grouped = comm, comm.Get_size(), None

    def allGather(self, send, recv, count, dtype, stream):
        in_place = send == recv + self.comm.Get_rank() * count * np.dtype(dtype).itemsize
        self.comm.Allgather(MPI.IN_PLACE if in_place else _at(send, count, dtype),
                            _at(recv, count * self.n, dtype))

    def reduceScatter(self, send, recv, count, dtype, op, stream):
        self.comm.Reduce_scatter_block(_at(send, count * self.n, dtype), _at(recv, count, dtype),
                                       op=op)

    def allReduce(self, send, recv, count, dtype, op, stream):
        out = _at(recv, count, dtype)
        self.comm.Allreduce(MPI.IN_PLACE if send == recv else _at(send, count, dtype), out, op=op)

    # point to point: a send and a recv between groupStart and groupEnd, done as one Sendrecv
    def groupStart(self):
        self.grouped = {}

    def send(self, ptr, count, dtype, peer, stream):
        self.grouped["send"] = (_at(ptr, count, dtype), peer)

    def recv(self, ptr, count, dtype, peer, stream):
        self.grouped["recv"] = (_at(ptr, count, dtype), peer)

    def groupEnd(self):
        (out, dest), (into, source) = self.grouped["send"], self.grouped["recv"]
        self.comm.Sendrecv(out, dest, recvbuf=into, source=source)
        self.grouped = None


@pytest.fixture
def group(monkeypatch):
    """An `NCCLGroup` over COMM_WORLD whose device paths run on `Dev` arrays."""
    cupy = _fake_cupy()
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setattr(backend, "is_device_array", lambda x: isinstance(x, Dev))
    host_module = backend.get_array_module
    monkeypatch.setattr(backend, "get_array_module",
                        lambda x: cupy if isinstance(x, Dev) else host_module(x))
    g = NCCLGroup.__new__(NCCLGroup)
    MPIGroup.__init__(g, WORLD, "world")
    fake = FakeNccl(WORLD)
    g._nccl, g.nccl = fake, fake  # the module's codes and group calls, and the communicator
    g._side, g._in_flight, g._pending = None, [], False
    g._peer = False  # NCCL's paths; `test_without_cuda_ipc_a_pair_falls_back_to_nccl` asks
    return g


def device_collectives(g) -> dict:
    """name -> this rank's call of the NCCL path that `expected()` has a result for."""
    mine = {k: _dev(v) for k, v in inputs(RANK).items()}

    def exchange(width=None):
        """The own block written through `own_pieces(width)` where the exchange asks for
        pieces: the first `width` of its columns (the rest is padding, not compared)."""
        parts = mine["parts"]  # [N, R, m]
        width = parts.shape[-1] if width is None else width
        store = _dev(np.empty_like(parts))
        ex = g.parts_exchange(store)
        assert ex.order[-1] == RANK and sorted(ex.order) == list(range(N)), ex.order
        for p in ex.order:
            if p == RANK and ex.split_own:
                pieces = ex.own_pieces(width)
                assert [(c0, c1) for c0, c1, _ in pieces] == [(0, width // 2), (width // 2, width)]
                for c0, c1, piece in pieces:
                    assert piece.flags.c_contiguous and np.shares_memory(piece, store[RANK])
                    piece[...] = parts[p][..., c0:c1]
            else:
                store[p] = parts[p]
            ex.ready(p)
        return ex.result()[..., :width]

    def gather():
        gathered = g.parts_gather(mine["x"])
        assert gathered.order[0] == RANK, gathered.order
        blocks = [gathered.block(p) for p in gathered.order]
        assert all(isinstance(b, Dev) for b in blocks)
        return _dev(np.stack([blocks[gathered.order.index(p)] for p in range(N)]))

    def overlapped_allreduce():
        out = g.allreduce(mine["x"].copy(), "sum", overlap=True)
        g.wait()
        return out

    return {"allreduce_sum": overlapped_allreduce,
            "allreduce_max": lambda: g.allreduce(mine["x"], "max"),
            "allgather": lambda: g.allgather(mine["block"], 1, SIZES),
            "reduce_scatter": lambda: g.reduce_scatter(mine["full"], -1, SIZES),
            "allgather_parts": lambda: g.allgather_parts(mine["x"]),
            "start_allgather": lambda: g.start_allgather(mine["block"], 1, SIZES).get(),
            "start_reduce_scatter": lambda: g.start_reduce_scatter(mine["full"], -1,
                                                                   SIZES).get(),
            "allgather_in_place": lambda: gather_in_place(g, mine["flat"], SIZES),
            "allgather_in_place_even": lambda: gather_in_place(g, mine["flat_even"], [2] * N),
            "parts_exchange": exchange,
            "parts_exchange_padded": lambda: exchange(width=2),
            "parts_gather": gather}


def test_device_paths_of_nccl_group(group):
    want = expected()
    want["parts_exchange_padded"] = want["parts_exchange"][..., :2]
    for name, call in device_collectives(group).items():
        out = call()
        on_device = N == 1 or isinstance(out, Dev)
        err = error(np.asarray(out), want[name])
        assert_all(on_device and err < 1e-12,
                   f"{name} on {N} ranks: relative error {err}, result on the device: {on_device}")
    assert_all(group._in_flight == [] or group._pending, "buffers kept with nothing in flight")



def test_without_cuda_ipc_a_pair_falls_back_to_nccl(group):
    """A pair group asks for copy-engine transfers on its first device collective
    (`jigsaw.peer.PeerCopies.connect`, collective); with no CUDA IPC here (no libcuda, a fake
    CuPy) both members give up together, without hanging, and the collective goes by NCCL."""
    group._peer = None
    out = group.allgather(_dev(inputs(RANK)["block"]), 1, SIZES)
    err = error(np.asarray(out), expected()["allgather"])
    assert_all(err < 1e-12 and group._peer_copies() is None and group._peer is False,
               f"fallback on {N} ranks: relative error {err}, engine {group._peer}")
