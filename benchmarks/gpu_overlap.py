"""Can AdamW (bound by memory) run beside a TF32 GEMM (bound by its tensor cores) on a second
stream, and so hide the optimizer inside the next step's forward?

    python benchmarks/gpu_overlap.py      # one GPU; C1's token-mixing shapes

Times, on CUDA events (median of 5 after 2 warm-ups): one GEMM [E, T] @ [T, Mt] alone,
`adamw_update` over one [Mt, T] weight alone (and cut into 8 launches), the two one after the
other, and the two on separate streams at each stream priority, with 1 and with 3 GEMMs
beside the update. docs/benchmarks.md reports the answer (seventh session): little is hidden.
"""
from __future__ import annotations

import cupy as cp
import numpy as np

from weathermixer.autograd import xp as xpmod
from weathermixer.mixer.bench import seconds
from weathermixer.mixer.optim import adamw_update

E, T, Mt = 4320, 17280, 8640
PRIORITIES = [("default", None), ("low (0)", 0), ("high (-5)", -5)]  # CUDA: lower is higher


def timed(fn, reps: int = 5, warmup: int = 2) -> float:
    """Median ms of `fn` between two events on the current stream (`bench.seconds`)."""
    times = [1e3 * seconds(cp, fn) for _ in range(warmup + reps)]
    return float(np.median(times[warmup:]))


def main():
    xpmod.set_matmul_precision(cp, "tf32")
    a = cp.random.standard_normal((E, T), dtype=np.float32)
    b = cp.random.standard_normal((T, Mt), dtype=np.float32)
    c = cp.empty((E, Mt), dtype=np.float32)  # [E, Mt]
    n = Mt * T
    p, m, v, g = (cp.random.standard_normal(n, dtype=np.float32) for _ in range(4))
    v = cp.abs(v)  # a second moment
    s = cp.asarray([1.0, 1e-5, 1.0, 1.0], dtype=np.float32)  # step_scalars' [scale, lr/c1, c2, 1]

    def gemm():
        cp.matmul(a, b, out=c)

    def adam(chunks: int = 1):
        step = (-(-n // chunks) + 3) // 4 * 4  # parts on 16-byte boundaries
        for lo in range(0, n, step):
            part = slice(lo, min(n, lo + step))
            adamw_update(p[part], m[part], v[part], g[part], s, 0.9, 0.999, 1e-8, 1.0)

    def beside(priority, chunks: int, gemms: int):
        """The update on a second stream, `gemms` GEMMs on the current one, both joined."""
        main_stream = cp.cuda.get_current_stream()
        side = cp.cuda.Stream(non_blocking=True, **({} if priority is None
                                                    else {"priority": priority}))

        def run():
            start = cp.cuda.Event()
            start.record(main_stream)
            side.wait_event(start)
            with side:
                adam(chunks)
            for _ in range(gemms):
                gemm()
            done = cp.cuda.Event()
            done.record(side)
            main_stream.wait_event(done)
        return run

    print(f"gemm alone           {timed(gemm):8.3f} ms")
    print(f"adamw alone          {timed(adam):8.3f} ms  ({n * 28 / 1e9:.2f} GB)")
    print(f"adamw in 8 chunks    {timed(lambda: adam(8)):8.3f} ms")
    print(f"sequential           {timed(lambda: (gemm(), adam())):8.3f} ms")
    print(f"3 gemms + adamw seq  {timed(lambda: (gemm(), gemm(), gemm(), adam())):8.3f} ms")
    for name, priority in PRIORITIES:
        for chunks in (1, 8):
            print(f"concurrent adamw prio {name:9s} chunks {chunks}: "
                  f"1 gemm {timed(beside(priority, chunks, 1)):8.3f} ms   "
                  f"3 gemms {timed(beside(priority, chunks, 3)):8.3f} ms")


if __name__ == "__main__":
    main()
