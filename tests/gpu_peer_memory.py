"""Our memory that the other GPU of a pair has mapped comes back when our pool needs it
(GPU pair only; `jigsaw.peer`'s unmapper and memory hook).

    mpiexec -n 2 python -m mpi4py tests/gpu_peer_memory.py

On both ranks of the 2x1 grid's pair group (copy-engine transfers):
1. a block of 1 GiB goes to the other in an allgather (the other maps its allocation), the
   exchanges after it settle it, and it is dropped and the pool's free blocks freed: the
   device memory outside the pool (total - free - pool) grows by about that GiB, which the
   other's mapping keeps taken;
2. the device is filled from outside the pool until 0.75 GiB is free, and the pool is asked
   for 1.25 GiB: only the pinned GiB makes room for it, so it succeeds only if the memory hook
   has the other close its mapping first.
Rank 0 prints one JSON line: for each rank the GiB outside the pool at the start, after the
free and at the end, and whether the allocation succeeded. Called by tests/test_gpu.py.
"""
import gc
import json

import numpy as np

from weathermixer.cli.train import setup_parallel

GIB = 2 ** 30


def outside_pool(cp) -> float:
    cp.cuda.Device().synchronize()
    free, total = cp.cuda.runtime.memGetInfo()
    return (total - free - cp.get_default_memory_pool().total_bytes()) / GIB


def main():
    grid, cp = setup_parallel(2, 1, 2, "gpu", "fp32")
    pair, pool = grid.domain, cp.get_default_memory_pool()
    small = cp.ones(256, dtype=cp.float32)
    pair.allgather(small, 0, [256, 256])  # sets the copy engines up
    row = {"engine": pair.transport(), "start": outside_pool(cp)}
    block = cp.ones(GIB // 4, dtype=cp.float32)  # [2^28], one allocation of its own
    gathered = pair.allgather(block, 0, [block.size] * 2)
    for _ in range(4):  # later exchanges settle the block's
        pair.allgather(small, 0, [256, 256])
    pair.wait()
    del block, gathered
    gc.collect()
    pool.free_all_blocks()
    row["after_free"] = outside_pool(cp)
    grid.world.barrier()
    free, _ = cp.cuda.runtime.memGetInfo()
    filler = cp.cuda.Memory(int(free - 0.75 * GIB))  # outside the pool  # noqa: F841
    grid.world.barrier()
    try:
        needs_it = cp.empty(int(1.25 * GIB) // 4, dtype=cp.float32)
        row["allocated"] = bool(needs_it.size)
        del needs_it
    except cp.cuda.memory.OutOfMemoryError as e:
        row["allocated"], row["error"] = False, str(e)
    del filler
    pool.free_all_blocks()
    row["end"] = outside_pool(cp)
    rows = grid.world.gather_json(row)
    if grid.is_root:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
