"""The weighted mean-squared error of SPEC.md.

    L = sum_{b,v,h,w} lat_w[h] var_w[v] (y - target)^2 / normaliser,   normaliser = B P H W
    dL/dy = 2 lat_w[h] var_w[v] (y - target) / normaliser

`weighted_sse_forward` returns the *local* sum divided by the global normaliser, so the
partial losses of the ranks of a model group (and of the replicas) add up to L. dL/dy is local.
`weighted_sse_and_grad` gives both at once: on GPUs one kernel reads y and target once and
writes dL/dy, its blocks' partial sums of the loss added after (deterministic: no atomics).
"""
from __future__ import annotations

import numpy as np

from weathermixer.autograd.xp import (BLOCK_SUMS, get_array_module, is_device_array, one_wave,
                                      raw_kernel)


def _weights(lat_w, var_w):
    """lat_w [H] and var_w [P] shaped to broadcast over y [B, P, H, W]."""
    return var_w.reshape(1, -1, 1, 1) * lat_w.reshape(1, 1, -1, 1)


def weighted_sse_forward(y, target, lat_w, var_w, normaliser: float):
    """Returns (partial loss, cache): this rank's share of L."""
    r = y - target  # [B, P, H, W]
    w = _weights(lat_w, var_w)
    return (w * r * r).sum() / normaliser, (r, w, normaliser)


def weighted_sse_backward(dloss, cache):
    """dL/dy = 2 w (y - target) / normaliser * dloss."""
    r, w, normaliser = cache
    return (2.0 * dloss / normaliser) * w * r


_SOURCE = BLOCK_SUMS + r"""
// y, target, dy [B, P, H, W] as rows of W: row q is latitude q % H of variable q / H % P.
// dy = c w r with r = y - target; partial[block] = the block's sum of w r^2.
extern "C" __global__ void wm_weighted_sse(
        const T* y, const T* target, const T* lat_w, const T* var_w, T* dy, T* partial,
        const T c, const long long rows, const int H, const int P, const int W) {
    __shared__ T partials[64];
    T s = T(0), unused = T(0);
    for (long long q = blockIdx.x; q < rows; q += gridDim.x) {
        const T w = var_w[q / H % P] * lat_w[q % H];
        const long long row = q * W;
        for (int j = threadIdx.x; j < W; j += blockDim.x) {
            const T r = y[row + j] - target[row + j];
            dy[row + j] = c * w * r;
            s += w * r * r;
        }
    }
    block_sum2(s, unused, partials);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}
"""


def weighted_sse_and_grad(y, target, lat_w, var_w, normaliser: float):
    """(this rank's share of L, dL/dy [B, P, H, W]): `weighted_sse_forward` and
    `weighted_sse_backward` with dloss = 1, in one pass over y and target on GPUs."""
    if not is_device_array(y):
        part, cache = weighted_sse_forward(y, target, lat_w, var_w, normaliser)
        return part, weighted_sse_backward(1.0, cache)
    xp = get_array_module(y)
    y, target, lat_w, var_w = (xp.ascontiguousarray(a, dtype=y.dtype)
                               for a in (y, target, lat_w, var_w))
    B, P, H, W = y.shape
    kernel = raw_kernel("wm_weighted_sse", _SOURCE, y.dtype)
    threads = min(256, 32 * -(-W // 32))
    rows = B * P * H
    blocks = one_wave(kernel, threads, rows)
    dy = xp.empty_like(y)  # [B, P, H, W]
    partial = xp.zeros(blocks, dtype=y.dtype)  # [blocks]
    if y.size:
        kernel((blocks,), (threads,), (y, target, lat_w, var_w, dy, partial,
                                       y.dtype.type(2.0 / normaliser), np.int64(rows),
                                       np.int32(H), np.int32(P), np.int32(W)))
    return partial.sum() / normaliser, dy
