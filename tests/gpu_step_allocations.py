"""Device memory taken by training steps after warm-up, on every rank (GPU machine only).

    mpiexec -n N python -m mpi4py tests/gpu_step_allocations.py DxC

Runs three warm-up steps of a small model (loss, gradients, AdamW, the read-back of the
step's numbers) on the DxC grid (with N / (D C) replicas), then STEPS more with a CuPy memory
hook that counts, step by step, every allocation the pool asks of the device (cudaMalloc), and
the bytes live arrays hold between steps (the pool's used bytes) before and after them.
Rank 0 prints one JSON line: for each rank the live bytes, the allocations of each step, and
for each allocation the package lines that asked for it (innermost last), so that a failure
says where. Called by tests/test_gpu.py.

Why allocations are counted per step rather than required to be none: CuPy's pool keeps its
free blocks of a size class in a Python set and takes whichever `set.pop()` gives, splitting
it; that order follows the blocks' addresses, which differ from process to process, so a
step now and then finds no free block of the right size and takes one more small block
(one of 4 KiB was seen, in a step of hundreds of allocations from the pool). A buffer kept
from step to step would instead show in the live bytes and in every step.
"""
import json
import sys
import traceback

import numpy as np

import weathermixer as wm
from weathermixer.cli.train import make_layout
from weathermixer.mixer.api import loss_array_and_grads
from weathermixer.mixer.optim import AdamW, read_back
from weathermixer.mixer.params import init_params

CFG = wm.Config(n_lat=12, n_lon=16, n_prognostic=5, n_static=2, patch_lat=2, patch_lon=4,
                embed_dim=20, token_hidden_dim=14, channel_hidden_dim=18, n_blocks=2)
STEPS = 9


def main(grid_text: str):
    from mpi4py import MPI
    pd, pc = (int(v) for v in grid_text.split("x"))
    layout, cp = make_layout(CFG, pd, pc, MPI.COMM_WORLD.Get_size(), "gpu", "tf32")
    grid = layout.grid
    params = init_params(CFG, seed=0, dtype="float32", layout=layout, xp=cp)
    rng = np.random.default_rng(grid.world.rank)
    h, nc, nv = layout.n_lat_local, len(layout.input_channels), len(layout.prognostic_channels)
    x = cp.asarray(rng.standard_normal((2, nc, h, CFG.n_lon), dtype=np.float32))
    t = cp.asarray(rng.standard_normal((2, nv, h, CFG.n_lon), dtype=np.float32))
    opt = AdamW(lr=1e-3, clip_norm=1.0)

    def step():
        loss, grads = loss_array_and_grads(params, x, t, CFG, layout=layout, cut_over_data=True)
        read_back({"loss": loss, **opt.step(params, grads, layout)})

    for _ in range(3):
        step()
    pool = cp.get_default_memory_pool()
    live_before = pool.used_bytes()
    per_step, sites = [], []

    class DeviceAllocations(cp.cuda.MemoryHook):
        name = "device_allocations"

        def alloc_postprocess(self, **kwargs):
            per_step[-1].append(int(kwargs["mem_size"]))
            sites.append([f"{f.filename.split('weathermixer/')[-1]}:{f.lineno} {f.line}"
                          for f in traceback.extract_stack() if "weathermixer/" in f.filename])

    with DeviceAllocations():
        for _ in range(STEPS):
            per_step.append([])
            step()
    rows = grid.world.gather_json({"rank": grid.world.rank, "live_before": live_before,
                                   "live_after": pool.used_bytes(),
                                   "allocations_per_step": [len(a) for a in per_step],
                                   "bytes": sum(map(sum, per_step)), "sites": sites})
    if grid.is_root:
        print(json.dumps(rows))


if __name__ == "__main__":
    main(sys.argv[1])
