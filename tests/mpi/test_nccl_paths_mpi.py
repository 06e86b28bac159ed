"""`NCCLGroup`'s device paths on CPUs: padding, pairwise exchanges, side-stream results.

No GPU here, so stand-ins take the place of CuPy and NCCL. `Dev` is a numpy array that
answers `.data.ptr` as a CuPy array does, a fake `cupy` gives streams and events that do
nothing (every call completes at once), and `FakeNccl` carries out each NCCL call with the
matching MPI collective on the memory behind the pointers it is given. What this checks is
the bookkeeping of the device paths: which bytes go where, padding of uneven parts, the
partner order of `PairwiseExchange`, the `finish` of an `InFlight`. The overlap itself (streams
and events) runs only on the GPU machine (tests/test_gpu.py). The expected results are those
of tests/mpi/test_backend_mpi.py, built from every rank's seed without the backend.

The copy-engine paths of a pair (`jigsaw.peer`) run the same checks on 2 ranks through
`FakeIpcRuntime`, which stands in for CUDA IPC: the descriptors, acknowledgements and
settling of `PeerCopies` are the real ones; only the copy from the other GPU's memory is a
swap of the exposed regions over MPI.
"""
import ctypes
import sys
import types

import numpy as np
import pytest
from mpi4py import MPI

from tests.mpi.harness import WORLD, assert_all
from tests.mpi.test_backend_mpi import N, RANK, SIZES, error, expected, gather_in_place, inputs
from weathermixer.jigsaw import backend, peer
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


# ---- the copy-engine paths of a pair (jigsaw/peer.py) -------------------------------------
PEER = 1 << 62  # "mapped" pointers of the other rank are tagged with this bit


class FakeIpcRuntime:
    """`cupy.cuda.runtime` for `jigsaw.peer` on host memory. A handle carries the owner's
    address; opening it gives that address tagged with PEER. A copy from a tagged address
    is carried out as a swap with the other rank of the region it last exposed (both members
    pull at the same point of every exchange), any other copy as a memmove. Event records and
    waits are logged, to check when the compute stream is made to wait."""
    memcpyDeviceToDevice = 3

    def __init__(self, comm):
        self.comm, self.other, self.log, self.exposed_at = comm, 1 - comm.Get_rank(), [], None

    def ipcGetEventHandle(self, ptr):
        return int(ptr).to_bytes(64, "little")

    def ipcOpenEventHandle(self, handle):
        return ("theirs", int.from_bytes(handle, "little"))

    def ipcGetMemHandle(self, ptr):
        self.exposed_at = ptr  # the region of this exchange starts here
        return int(ptr).to_bytes(64, "little")

    def ipcOpenMemHandle(self, handle):
        return int.from_bytes(handle, "little") | PEER

    def eventRecord(self, event, stream):
        self.log.append(("record", event))

    def streamWaitEvent(self, stream, event, flags):
        self.log.append(("wait", event))

    def memcpyAsync(self, dst, src, nbytes, kind, stream):
        if src & PEER:
            wanted = np.empty(1, dtype=np.int64)  # what the other pulls from our region
            self.comm.Sendrecv(np.array([nbytes]), self.other, 7399, wanted, self.other, 7399)
            self.comm.Sendrecv(_at(self.exposed_at, int(wanted[0]), np.uint8), self.other, 7398,
                               _at(dst, nbytes, np.uint8), self.other, 7398)
        else:
            ctypes.memmove(dst, src, nbytes)

    def memcpy(self, dst, src, nbytes, kind):
        self.memcpyAsync(dst, src, nbytes, kind, 0)

    def ipcCloseMemHandle(self, ptr):  # called by the unmapper thread
        self.log.append(("close", ptr))

    def getDevice(self):
        return 0

    def setDevice(self, device):
        pass


class FakeMemoryHook:
    """`cupy.cuda.MemoryHook`: entering one records it in `installed`."""
    installed: list = []

    def __enter__(self):
        FakeMemoryHook.installed.append(self)
        return self


class _Event:
    count = 0

    def __init__(self, **flags):
        _Event.count += 1
        self.ptr = 1000 + _Event.count


@pytest.fixture
def pair(group, monkeypatch):
    """`group` whose pair paths run on `FakeIpcRuntime` (set up by its first collective)."""
    cupy = sys.modules["cupy"]
    runtime = FakeIpcRuntime(WORLD)
    cupy.cuda.runtime, cupy.cuda.Event, cupy.cuda.MemoryHook = runtime, _Event, FakeMemoryHook
    cupy.cuda.Device = lambda: types.SimpleNamespace(synchronize=lambda: None)
    cupy.full = lambda n, v, dtype: _dev(np.full(n, v, dtype))
    cupy.float32 = np.float32
    monkeypatch.setattr(peer, "_Driver", lambda: types.SimpleNamespace(allocation_of=int))
    group._peer = None
    return group, runtime


def test_copy_engine_paths_of_a_pair(pair):
    """On 2 ranks every device collective that moves blocks goes by `jigsaw.peer` and gives
    the numbers of `expected()` (uneven parts unpadded, the reduce-scatter's add, the
    pairwise exchange, the in-place gather); on 1 or 3 ranks there is no pair to set up."""
    group, runtime = pair
    want = expected()
    want["parts_exchange_padded"] = want["parts_exchange"][..., :2]
    calls = device_collectives(group)
    own_filled = calls["allgather_parts"]  # by the copy engines the own slot is the caller's

    def allgather_parts():
        out = own_filled()
        out[RANK] = inputs(RANK)["x"]
        return out

    calls["allgather_parts"] = allgather_parts
    for name, call in calls.items():
        out = call()
        err = error(np.asarray(out), want[name])
        assert_all(err < 1e-12, f"{name} on {N} ranks by the copy engines: error {err}")
    engine = group._peer_copies()
    assert_all((engine is not None) == (N == 2), f"engine on {N} ranks: {engine}")
    if N == 2:
        assert_all(engine.count >= 10 and len(engine.exposed) <= peer.LAG + 1,
                   f"{engine.count} exchanges, {len(engine.exposed)} unsettled")


def test_kept_regions_wait_for_the_next_region_that_is_not_kept(pair):
    """The optimizer's in-place gathers (`kept`) come in quick succession: settling them one
    by one would make the compute stream wait for each of the other GPU's copies. They stay
    unsettled (no wait on the other's `copied` events) until the next exchange of a region
    that is not kept, which settles them all first: the owner may write a kept region after
    that exchange."""
    group, runtime = pair
    if N != 2:
        assert_all(group._peer_copies() is None)
        return
    flat = _dev(inputs(RANK)["flat"])
    group.allgather(_dev(inputs(RANK)["block"]), 1, SIZES)  # sets up; one exchange
    engine = group._peer_copies()

    def copied_waits():
        return [e for kind, e in runtime.log if kind == "wait" and e in engine.their_copied]

    before = len(copied_waits())
    for _ in range(peer.LAG + 5):
        group.allgather_in_place(flat, SIZES, overlap=True, kept=True)
    kept_waits = len(copied_waits()) - before
    unsettled = [k for _, _, k in engine.exposed]
    group.allgather(_dev(inputs(RANK)["block"]), 1, SIZES)  # a region that is not kept
    left = [k for _, _, k in engine.exposed]
    group.wait()
    assert_all(kept_waits <= 1 and unsettled.count(True) == peer.LAG + 5 and True not in left
               and len(left) <= peer.LAG + 1,
               f"waits during the kept gathers {kept_waits}, unsettled then {unsettled}, "
               f"after the next exchange {left}")


def test_the_other_closes_its_mappings_of_memory_we_freed(pair):
    """A mapping by the other member keeps our memory taken after our pool frees it. Before
    every cudaMalloc (the memory hook that set-up installs) `reclaim` finds the allocations we
    exposed that are no longer allocated, and the other's unmapper thread closes its mappings
    of them, and only of them, before `reclaim` returns."""
    group, runtime = pair
    if N != 2:
        assert_all(group._peer_copies() is None)
        return
    group.allgather(_dev(inputs(RANK)["block"]), 1, SIZES)  # sets up; one exchange
    engine = group._peer_copies()
    seen = set(engine.exported)
    group.allgather(_dev(inputs(RANK)["block"] + 1), 1, SIZES)  # a region to free
    freed = set(engine.exported) - seen
    group.allgather(_dev(inputs(RANK)["block"] + 2), 1, SIZES)  # one to keep
    kept = set(engine.exported) - seen - freed
    group.wait()

    def allocation_of(ptr):
        if ptr in freed:
            raise RuntimeError("cuMemGetAddressRange failed (1)")
        return ptr

    engine.driver = types.SimpleNamespace(allocation_of=allocation_of)
    hook = [h for h in FakeMemoryHook.installed if h.name.endswith(str(id(engine)))]
    # handles here: the fake's handle is the owner's address; theirs, as the other sees them
    mine = [engine.exported[b] for b in sorted(freed)] + [engine.exported[b] for b in kept]
    theirs = WORLD.sendrecv(mine, dest=1 - RANK, source=1 - RANK)
    hook[0].alloc_preprocess(device_id=0, mem_size=512)  # our freed one goes
    WORLD.Barrier()  # the other's request has been answered too
    closed = [ptr for kind, ptr in runtime.log if kind == "close"]
    their_freed, their_kept = theirs[:len(freed)], theirs[len(freed):]
    assert_all(len(freed) == 1 and len(hook) == 1
               and [int.from_bytes(h, "little") | PEER for h in their_freed] == closed
               and not any(h in engine.mapped for h in their_freed)
               and all(h in engine.mapped for h in their_kept)
               and not freed & set(engine.exported) and kept <= set(engine.exported),
               f"freed {freed}, kept {kept}, closed {closed}, mapped {list(engine.mapped)}")
