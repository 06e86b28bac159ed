"""The fused kernels against what they replaced, on one GPU, same run (CUDA events, medians).

    python benchmarks/gpu_fused.py

- LayerNorm forward and backward at C1's shapes: the mixer blocks' norms over E (rows, with
  and without the fan-out gradient `plus`) and the head's two norms over the variables
  (columns), fused (`autograd.layernorm_fused`) against the unfused path (matrix-vector sums
  and elementwise kernels, which an allreduce hook selects).
- AdamW over the largest block (the token-mixing weight, 8640 x 17280 float32): the update
  four elements a load against CuPy's elementwise loop of the same formula, aligned and one
  element off a 16-byte boundary (where `adamw_update` takes the elementwise loop itself).
"""
import numpy as np

import cupy as cp
from weathermixer.autograd import layernorm as ln
from weathermixer.autograd.xp import elementwise_kernel
from weathermixer.mixer import optim


def timeit(f, n=10):
    f()
    cp.cuda.Device().synchronize()
    start, end, times = cp.cuda.Event(), cp.cuda.Event(), []
    for _ in range(n):
        start.record()
        f()
        end.record()
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end))
    return float(np.median(times))


def layernorms(rng):
    print("LayerNorm, ms: unfused forward, backward | fused forward, backward | speed-ups")
    for shape, axis, plus in (((1, 17280, 4320), -1, True), ((1, 17280, 4320), -1, False),
                              ((1, 69, 720, 1440), 1, False), ((1, 138, 720, 1440), 1, False)):
        u, dy, p = (rng.standard_normal(shape, dtype=cp.float32) for _ in range(3))
        c = shape[axis]
        scale, bias = (rng.standard_normal(c, dtype=cp.float32) for _ in range(2))
        times = []
        for allreduce in (lambda a: a, None):  # a hook forces the unfused path
            times.append(timeit(lambda: ln.layernorm_forward(u, scale, bias, axis,
                                                             allreduce=allreduce)))
            _, cache = ln.layernorm_forward(u, scale, bias, axis, allreduce=allreduce)
            times.append(timeit(lambda: ln.layernorm_backward(dy, cache, p if plus else None)))
        print(f"{str(shape):>20} axis {axis:>2}{' + plus' if plus else '       '}  "
              f"{times[0]:.3f} {times[1]:.3f} | {times[2]:.3f} {times[3]:.3f} | "
              f"{times[0] / times[2]:.2f}x {times[1] / times[3]:.2f}x")


def adamw(rng):
    n = 8640 * 17280
    p, m, g = (rng.standard_normal(n + 1, dtype=cp.float32) for _ in range(3))
    v = cp.abs(rng.standard_normal(n + 1, dtype=cp.float32))
    s = cp.asarray([0.7, 1e-4, 0.01, 1.0], dtype=cp.float32)
    loop = elementwise_kernel("wm_adamw_loop", "T g, raw T s, T b1, T b2, T eps, T decay",
                              "T p, T m, T v",
                              "if (s[3] != T(0)) update(p, m, v, g, &s[0], b1, b2, eps, decay);",
                              preamble=optim._ADAMW_UPDATE)
    f32 = np.float32
    print("AdamW, ms: elementwise loop | adamw_update | GB/s of adamw_update (7 x 4 B each)")
    for offset in (0, 1):
        a = [x[offset:offset + n] for x in (p, m, v, g)]
        t_loop = timeit(lambda: loop(a[3], s, f32(0.9), f32(0.999), f32(1e-8), f32(0.99), *a[:3]))
        t_ours = timeit(lambda: optim.adamw_update(*a, s, 0.9, 0.999, 1e-8, 0.99))
        print(f"  offset {offset}: {t_loop:.3f} | {t_ours:.3f} | {28 * n / t_ours / 1e6:.0f}")


if __name__ == "__main__":
    print(cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode())
    generator = cp.random.default_rng(0)
    layernorms(generator)
    adamw(generator)
