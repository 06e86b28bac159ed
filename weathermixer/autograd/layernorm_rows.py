"""LayerNorm over a contiguous last axis on the GPU, one thread block per row.

The device form of `autograd.layernorm` where the normalised axis is the last one and is
whole on this rank (nothing to allreduce): the embedding axis E of the mixer blocks and of the
decoder's norm, on every layout that does not cut E. Each thread holds up to K elements of a
row in registers, so a row is read from memory once, and the row's sums are block
reductions (warp shuffles, then one partial per warp):

    forward  (a block per row):   mean = sum(u) / C,  var = sum((u - mean)^2) / C,
                                  rstd = 1 / sqrt(var + eps),
                                  xhat = (u - mean) rstd,  out = xhat scale + bias
    backward (a block per R rows): R1 = sum(dy scale),  R2 = sum(dy scale xhat)    per row
                                  du = rstd (dy scale - R1 / C - xhat R2 / C) (+ plus)
                                  the block's own column sums of dy xhat and dy, one partial
                                  row each per block, summed over blocks by two matrix-vector
                                  products: dscale and dbias

The formulas are `autograd.layernorm`'s, with its reductions in another order: the GPU tests
check the two against each other in float64. The unfused path (matrix-vector sums and
elementwise kernels) reads and writes each [rows, C] array several times more.
"""
from __future__ import annotations

import numpy as np

from weathermixer.autograd.xp import (get_array_module, is_device_array, multiprocessors,
                                      raw_kernel, resident_blocks)

K = 8  # row elements per thread, in registers
MAX_THREADS = 1024  # per block (a register budget of 64 each), so rows of up to 8192 elements
MAX_COLS = MAX_THREADS * K

_SOURCE = r"""
__device__ __forceinline__ T warp_sum(T x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// The sum of x over the block, returned to every thread (blockDim.x a multiple of 32).
__device__ T block_sum(T x, T* partials) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    x = warp_sum(x);
    __syncthreads();  // the previous call's readers are done with `partials`
    if (lane == 0) partials[warp] = x;
    __syncthreads();
    x = lane < (blockDim.x >> 5) ? partials[lane] : T(0);
    return warp_sum(x);
}

extern "C" __global__ void __launch_bounds__(MAX_THREADS) wm_ln_rows_forward(
        const T* u, const T* scale, const T* bias, T* xhat, T* out, T* rstd,
        const int C, const T eps) {
    __shared__ T partials[32];
    const long long row = (long long)blockIdx.x * C;
    T x[K];  // this thread's elements of the row: columns threadIdx.x + j blockDim.x
    T s = T(0);
#pragma unroll
    for (int j = 0; j < K; ++j) {
        const int c = threadIdx.x + j * blockDim.x;
        x[j] = c < C ? u[row + c] : T(0);
        s += x[j];
    }
    const T mean = block_sum(s, partials) / T(C);
    T q = T(0);
#pragma unroll
    for (int j = 0; j < K; ++j) {
        const int c = threadIdx.x + j * blockDim.x;
        const T d = c < C ? x[j] - mean : T(0);
        q += d * d;
    }
    const T r = T(1) / sqrt(block_sum(q, partials) / T(C) + eps);
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
        T* partial, const int rows, const int C, const int R) {
    __shared__ T partials[32];
    T ds[K], db[K];  // this block's column sums of dy xhat and dy
#pragma unroll
    for (int j = 0; j < K; ++j) {
        ds[j] = T(0);
        db[j] = T(0);
    }
    const int first = blockIdx.x * R, last = min(rows, first + R);
    for (int i = first; i < last; ++i) {
        const long long row = (long long)i * C;
        T d[K], h[K];
        T a = T(0), b = T(0);
#pragma unroll
        for (int j = 0; j < K; ++j) {
            const int c = threadIdx.x + j * blockDim.x;
            d[j] = c < C ? dy[row + c] : T(0);
            h[j] = c < C ? xhat[row + c] : T(0);
            const T g = d[j] * (c < C ? scale[c] : T(0));
            a += g;
            b += g * h[j];
            ds[j] += d[j] * h[j];
            db[j] += d[j];
        }
        const T r1 = block_sum(a, partials) / T(C);
        const T r2 = block_sum(b, partials) / T(C);
        const T rs = rstd[i];
#pragma unroll
        for (int j = 0; j < K; ++j) {
            const int c = threadIdx.x + j * blockDim.x;
            if (c < C) {
                T v = rs * (d[j] * scale[c] - r1 - h[j] * r2);
                if (PLUS) v += plus[row + c];
                du[row + c] = v;
            }
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
"""


def _kernel(name: str, dtype, plus: bool = False):
    return raw_kernel(name, _SOURCE, dtype, {"K": K, "MAX_THREADS": MAX_THREADS, "PLUS": int(plus)})


def _threads(c: int) -> int:
    """Threads per block for a row of c elements: K elements each, whole warps."""
    return 32 * -(-c // (32 * K))


def applies(u, axis: int, count: int) -> bool:
    """True where the fused row kernels compute this LayerNorm: a C-contiguous float device
    array normalised over its last axis, whole here (`count` its length), of at most MAX_COLS."""
    c = u.shape[-1]
    return (is_device_array(u) and axis % u.ndim == u.ndim - 1 and u.flags.c_contiguous
            and u.dtype in (np.float32, np.float64) and count == c and 0 < c <= MAX_COLS)


def forward(u, scale, bias, eps: float):
    """(xhat, out, rstd) of a LayerNorm over u's last axis: xhat and out [..., C] like u, rstd
    [..., 1]. scale, bias [C]."""
    xp = get_array_module(u)
    c = u.shape[-1]
    rows = u.size // c
    xhat, out = xp.empty_like(u), xp.empty_like(u)  # [..., C] each
    rstd = xp.empty(u.shape[:-1] + (1,), dtype=u.dtype)  # [..., 1]
    scale, bias = (xp.ascontiguousarray(a, dtype=u.dtype) for a in (scale, bias))
    if rows:
        _kernel("wm_ln_rows_forward", u.dtype)((rows,), (_threads(c),), (
            u, scale, bias, xhat, out, rstd, np.int32(c), u.dtype.type(eps)))
    return xhat, out, rstd


def backward(dout, xhat, rstd, scale, plus=None):
    """(du, dscale, dbias) for a LayerNorm over the last axis (see `forward`); du + plus in
    du's place where `plus` is given. dout, xhat [..., C] C-contiguous; dscale and dbias are
    sums over these rows only."""
    xp = get_array_module(dout)
    c = dout.shape[-1]
    rows = dout.size // c
    threads, kernel = _threads(c), _kernel("wm_ln_rows_backward", dout.dtype, plus is not None)
    blocks = max(1, min(rows, multiprocessors() * resident_blocks(kernel, threads)))  # one wave
    per_block = -(-max(rows, 1) // blocks)
    blocks = -(-max(rows, 1) // per_block)
    du = xp.empty_like(dout)  # [..., C]
    partial = (xp.empty if rows else xp.zeros)((2, blocks, c), dtype=dout.dtype)  # [ds | db, block, C]
    if plus is not None:
        plus = xp.ascontiguousarray(xp.broadcast_to(plus, dout.shape), dtype=dout.dtype)
    scale = xp.ascontiguousarray(scale, dtype=dout.dtype)
    if rows:
        kernel((blocks,), (threads,), (
            dout, xhat, rstd, scale, du if plus is None else plus, du, partial, np.int32(rows),
            np.int32(c), np.int32(per_block)))
    ones = xp.ones(blocks, dtype=dout.dtype)
    return du, ones @ partial[0], ones @ partial[1]
