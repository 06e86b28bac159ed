"""The fused kernels against what they replaced, on one GPU, same run (CUDA events, medians).

    python benchmarks/gpu_fused.py

- LayerNorm forward and backward at C1's shapes: the mixer blocks' norms over E (rows, with
  and without the fan-out gradient `plus`) and the head's two norms over the variables
  (columns), fused (`autograd.layernorm_fused`) against the unfused path (matrix-vector sums
  and elementwise kernels, which an allreduce hook selects).
- AdamW over the largest block (the token-mixing weight, 8640 x 17280 float32): the update
  four elements a load against CuPy's elementwise loop of the same formula, aligned and one
  element off a 16-byte boundary (where `adamw_update` takes the elementwise loop itself).
- The loss at C1's prediction [1, 69, 720, 1440]: `weighted_sse_and_grad` (one kernel)
  against `weighted_sse_forward` then `weighted_sse_backward` (elementwise passes).
- The gradient norm's sum of squares over every C1 parameter shape: `sum_of_squares` (one
  16-byte-load kernel per array) against CuPy's reduction of rows of 65536.
- Token mixing's residual add z + o^T + b at C1's [17280, 4320] (o [4320, 17280]): the tiled
  kernel against CuPy's elementwise loop on the transposed view, and the channel mixing's
  add (every operand in order) as the bandwidth reference.
- The transposing copies before cuBLAS GEMMs (`linear.c_contiguous`, `linear.f_contiguous`)
  at C1's shapes: CuPy's copy, cuBLAS geam (CuPy's asfortranarray of the matrix viewed, what
  `c_contiguous` takes for one matrix) and the tiled kernel of `xp.from_transposed` (for a
  batch of matrices) in five tile shapes.
"""
import numpy as np

import cupy as cp
import weathermixer as wm
from weathermixer.autograd import layernorm as ln
from weathermixer.autograd import loss as wl
from weathermixer.autograd import xp
from weathermixer.autograd.linear import c_contiguous
from weathermixer.autograd.shape import residual_forward
from weathermixer.autograd.xp import elementwise_kernel, sum_of_squares
from weathermixer.config import param_shapes
from weathermixer.mixer import optim
from weathermixer.mixer.bench import seconds


def timeit(f, n=10):
    """Median ms of n calls of f after one warm-up (`bench.seconds`: CUDA events)."""
    f()
    cp.cuda.Device().synchronize()
    return float(np.median([1e3 * seconds(cp, f) for _ in range(n)]))


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


def loss(rng):
    y, t = (rng.standard_normal((1, 69, 720, 1440), dtype=cp.float32) for _ in range(2))
    lw, vw = cp.ones(720, dtype=cp.float32), cp.ones(69, dtype=cp.float32)

    def unfused():
        _, cache = wl.weighted_sse_forward(y, t, lw, vw, 7.0)
        wl.weighted_sse_backward(1.0, cache)

    t_old, t_new = timeit(unfused), timeit(lambda: wl.weighted_sse_and_grad(y, t, lw, vw, 7.0))
    print(f"loss + dL/dy, ms: forward then backward {t_old:.3f} | fused {t_new:.3f} | "
          f"{t_old / t_new:.2f}x")


def grad_norm(rng):
    cfg = wm.Config(n_lat=720, n_lon=1440, n_prognostic=69, n_static=3, patch_lat=1,
                    patch_lon=60, embed_dim=4320, token_hidden_dim=8640,
                    channel_hidden_dim=4320, n_blocks=3)
    grads = [rng.standard_normal(shape, dtype=cp.float32) for shape in param_shapes(cfg).values()]
    rows = cp.ReductionKernel("T g", "T s", "g * g", "a + b", "s = a", "0", "wm_sum_sq_rows")

    def by_rows():
        parts = []
        for g in grads:
            flat = g.reshape(-1)
            cut = flat.size // 65536 * 65536
            if cut:
                parts.append(rows(flat[:cut].reshape(-1, 65536), axis=1))
            if cut < flat.size:
                parts.append(rows(flat[cut:]).reshape(1))
        return cp.concatenate(parts).sum()

    n = sum(g.size for g in grads)
    t_old, t_new = timeit(by_rows), timeit(lambda: sum_of_squares(grads))
    print(f"sum of squares over {n:,} float32, ms: rows of 65536 {t_old:.3f} | sum_of_squares "
          f"{t_new:.3f} ({4 * n / t_new / 1e6:.0f} GB/s) | {t_old / t_new:.2f}x")


def residual(rng):
    z = rng.standard_normal((1, 17280, 4320), dtype=cp.float32)
    o = rng.standard_normal((1, 4320, 17280), dtype=cp.float32)
    b_t, b_e = (rng.standard_normal(n, dtype=cp.float32) for n in (17280, 4320))
    loop = elementwise_kernel("wm_residual_bias", "T z, T f, T b", "T y", "y = z + f + b")
    t_loop = timeit(lambda: loop(z, o.swapaxes(-1, -2), b_t[:, None]))
    t_tile = timeit(lambda: residual_forward(z, o.swapaxes(-1, -2), b_t[:, None]))
    t_flat = timeit(lambda: residual_forward(z, z, b_e))
    print(f"residual z + o^T + b, ms: elementwise loop {t_loop:.3f} | tiled {t_tile:.3f} "
          f"({12 * z.size / t_tile / 1e6:.0f} GB/s) | {t_loop / t_tile:.2f}x; "
          f"channel mixing's z + o + b {t_flat:.3f}")


def transposing_copies(rng):
    print("transposing copy [rows, cols] of the transposed view, ms: CuPy's copy | cuBLAS geam "
          "(asfortranarray) | xp.from_transposed, TILE x TILE_ROWS threads: " +
          " ".join(f"{t}x{r}" for t, r in TILES) + " | c_contiguous (the package), GB/s")
    kept = xp._TILE, xp._TILE_ROWS
    for rows, cols in ((17280, 4320), (4320, 17280), (4320, 8640), (1036800, 69)):
        a = rng.standard_normal((cols, rows), dtype=cp.float32).T  # [rows, cols], a view
        t_copy = timeit(lambda: cp.ascontiguousarray(a))
        t_geam = timeit(lambda: cp.asfortranarray(a.T))  # the same bytes, F-ordered [cols, rows]
        tiled = []
        for xp._TILE, xp._TILE_ROWS in TILES:
            tiled.append(timeit(lambda: xp.from_transposed(a)))
        xp._TILE, xp._TILE_ROWS = kept
        t_ours = timeit(lambda: c_contiguous(a))
        print(f"  [{rows}, {cols}]: {t_copy:.3f} | {t_geam:.3f} | "
              + " ".join(f"{t:.3f}" for t in tiled)
              + f" | {t_ours:.3f}, {8 * a.size / t_ours / 1e6:.0f}")


TILES = ((32, 8), (32, 4), (32, 16), (64, 8), (64, 16))


if __name__ == "__main__":
    print(cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode())
    generator = cp.random.default_rng(0)
    layernorms(generator)
    adamw(generator)
    loss(generator)
    grad_norm(generator)
    residual(generator)
    transposing_copies(generator)
