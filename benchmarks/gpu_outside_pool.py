"""Device memory outside CuPy's pool, step by step, on 1 GPU or a 2x1 pair.

    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/gpu_outside_pool.py [N_BLOCKS]
    mpiexec -n 2 [-x WEATHERMIXER_PEER_COPIES=0] python3 benchmarks/gpu_outside_pool.py [N_BLOCKS]

C1 with N_BLOCKS (default 3) mixer blocks: after set-up, after the parameters, after each of
three training steps, after freeing the pool's free blocks, after two more steps and after a
second free, each rank prints the device memory in use (total - free), the pool's bytes, the
bytes of live arrays and what is in use outside the pool (CUDA context, cuBLAS, NCCL, and
memory of ours that the other GPU of a pair has mapped). docs/benchmarks.md (seventh session)
has the figures that showed freed memory kept by the other GPU's mappings.
"""
import gc
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import capacity  # noqa: E402
from weathermixer.cli.train import setup_parallel, world_size  # noqa: E402
from weathermixer.config import Config  # noqa: E402
from weathermixer.mixer.api import loss_and_grads  # noqa: E402
from weathermixer.mixer.layout import Layout  # noqa: E402
from weathermixer.mixer.optim import AdamW  # noqa: E402

GIB = 2 ** 30


def main():
    n = world_size()
    blocks = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    cfg = Config(**capacity.FAMILIES["c1"], n_blocks=blocks)
    grid, xp = setup_parallel(n, 1, n, "gpu", "tf32")
    pool = xp.get_default_memory_pool()
    tag = f"peer={os.environ.get('WEATHERMIXER_PEER_COPIES', '1')} n={n}"

    def report(stage):
        xp.cuda.Device().synchronize()
        free_b, total = xp.cuda.runtime.memGetInfo()
        used, held = total - free_b, pool.total_bytes()
        print(f"{tag} rank {grid.world.rank} {stage:24s} used {used / GIB:7.2f} GiB  pool "
              f"{held / GIB:7.2f}  in use {pool.used_bytes() / GIB:7.2f}  outside "
              f"{(used - held) / GIB:6.2f}", flush=True)

    def steps(count, name):
        for i in range(count):
            loss, grads = loss_and_grads(params, x, t, cfg, layout=layout)
            opt.step(params, grads, layout)
            del grads
            report(f"{name} {i}")
        grid.world.barrier()
        gc.collect()
        pool.free_all_blocks()

    report("setup")
    layout = Layout(cfg, grid)
    params = capacity.device_params(cfg, layout, xp)
    rng = xp.random.default_rng(1 + grid.world.rank)
    h, w = layout.n_lat_local, cfg.n_lon
    x = rng.random((1, len(layout.input_channels), h, w), dtype=np.float32)
    t = rng.random((1, len(layout.prognostic_channels), h, w), dtype=np.float32)
    opt = AdamW(lr=1e-4, clip_norm=1.0)
    report("params")
    steps(3, "step")
    report("free_all_blocks")
    grid.world.barrier()
    steps(2, "again")
    report("free_all_blocks 2")


if __name__ == "__main__":
    main()
