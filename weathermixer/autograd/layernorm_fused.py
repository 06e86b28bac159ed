"""LayerNorm on the GPU in fused kernels, where the normalised axis is whole on this rank.

The device form of `autograd.layernorm` when nothing needs an allreduce (the axis is not cut
over ranks), in two shapes:

- **rows**, the last axis (the embedding axis E of the mixer blocks and the decoder's norm):
  a thread block per row, each thread holding up to K of its elements in registers, so a row
  is read from memory once; the row's sums are block reductions (warp shuffles, then one
  partial per warp).
- **columns**, an inner axis of a few hundred at most (the head's norms over the variables
  of [B, P, H, W]): a thread per (lead, inner) position walks the C channels, which are
  inner elements apart, so a warp reads 32 neighbouring positions of one channel at a time.

In both, with n the axis length:

    forward:   mean = sum(u) / n,  var = sum((u - mean)^2) / n  (two-pass),
               rstd = 1 / sqrt(var + eps),  xhat = (u - mean) rstd,  out = xhat scale + bias
    backward:  R1 = sum(dy scale),  R2 = sum(dy scale xhat)  along the axis,
               du = rstd (dy scale - R1 / n - xhat R2 / n)  (+ plus)
               (rows: rstd dy scale + plus is formed while the sums are reduced),
               dscale, dbias = the sums of dy xhat and dy over every other axis: each block
               writes its own partial sums (rows: a thread's columns in registers; columns: a
               warp's sum per channel in shared memory), added over blocks by two
               matrix-vector products (deterministic: no atomics)

The formulas are `autograd.layernorm`'s with its reductions in another order: the GPU tests
check both shapes against numpy in float64. The unfused path (matrix-vector sums and
elementwise kernels) reads and writes each array several times more.
"""
from __future__ import annotations

import numpy as np

from weathermixer.autograd.linear import around_axis, c_contiguous
from weathermixer.autograd.xp import (BLOCK_SUMS, get_array_module, is_device_array, one_wave,
                                      raw_kernel)

K = 8  # row elements per thread, in registers
MAX_THREADS = 1024  # per row block (a register budget of 64 each), so rows of up to 8192
MAX_COLS = MAX_THREADS * K
COLUMN_THREADS = 256  # per column block: 8 warps
SHARED_BYTES = 48 * 1024  # a column block's warp sums: 8 warps x 2 sums x C, at most this

_SOURCE = BLOCK_SUMS + r"""
extern "C" __global__ void __launch_bounds__(MAX_THREADS) wm_ln_rows_forward(
        const T* u, const T* scale, const T* bias, T* xhat, T* out, T* rstd,
        const int C, const T eps) {
    __shared__ T partials[64];
    const long long row = (long long)blockIdx.x * C;
    T x[K];  // this thread's elements of the row: columns threadIdx.x + j blockDim.x
    T s = T(0), unused = T(0);
#pragma unroll
    for (int j = 0; j < K; ++j) {
        const int c = threadIdx.x + j * blockDim.x;
        x[j] = c < C ? u[row + c] : T(0);
        s += x[j];
    }
    block_sum2(s, unused, partials);
    const T mean = s / T(C);
    T q = T(0);
#pragma unroll
    for (int j = 0; j < K; ++j) {
        const int c = threadIdx.x + j * blockDim.x;
        const T d = c < C ? x[j] - mean : T(0);
        q += d * d;
    }
    block_sum2(q, unused, partials);
    const T r = T(1) / sqrt(q / T(C) + eps);
#pragma unroll
    for (int j = 0; j < K; ++j) {
        const int c = threadIdx.x + j * blockDim.x;
        if (c < C) {
            const T h = (x[j] - mean) * r;
            xhat[row + c] = h;
            out[row + c] = h * scale[c] + bias[c];
        }
    }
    if (threadIdx.x == 0) rstd[blockIdx.x] = r;
}

extern "C" __global__ void __launch_bounds__(MAX_THREADS) wm_ln_rows_backward(
        const T* dy, const T* xhat, const T* rstd, const T* scale, const T* plus, T* du,
        T* partial, const int rows, const int C, const int R, const long long pitch) {
    __shared__ T partials[64];
    T ds[K], db[K];  // this block's column sums of dy xhat and dy
#pragma unroll
    for (int j = 0; j < K; ++j) {
        ds[j] = T(0);
        db[j] = T(0);
    }
    const int first = blockIdx.x * R, last = min(rows, first + R);
    for (int i = first; i < last; ++i) {
        const long long row = (long long)i * C;
        const T rs = rstd[i];
        T t[K], h[K];  // t = rs dy scale (+ plus): du less its two row terms, known before them
        T a = T(0), b = T(0);
#pragma unroll
        for (int j = 0; j < K; ++j) {
            const int c = threadIdx.x + j * blockDim.x;
            const bool in = c < C;
            const T d = in ? dy[i * pitch + c] : T(0), g = d * (in ? scale[c] : T(0));
            h[j] = in ? xhat[row + c] : T(0);
            a += g;
            b += g * h[j];
            ds[j] += d * h[j];
            db[j] += d;
            t[j] = rs * g + (PLUS && in ? plus[row + c] : T(0));
        }
        block_sum2(a, b, partials);  // the loads of plus above wait beside the reduction
        const T r1 = rs * a / T(C), r2 = rs * b / T(C);
#pragma unroll
        for (int j = 0; j < K; ++j) {
            const int c = threadIdx.x + j * blockDim.x;
            if (c < C) du[row + c] = t[j] - r1 - h[j] * r2;
        }
    }
#pragma unroll
    for (int j = 0; j < K; ++j) {
        const int c = threadIdx.x + j * blockDim.x;
        if (c < C) {
            partial[(long long)blockIdx.x * C + c] = ds[j];
            partial[((long long)gridDim.x + blockIdx.x) * C + c] = db[j];
        }
    }
}

// u [lead, C, inner]: a thread per position p = l inner + i, channel c at p's base + c inner.
extern "C" __global__ void wm_ln_columns_forward(
        const T* u, const T* scale, const T* bias, T* xhat, T* out, T* rstd,
        const long long positions, const int C, const long long inner, const T eps) {
    const long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= positions) return;
    const long long base = p / inner * C * inner + p % inner;
    T s = T(0);
    for (int c = 0; c < C; ++c) s += u[base + c * inner];
    const T mean = s / T(C);
    T q = T(0);
    for (int c = 0; c < C; ++c) {
        const T d = u[base + c * inner] - mean;
        q += d * d;
    }
    const T r = T(1) / sqrt(q / T(C) + eps);
    for (int c = 0; c < C; ++c) {
        const T h = (u[base + c * inner] - mean) * r;
        xhat[base + c * inner] = h;
        out[base + c * inner] = h * scale[c] + bias[c];
    }
    rstd[p] = r;
}

// Each warp adds its 32 positions' dy xhat and dy of channel c into its own shared slots;
// the block then writes the sums over its warps as its partial row of dscale and of dbias.
extern "C" __global__ void wm_ln_columns_backward(
        const T* dy, const T* xhat, const T* rstd, const T* scale, const T* plus, T* du,
        T* partial, const long long positions, const int C, const long long inner) {
    extern __shared__ unsigned char shared_bytes[];
    T* sums = reinterpret_cast<T*>(shared_bytes);  // [warps, 2, C]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    for (int k = threadIdx.x; k < warps * 2 * C; k += blockDim.x) sums[k] = T(0);
    __syncthreads();
    T* mine = sums + warp * 2 * C;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long first = (long long)blockIdx.x * blockDim.x; first < positions;
         first += stride) {  // the same trips for every thread: the warp sums need all lanes
        const long long p = first + threadIdx.x;
        const bool here = p < positions;
        const long long base = here ? p / inner * C * inner + p % inner : 0;
        T a = T(0), b = T(0);
        for (int c = 0; c < C; ++c) {
            const T d = here ? dy[base + c * inner] : T(0);
            const T h = here ? xhat[base + c * inner] : T(0);
            a += d * scale[c];
            b += d * scale[c] * h;
            const T dh = warp_sum(d * h), d1 = warp_sum(d);
            if (lane == 0) {
                mine[c] += dh;
                mine[C + c] += d1;
            }
        }
        if (here) {
            const T r1 = a / T(C), r2 = b / T(C), rs = rstd[p];
            for (int c = 0; c < C; ++c) {
                const long long at = base + c * inner;
                T v = rs * (dy[at] * scale[c] - r1 - xhat[at] * r2);
                if (PLUS) v += plus[at];
                du[at] = v;
            }
        }
    }
    __syncthreads();
    for (int k = threadIdx.x; k < 2 * C; k += blockDim.x) {
        T total = T(0);
        for (int w = 0; w < warps; ++w) total += sums[w * 2 * C + k];
        partial[(long long)(k / C * gridDim.x + blockIdx.x) * C + k % C] = total;
    }
}
"""


def _kernel(name: str, dtype, plus: bool = False):
    return raw_kernel(name, _SOURCE, dtype,
                      {"K": K, "MAX_THREADS": MAX_THREADS, "PLUS": int(plus)})


def _threads(c: int) -> int:
    """Threads per row block for a row of c elements: K elements each, whole warps."""
    return 32 * -(-c // (32 * K))


def _is_float_device(u) -> bool:
    return is_device_array(u) and u.flags.c_contiguous and u.dtype in (np.float32, np.float64)


def rows_apply(u, axis: int, count: int) -> bool:
    """True where the row kernels compute this LayerNorm: a C-contiguous float device array
    normalised over its last axis, whole here (`count` its length), of at most MAX_COLS."""
    c = u.shape[-1]
    return (_is_float_device(u) and axis % u.ndim == u.ndim - 1 and count == c
            and 0 < c <= MAX_COLS)


def columns_apply(u, axis: int, count: int) -> bool:
    """True where the column kernels compute this LayerNorm: a C-contiguous float device array
    normalised over an inner axis, whole here, short enough for the warps' sums to fit
    SHARED_BYTES."""
    axis = axis % u.ndim
    c = u.shape[axis]
    return (_is_float_device(u) and axis < u.ndim - 1 and count == c
            and 0 < 2 * c * (COLUMN_THREADS // 32) * u.itemsize <= SHARED_BYTES)


def row_pitch(a):
    """Elements from one row of a [.., C] to the next where its rows are evenly spaced and each
    row's elements adjacent (a C-contiguous array, or its slice a[.., c0:c1]); else None."""
    item = a.itemsize
    if a.shape[-1] > 1 and a.strides[-1] != item:
        return None
    lead = [(n, s) for n, s in zip(a.shape[:-1], a.strides[:-1]) if n > 1]
    if not lead:
        return a.shape[-1]
    pitch = expected = lead[-1][1]
    for n, s in reversed(lead):  # innermost first: each axis steps over the whole of the next
        if s != expected:
            return None
        expected = s * n
    return pitch // item if pitch % item == 0 and pitch // item >= a.shape[-1] else None


def forward(u, scale, bias, eps: float, axis: int):
    """(xhat, out, rstd) of a LayerNorm over `axis` (rows: the last; columns: an inner one):
    xhat and out shaped like u, rstd like u with `axis` of length 1. scale, bias [C]."""
    xp = get_array_module(u)
    axis = axis % u.ndim
    lead, c, inner = around_axis(u.shape, axis)
    xhat, out = xp.empty_like(u), xp.empty_like(u)  # like u, each
    rstd = xp.empty(u.shape[:axis] + (1,) + u.shape[axis + 1:], dtype=u.dtype)
    scale, bias = (xp.ascontiguousarray(a, dtype=u.dtype) for a in (scale, bias))
    if u.size == 0:
        return xhat, out, rstd
    eps = u.dtype.type(eps)
    if axis == u.ndim - 1:
        _kernel("wm_ln_rows_forward", u.dtype)((lead,), (_threads(c),), (
            u, scale, bias, xhat, out, rstd, np.int32(c), eps))
    else:
        positions = lead * inner
        _kernel("wm_ln_columns_forward", u.dtype)(
            (-(-positions // COLUMN_THREADS),), (COLUMN_THREADS,),
            (u, scale, bias, xhat, out, rstd, np.int64(positions), np.int32(c),
             np.int64(inner), eps))
    return xhat, out, rstd


def backward(dout, xhat, rstd, scale, axis: int, plus=None):
    """(du, dscale, dbias) of the LayerNorm of `forward`; du + plus in du's place where `plus`
    is given; dscale and dbias are sums over this rank's part only. xhat is C-contiguous; the
    rows kernel reads dout in place where its rows are evenly spaced (a slice [.., :C] of a
    wider array, as the decoder's norm gets from the concatenation's backward), other
    layouts are copied first."""
    xp = get_array_module(dout)
    axis = axis % dout.ndim
    lead, c, inner = around_axis(dout.shape, axis)
    rows = axis == dout.ndim - 1
    pitch = row_pitch(dout) if rows else None  # elements from one row of dout to the next
    if pitch is None:
        dout, pitch = c_contiguous(dout), c
    kernel = _kernel("wm_ln_rows_backward" if rows else "wm_ln_columns_backward", dout.dtype,
                     plus is not None)
    threads = _threads(c) if rows else COLUMN_THREADS
    shared = 0 if rows else 2 * c * (COLUMN_THREADS // 32) * dout.itemsize
    work = lead if rows else -(-lead * inner // COLUMN_THREADS)  # rows, or blocks of positions
    blocks = one_wave(kernel, threads, work)
    per_block = -(-max(work, 1) // blocks)
    blocks = -(-max(work, 1) // per_block)
    du = xp.empty(dout.shape, dtype=dout.dtype)  # like dout, C-contiguous
    partial = (xp.empty if dout.size else xp.zeros)((2, blocks, c), dtype=dout.dtype)
    if plus is not None:
        plus = xp.ascontiguousarray(xp.broadcast_to(plus, dout.shape), dtype=dout.dtype)
    scale = xp.ascontiguousarray(scale, dtype=dout.dtype)
    plus_or_any = du if plus is None else plus
    if dout.size and rows:
        kernel((blocks,), (threads,), (dout, xhat, rstd, scale, plus_or_any, du, partial,
                                       np.int32(lead), np.int32(c), np.int32(per_block),
                                       np.int64(pitch)))
    elif dout.size:
        kernel((blocks,), (threads,), (dout, xhat, rstd, scale, plus_or_any, du, partial,
                                       np.int64(lead * inner), np.int32(c), np.int64(inner)),
               shared_mem=shared)
    ones = xp.ones(blocks, dtype=dout.dtype)
    return du, ones @ partial[0], ones @ partial[1]
