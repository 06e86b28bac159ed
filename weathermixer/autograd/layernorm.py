"""LayerNorm over one axis, with its reductions named so a sharded axis can complete them.

    LN(u) = (u - mean(u)) / sqrt(var(u) + eps) * scale + bias,  population variance over `axis`

Forward makes two reductions over the normalised axis, backward two more (llm.c's
`layernorm_backward`); each is a local partial sum passed through `allreduce`, which is the
identity for an unsharded axis and a sum over the `channel` group in `jigsaw.layernorm`.
`count` is the *global* length of the axis: every division uses it, never the local length.

    forward:   S1 = sum(u)                  mean = S1 / n
               S2 = sum((u - mean)^2)       var  = S2 / n          (two-pass: no cancellation)
    backward:  g = dy * scale,  R1 = sum(g),  R2 = sum(g * xhat)   (packed into one message)
               du = rstd * (g - R1 / n - xhat * R2 / n)
"""
from __future__ import annotations

import numpy as np

from weathermixer.autograd.linear import sum_except
from weathermixer.autograd.xp import (GRAIN, elementwise_kernel, get_array_module,
                                      is_device_array, parallel_ranges)

EPS = 1e-5


def _identity(x):
    return x


def _along(v, ndim: int, axis: int):
    """A 1-D parameter shaped to broadcast along `axis` of an ndim-array."""
    shape = [1] * ndim
    shape[axis] = v.shape[0]
    return v.reshape(shape)


def layernorm_forward(u, scale, bias, axis: int = -1, count: int | None = None,
                      allreduce=_identity):
    """Returns (out, cache); u [..., C, ...] normalised over `axis`, scale/bias [C]."""
    xp = get_array_module(u)
    axis = axis % u.ndim
    n = u.shape[axis] if count is None else count
    mean = allreduce(_sum_along(u, axis)) / n  # reduction S1; [.., 1, ..]
    d, sq = _deviation(u, mean, axis)  # u - mean and its local sum of squares
    var = allreduce(sq) / n  # reduction S2
    rstd = 1.0 / xp.sqrt(var + EPS)  # [.., 1, ..]
    xhat, out = _normalise(d, rstd, _along(scale, u.ndim, axis), _along(bias, u.ndim, axis))
    return out, (xhat, rstd, scale, axis, n, allreduce)


def _sum_along(a, axis: int):
    """a.sum(axis, keepdims=True). On the host, a sum over the last, contiguous axis is one
    BLAS matrix-vector product with a ones vector (numpy's row sums are slower); CuPy's own
    reduction kernels stay on the device, in full precision whatever the matmul mode."""
    if not is_device_array(a) and axis == a.ndim - 1 and a.flags.c_contiguous:
        xp = get_array_module(a)
        return (a @ xp.ones(a.shape[-1], dtype=a.dtype))[..., None]
    return a.sum(axis=axis, keepdims=True)


def _rows(a, axis: int) -> bool:
    """True for a host array normalised over its last, contiguous axis: the case the host code
    runs as L2-sized row chunks (`parallel_ranges`; one thread: measured faster than several
    at these sizes, where a task is a few tens of microseconds)."""
    return not is_device_array(a) and axis == a.ndim - 1 and a.flags.c_contiguous


def _deviation(u, mean, axis: int):
    """(d, sum of d^2 over `axis`) with d = u - mean."""
    if not _rows(u, axis):
        d = u - mean
        return d, _sum_along(d * d, axis)
    c = u.shape[-1]
    u2, m2 = u.reshape(-1, c), mean.reshape(-1, 1)  # [rows, C], [rows, 1]
    d, sq = np.empty_like(u2), np.empty((u2.shape[0], 1), dtype=u.dtype)

    def work(lo, hi):
        np.subtract(u2[lo:hi], m2[lo:hi], out=d[lo:hi])
        sq[lo:hi, 0] = np.einsum("rc,rc->r", d[lo:hi], d[lo:hi])

    parallel_ranges(u2.shape[0], work, grain=max(1, GRAIN // c), threads=1)
    return d.reshape(u.shape), sq.reshape(mean.shape)


def _normalise(d, rstd, scale, bias):
    """(xhat, out) = (d rstd, xhat scale + bias): one fused pass on GPUs, row chunks on the
    host for a last-axis LN."""
    if is_device_array(d):
        return elementwise_kernel("wm_ln_fwd", "T d, T rstd, T scale, T bias", "T xhat, T out",
                                  "xhat = d * rstd; out = xhat * scale + bias;")(d, rstd, scale, bias)
    if not _rows(d, d.ndim - 1) or scale.shape[-1] != d.shape[-1]:
        xhat = d * rstd
        return xhat, xhat * scale + bias
    c = d.shape[-1]
    d2, r2, s, b = d.reshape(-1, c), rstd.reshape(-1, 1), scale.reshape(c), bias.reshape(c)
    xhat, out = np.empty_like(d2), np.empty_like(d2)  # [rows, C]

    def work(lo, hi):
        np.multiply(d2[lo:hi], r2[lo:hi], out=xhat[lo:hi])
        np.multiply(xhat[lo:hi], s, out=out[lo:hi])
        out[lo:hi] += b

    parallel_ranges(d2.shape[0], work, grain=max(1, GRAIN // c), threads=1)
    return xhat.reshape(d.shape), out.reshape(d.shape)


def _input_gradient(g, xhat, rstd, r1, r2, n):
    """du = rstd (g - R1 / n - xhat R2 / n): one fused pass on GPUs, row chunks on the host."""
    if is_device_array(g):
        return elementwise_kernel(
            "wm_ln_bwd", "T g, T xhat, T rstd, T r1, T r2, T n", "T du",
            "du = rstd * (g - r1 / n - xhat * (r2 / n));")(g, xhat, rstd, r1, r2, g.dtype.type(n))
    if not _rows(g, g.ndim - 1) or rstd.shape[-1] != 1:
        return rstd * (g - r1 / n - xhat * (r2 / n))
    c = g.shape[-1]
    g2, x2 = g.reshape(-1, c), xhat.reshape(-1, c)
    a1, a2, rs = (r1 / n).reshape(-1, 1), (r2 / n).reshape(-1, 1), rstd.reshape(-1, 1)
    du = np.empty_like(g2)  # [rows, C]

    def work(lo, hi):
        np.multiply(x2[lo:hi], a2[lo:hi], out=du[lo:hi])
        np.subtract(g2[lo:hi], du[lo:hi], out=du[lo:hi])
        du[lo:hi] -= a1[lo:hi]
        du[lo:hi] *= rs[lo:hi]

    parallel_ranges(g2.shape[0], work, grain=max(1, GRAIN // c), threads=1)
    return du.reshape(g.shape)


def layernorm_backward(dout, cache):
    """Gradients (du, dscale, dbias). dscale and dbias are sums over this rank's rows only."""
    xhat, rstd, scale, axis, n, allreduce = cache
    xp = get_array_module(dout)
    dout = xp.ascontiguousarray(dout)  # one copy of a transposed view, then unit-stride passes
    if _rows(dout, axis):
        g, r, dscale, dbias = _backward_sums_rows(dout, xhat, scale)
    else:
        g = dout * _along(scale, dout.ndim, axis)
        r = xp.stack([_sum_along(g, axis),  # reduction R1
                      _sum_along(g * xhat, axis)])  # reduction R2; [2, .., 1, ..]
        dscale = sum_except(dout * xhat, axis)  # [C]
        dbias = sum_except(dout, axis)  # [C]
    r1, r2 = allreduce(r)
    du = _input_gradient(g, xhat, rstd, r1, r2, n)
    return du, dscale, dbias


def _backward_sums_rows(dout, xhat, scale):
    """The host form of the backward's local sums for a last-axis LN, one L2-sized row chunk
    at a time: g = dout scale, r = [R1, R2] per row, and dscale, dbias over the rows."""
    c = dout.shape[-1]
    d2, x2 = dout.reshape(-1, c), xhat.reshape(-1, c)  # [rows, C]
    g = np.empty_like(d2)
    r = np.empty((2, d2.shape[0]), dtype=dout.dtype)  # [R1 | R2, rows]
    grain = max(1, GRAIN // c)
    bounds = list(range(0, d2.shape[0], grain)) + [d2.shape[0]]
    dscale = np.zeros(c, dtype=dout.dtype)
    dbias = np.zeros(c, dtype=dout.dtype)
    ones = np.ones(c, dtype=dout.dtype)
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        np.multiply(d2[lo:hi], scale, out=g[lo:hi])
        r[0, lo:hi] = g[lo:hi] @ ones
        r[1, lo:hi] = np.einsum("rc,rc->r", g[lo:hi], x2[lo:hi])
        dscale += np.einsum("rc,rc->c", d2[lo:hi], x2[lo:hi])
        dbias += np.ones(hi - lo, dtype=dout.dtype) @ d2[lo:hi]
    lead = dout.shape[:-1] + (1,)
    return g.reshape(dout.shape), r.reshape((2,) + lead), dscale, dbias
