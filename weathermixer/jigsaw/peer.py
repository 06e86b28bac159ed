"""Copy-engine transfers between the two GPUs of a pair group on one node (CUDA IPC).

NCCL moves bytes with kernels that need SMs. Beside a cuBLAS GEMM, which holds every SM until
it ends, such a kernel waits for the GEMM or slows it. Between two GPUs of one node, a DMA copy
from the other GPU's memory (`cudaMemcpyAsync` from a pointer mapped by CUDA IPC) runs on the
copy engines and uses no SM. Measured on an H200 pair over NVLink (docs/benchmarks.md): 392
GB/s alone and just as fast beside GEMMs, which ran no slower. NCCL's allgather reached 232
GB/s and waited for the GEMMs.

Every transfer is one `exchange`, made by both members in the same order: each exposes one
region of its device memory to the other and pulls the other's region into a buffer of its
own. Exchange i, with event slot s = i mod SLOTS, on each member:

  1. settle the exchanges before i - LAG: for each, receive the other's acknowledgement and
     make the current stream wait until the other's copy of our region has ended (its
     `copied` event). Only then is the region released to the memory pool. Settling LAG
     exchanges late leaves the other's copies time to end before the current stream gets
     there. A `kept` region (a parameter, which its owner writes again only after a later
     exchange of the group) is settled at the next exchange of a region that is not kept,
     or when event slots run short: the optimizer's gathers, one per parameter in quick
     succession, then never make the current stream wait, and the next step's first
     reduce-scatter settles them all (their copies ended long before).
  2. record `ready[s]` on the current stream: from there on the region holds its values;
  3. swap descriptors with the other member over MPI: the IPC handle of the region's
     allocation, the region's offset in it and its bytes (a host wait for the other host);
  4. on the stream given: wait for the other's `ready[s]`, copy its region into ours (copy
     engine), then record our `copied[s]`;
  5. send the acknowledgement of exchange i: step 4's wait and record are queued.

A member records an event slot again only after the other has queued its wait on the last
record of that slot. For `ready` this holds by steps 1 and 5. For `copied` it holds because
the other settles i before it swaps the descriptors of i + SLOTS - 1 (at most SLOTS - 2
exchanges stay unsettled), and the swap keeps the two members in lockstep.

An allocation is mapped once (opening a handle took 3 to 4 ms) and kept mapped, looked up by
its handle. A handle names one allocation, so a block that the pool freed and allocated again
gets a new handle and a new mapping.

A mapping keeps the other's memory taken: when the owner's pool frees an allocation the other
has mapped, its memory stays taken until the other closes the mapping. Measured on an H200
pair (docs/benchmarks.md, seventh session): each time the pool's free blocks were freed, 2.0 to
4.5 GiB more a GPU stayed taken outside the pool (none with NCCL alone), and the 8.1 B model
that trains on two cards acting as H100s with NCCL alone ran out of memory in its second
step. So each member runs an unmapper: a thread that closes, on the other's request,
the mappings of allocations the other has freed, and answers when they are closed (a Unix
socket between the two processes of one host). Each member remembers the allocations it has
exposed (`exported`); before every cudaMalloc of its pool (a CuPy memory hook, `reclaim`) it
finds those freed since (no longer allocated, or a new allocation at the same address) and
asks the other to close them. CuPy's pool, when cudaMalloc fails, frees its free blocks and
tries again: the second try finds the memory back. Closing is safe then: the owner releases a
region to its pool only after its stream has waited for the other's copy of it (step 1), and
cudaFree waits for that stream.
"""
from __future__ import annotations

import collections
import ctypes
import os
import socket
import threading

import numpy as np

SLOTS = 64  # event slots: bounds the exchanges left unsettled (SLOTS - 2)
LAG = 2  # exchanges always left unsettled
PEER_COPIES_ENV = "WEATHERMIXER_PEER_COPIES"
_DESCRIPTOR, _ACK = 7301, 7302  # MPI tags of the two messages
_HANDLE_BYTES = 64
_ADDRESS_BYTES = 108  # a Unix socket's address, at most
_CONNECT_SECONDS, _ANSWER_SECONDS = 60, 120  # waits for the other's unmapper


def wanted() -> bool:
    """Copy-engine transfers are on unless WEATHERMIXER_PEER_COPIES=0."""
    return os.environ.get(PEER_COPIES_ENV, "1") != "0"


class _Driver:
    """The one CUDA driver call CuPy does not wrap: the allocation that holds a pointer."""

    def __init__(self):
        self.lib = ctypes.CDLL("libcuda.so.1")

    def allocation_of(self, ptr: int) -> int:
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        status = self.lib.cuMemGetAddressRange_v2(ctypes.byref(base), ctypes.byref(size),
                                                  ctypes.c_uint64(ptr))
        if status != 0:
            raise RuntimeError(f"cuMemGetAddressRange failed ({status})")
        return base.value


class PeerCopies:
    """Copy-engine exchanges with the other member of a 2-rank group (`backend.MPIGroup`).
    Build it with `connect` (collective): None where the two ranks are on different hosts
    or a test transfer fails on either."""

    def __init__(self, comm, agree):
        self.comm, self.other = comm, 1 - comm.Get_rank()
        self.agree = agree  # the group's collective decision (MIN of a flag)
        self.mapped = {}  # the other's allocations: IPC handle -> pointer here (under lock)
        self.lock = threading.Lock()  # `mapped` is shared with the unmapper thread
        self.exported = {}  # our allocations the other was sent: base pointer -> IPC handle
        self.requests = None  # socket to the other's unmapper
        self.count = 0  # exchanges begun
        self.exposed = collections.deque()  # (exchange, region, kept), oldest first

    @classmethod
    def connect(cls, group):
        """Collective over the pair `group`: the engine where both members are on one host,
        could set it up and pulled a test array from each other, else None on both."""
        from weathermixer.jigsaw.grid import node_placement  # grid imports the backend
        if node_placement(group.comm)[1] != group.size:
            return None
        # its own communicator: its messages are never matched by another user of the group's
        engine = cls(group.comm.Dup(), group.agree)
        return engine if group.agree(engine._set_up()) else None

    def _set_up(self) -> bool:
        """Make and swap the event handles, then a test transfer. Every MPI message is sent
        whatever fails here, so the other member never waits for one that is not coming."""
        ok, mine = True, bytes(2 * SLOTS * _HANDLE_BYTES)
        try:
            import cupy
            self.cupy, self.rt = cupy, cupy.cuda.runtime
            self.driver = _Driver()
            flags = dict(block=False, disable_timing=True, interprocess=True)
            self.ready = [self.cupy.cuda.Event(**flags) for _ in range(SLOTS)]
            self.copied = [self.cupy.cuda.Event(**flags) for _ in range(SLOTS)]
            mine = b"".join(bytes(self.rt.ipcGetEventHandle(e.ptr))
                            for e in self.ready + self.copied)
        except Exception:  # no IPC here (no libcuda, no interprocess events)
            ok = False
        theirs = bytes(self._swap(np.frombuffer(mine, dtype=np.uint8)))
        try:
            events = [self.rt.ipcOpenEventHandle(theirs[k:k + _HANDLE_BYTES])
                      for k in range(0, len(theirs), _HANDLE_BYTES)] if ok else []
            self.their_ready, self.their_copied = events[:SLOTS], events[SLOTS:]
        except Exception:
            ok = False
        return (self.agree(ok) and self._connect_unmappers() and self._test_transfer()
                and self._install_reclaim())

    # -- closing the other's mappings of freed memory -----------------------------------
    def _connect_unmappers(self) -> bool:
        """Each member listens on a Unix socket of this host (abstract name), the two swap
        addresses over MPI and connect: `requests` goes to the other's unmapper, and a thread
        here serves the other's requests (`_serve`). Collective; False on both where either
        fails."""
        listener, address, ok = None, b"", True
        try:
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(f"\0weathermixer-peer-{os.getpid()}-{id(self)}".encode())
            listener.listen(1)
            listener.settimeout(_CONNECT_SECONDS)  # the other may fail before it connects
            address = listener.getsockname()
        except OSError:
            ok = False
        payload = len(address).to_bytes(8, "little") + address.ljust(_ADDRESS_BYTES, b"\0")
        theirs = bytes(self._swap(np.frombuffer(payload, dtype=np.uint8)))
        their_address = theirs[8:8 + int.from_bytes(theirs[:8], "little")]
        if self.agree(ok and bool(their_address)):
            try:
                self.requests = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.requests.settimeout(_ANSWER_SECONDS)  # an error, not a hang
                self.requests.connect(their_address)  # queued by listen(): no accept needed yet
                served, _ = listener.accept()
                threading.Thread(target=self._serve, args=(served, self.rt.getDevice()),
                                 name="weathermixer-unmapper", daemon=True).start()
            except OSError:
                ok = False
        else:
            ok = False
        if listener is not None:
            listener.close()
        return self.agree(ok)

    def _serve(self, conn, device: int):
        """The unmapper thread: for each request (a count, then that many handles) close
        the mappings named, then answer how many were open here."""
        self.rt.setDevice(device)
        with conn:
            while True:
                head = _receive(conn, 8)
                if head is None:  # the other has closed its end
                    return
                handles = _receive(conn, int.from_bytes(head, "little") * _HANDLE_BYTES) or b""
                closed = 0
                for k in range(0, len(handles), _HANDLE_BYTES):
                    with self.lock:
                        ptr = self.mapped.pop(handles[k:k + _HANDLE_BYTES], None)
                    if ptr is not None:
                        self.rt.ipcCloseMemHandle(ptr)
                        closed += 1
                conn.sendall(closed.to_bytes(8, "little"))

    def reclaim(self) -> int:
        """Ask the other to close its mappings of the allocations of ours that were freed
        since we exposed them, and wait until it has: their memory is free again. Returns how
        many mappings it closed."""
        freed = [base for base, handle in self.exported.items()
                 if not self._still_allocated(base, handle)]
        if not freed:
            return 0
        handles = b"".join(self.exported.pop(base) for base in freed)
        self.requests.sendall(len(freed).to_bytes(8, "little") + handles)
        answer = _receive(self.requests, 8)
        if answer is None:
            raise RuntimeError("peer copies: the other member's unmapper has gone")
        return int.from_bytes(answer, "little")

    def _still_allocated(self, base: int, handle: bytes) -> bool:
        """Whether the allocation exposed at `base` under `handle` is still the one there."""
        try:
            return (self.driver.allocation_of(base) == base
                    and bytes(self.rt.ipcGetMemHandle(base)) == handle)
        except Exception:  # not allocated any more
            return False

    def _install_reclaim(self) -> bool:
        """`reclaim` before every cudaMalloc of CuPy's pool in this thread (a memory hook;
        the pool retries a failed cudaMalloc after freeing its free blocks). Collective."""
        engine, ok = self, True
        try:
            class Reclaim(self.cupy.cuda.MemoryHook):
                name = f"weathermixer-peer-reclaim-{id(self)}"

                def alloc_preprocess(self, **kwargs):
                    engine.reclaim()

            Reclaim().__enter__()  # stays for the life of the process
        except Exception:
            ok = False
        return self.agree(ok)

    def _test_transfer(self) -> bool:
        """Pull a small array of the other's: True where its values arrived, on both."""
        cp, ok = self.cupy, True
        mine = cp.full(1000, self.comm.Get_rank() + 1, dtype=cp.float32)  # [1000]
        handle, offset = bytes(_HANDLE_BYTES), 0
        try:
            handle, offset = self._export(mine.data.ptr)
        except Exception:
            ok = False
        theirs = self._swap(np.frombuffer(handle + np.int64(offset).tobytes(), dtype=np.uint8))
        try:
            got = cp.empty_like(mine)
            offset_there = int(theirs[_HANDLE_BYTES:].view(np.int64)[0])
            source = self._map(bytes(theirs[:_HANDLE_BYTES])) + offset_there
            self.rt.memcpy(got.data.ptr, source, got.nbytes, self.rt.memcpyDeviceToDevice)
            ok = ok and bool((got == self.other + 1).all())
        except Exception:
            ok = False
        cp.cuda.Device().synchronize()
        return self.agree(ok)  # both copies have ended: `mine` may go

    def _swap(self, payload: np.ndarray) -> np.ndarray:
        """The other member's payload of the same size, for ours (a host wait)."""
        out = np.empty_like(payload)
        self.comm.Sendrecv(payload, dest=self.other, sendtag=_DESCRIPTOR, recvbuf=out,
                           source=self.other, recvtag=_DESCRIPTOR)
        return out

    # -- one exchange ------------------------------------------------------------------
    def begin(self, region, kept: bool = False) -> "_Pull":
        """Steps 1 to 3 for `region` (a C-contiguous device array, exposed until a later
        exchange settles it; `kept`: see step 1): returns what pulls the other's region."""
        self._settle(kept)
        slot = self.count % SLOTS
        self.count += 1
        stream = self.cupy.cuda.get_current_stream()
        self.rt.eventRecord(self.ready[slot].ptr, stream.ptr)
        handle, offset = bytes(_HANDLE_BYTES), 0
        if region.nbytes:
            handle, offset = self._export(region.data.ptr)
        descriptor = np.frombuffer(handle + np.array([offset, region.nbytes, self.count],
                                                     dtype=np.int64).tobytes(), dtype=np.uint8)
        theirs = self._swap(descriptor)
        their_offset, their_bytes, their_count = theirs[_HANDLE_BYTES:].view(np.int64)
        if their_count != self.count:
            raise RuntimeError(f"peer copies out of step: exchange {self.count} here, "
                               f"{their_count} on rank {self.other}")
        self.exposed.append((self.count, region, kept))
        source = 0
        if their_bytes:
            source = self._map(bytes(theirs[:_HANDLE_BYTES])) + int(their_offset)
        return _Pull(self, self.count, slot, source, int(their_bytes))

    def _export(self, ptr: int) -> tuple[bytes, int]:
        """(IPC handle of the allocation holding `ptr`, `ptr`'s offset in it), for the other
        to map; the allocation is remembered in `exported` (see `reclaim`)."""
        handle, base = bytes(self.rt.ipcGetMemHandle(ptr)), self.driver.allocation_of(ptr)
        self.exported[base] = handle
        return handle, ptr - base

    def _map(self, handle: bytes) -> int:
        """The address here of the other's allocation named by `handle` (opened once)."""
        with self.lock:
            if handle not in self.mapped:
                self.mapped[handle] = self.rt.ipcOpenMemHandle(handle)
            return self.mapped[handle]

    def _settle(self, kept: bool):
        """Step 1 before an exchange of a region that is `kept` or not: settle the oldest
        exchanges while a region that is not kept waits beyond the newest LAG, or slots run
        short; before a region that is not kept, also while any kept one waits (a kept
        region may be written after this exchange). Settled regions may go back to the
        pool."""
        stream = self.cupy.cuda.get_current_stream()

        def due() -> bool:
            waiting = list(self.exposed)
            return (len(waiting) > SLOTS - 2
                    or (len(waiting) > LAG and any(not k for _, _, k in waiting[:-LAG]))
                    or (not kept and any(k for _, _, k in waiting)))

        while self.exposed and due():
            count, _, _ = self.exposed.popleft()
            ack = np.empty(1, dtype=np.int64)
            self.comm.Recv(ack, source=self.other, tag=_ACK)
            if ack[0] != count:
                raise RuntimeError(f"peer copies out of step: acknowledgement of {ack[0]}, "
                                   f"expected {count}")
            self.rt.streamWaitEvent(stream.ptr, self.their_copied[(count - 1) % SLOTS], 0)


class _Pull:
    """Steps 4 and 5 of one exchange: copy the other's region into a buffer of ours."""

    def __init__(self, engine: PeerCopies, count: int, slot: int, source: int, nbytes: int):
        self.engine, self.count, self.slot = engine, count, slot
        self.source, self.nbytes = source, nbytes

    def into(self, out, stream_ptr: int):
        """Queue the copy into `out` (C-contiguous, exactly the other's bytes) on the stream
        `stream_ptr`, after the other's region is ready; then acknowledge."""
        e, rt = self.engine, self.engine.rt
        if out.nbytes != self.nbytes:
            raise ValueError(f"peer copy of {self.nbytes} bytes into a buffer of {out.nbytes}")
        rt.streamWaitEvent(stream_ptr, e.their_ready[self.slot], 0)
        if self.nbytes:
            rt.memcpyAsync(out.data.ptr, self.source, self.nbytes, rt.memcpyDeviceToDevice,
                           stream_ptr)
        rt.eventRecord(e.copied[self.slot].ptr, stream_ptr)
        e.comm.Send(np.array([self.count], dtype=np.int64), dest=e.other, tag=_ACK)


def _receive(conn, nbytes: int):
    """Exactly `nbytes` from the socket, or None where it closed first."""
    chunks, left = [], nbytes
    while left:
        chunk = conn.recv(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
