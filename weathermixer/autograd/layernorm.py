"""LayerNorm over one axis, with its reductions named so a sharded axis can complete them.

    LN(u) = (u - mean(u)) / sqrt(var(u) + eps) * scale + bias,  population variance over `axis`

Forward makes two reductions over the normalised axis, backward two more (llm.c's
`layernorm_backward`); each is a local partial sum passed through `allreduce`, which is the
identity for an unsharded axis and a sum over the `channel` group in `jigsaw.layernorm`.
`count` is the *global* length of the axis: every division uses it, never the local length.
`allreduce=None` says the axis is whole on this rank; on GPUs the LN then runs in the fused
kernels of `autograd.layernorm_fused` (the last axis as rows, a short inner one as columns).

    forward:   S1 = sum(u)                  mean = S1 / n
               S2 = sum((u - mean)^2)       var  = S2 / n          (two-pass: no cancellation)
               xhat = (u - mean) rstd,      out  = xhat scale + bias
    backward:  g = dy * scale,  R1 = sum(g),  R2 = sum(g * xhat)   (packed into one message)
               du = rstd * (g - R1 / n - xhat * R2 / n)
               dscale, dbias = sums of dy xhat and dy over every other axis (this rank's rows)

Every sum along the normalised axis is a BLAS matrix-vector product with a ones (or scale)
vector (`_dot_along`), every sum over the other axes one with a ones vector (`sum_except`), and
on GPUs each elementwise line is one fused kernel (g is never stored). On the host a last-axis
LN runs the same formulas on L2-sized row chunks; where the axis is whole on the rank, each
chunk goes through every step, forward or backward, in one visit.
"""
from __future__ import annotations

import numpy as np

from weathermixer.autograd import layernorm_fused as fused
from weathermixer.autograd.linear import around_axis, c_contiguous, sum_except
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
                      allreduce=None):
    """Returns (out, cache); u [..., C, ...] normalised over `axis`, scale/bias [C]."""
    xp = get_array_module(u)
    axis = axis % u.ndim
    n = u.shape[axis] if count is None else count
    if allreduce is None and _fuses(u, axis, n):
        xhat, out, rstd = fused.forward(u, scale, bias, EPS, axis)
        return out, (xhat, rstd, scale, axis, n, None)
    if allreduce is None and _rows(u, axis):
        xhat, out, rstd = _forward_whole_rows(u, scale, bias, n)
        return out, (xhat, rstd, scale, axis, n, _identity)
    allreduce = allreduce or _identity
    mean = allreduce(_sum_along(u, axis)) / n  # reduction S1; [.., 1, ..]
    var = allreduce(_squared_deviation(u, mean, axis)) / n  # reduction S2
    rstd = 1.0 / xp.sqrt(var + EPS)  # [.., 1, ..]
    xhat, out = _normalise(u, mean, rstd, _along(scale, u.ndim, axis), _along(bias, u.ndim, axis))
    return out, (xhat, rstd, scale, axis, n, allreduce)


def _fuses(u, axis: int, n: int) -> bool:
    """True where `autograd.layernorm_fused` computes this LN (device arrays only)."""
    return fused.rows_apply(u, axis, n) or fused.columns_apply(u, axis, n)


def _dot_along(a, v, axis: int):
    """sum over `axis` of a * v (v [C] runs along it), keepdims: BLAS matrix-vector products
    on the [lead, C, inner] view of a C-contiguous a, which read each element once at memory
    speed (numpy's row sums and CuPy's reduction kernels reach a fraction of it here)."""
    xp = get_array_module(a)
    a = xp.ascontiguousarray(a)
    a3 = a.reshape(around_axis(a.shape, axis))  # [lead, C, inner]
    if a3.shape[-1] == 1:  # the last axis: one product over all rows
        out = a3[..., 0] @ v  # [lead]
    else:
        out = xp.stack([v @ a3[i] for i in range(a3.shape[0])])  # [lead, inner]
    return out.reshape(a.shape[:axis] + (1,) + a.shape[axis + 1:])


def _sum_along(a, axis: int):
    """a.sum(axis, keepdims=True), as `_dot_along` with a ones vector."""
    return _dot_along(a, get_array_module(a).ones(a.shape[axis], dtype=a.dtype), axis)


def _rows(a, axis: int) -> bool:
    """True for a host array normalised over its last, contiguous axis: the case the host code
    runs as L2-sized row chunks (`parallel_ranges`; one thread: measured faster than several
    at these sizes, where a task is a few tens of microseconds)."""
    return not is_device_array(a) and axis == a.ndim - 1 and a.flags.c_contiguous


def _row_chunks(c: int, work, rows: int) -> None:
    """work(lo, hi) over the rows of a [rows, c] array, an L2-sized chunk at a time."""
    parallel_ranges(rows, work, grain=max(1, GRAIN // c), threads=1)


def _squared_deviation(u, mean, axis: int):
    """The local sum of (u - mean)^2 over `axis` (keepdims). On GPUs one fused kernel writes
    the squares, summed as `_sum_along`; on the host u - mean is never stored whole."""
    if is_device_array(u):
        square = elementwise_kernel("wm_ln_sq_dev", "T u, T mean", "T s",
                                    "s = (u - mean) * (u - mean)")
        return _sum_along(square(u, mean), axis)
    if not _rows(u, axis):
        d = u - mean
        return _sum_along(d * d, axis)
    c = u.shape[-1]
    u2, m2 = u.reshape(-1, c), mean.reshape(-1, 1)  # [rows, C], [rows, 1]
    sq = np.empty((u2.shape[0], 1), dtype=u.dtype)

    def work(lo, hi):
        d = u2[lo:hi] - m2[lo:hi]  # one chunk of u - mean
        sq[lo:hi, 0] = np.einsum("rc,rc->r", d, d)

    _row_chunks(c, work, u2.shape[0])
    return sq.reshape(mean.shape)


def _normalise(u, mean, rstd, scale, bias):
    """(xhat, out) = ((u - mean) rstd, xhat scale + bias): one fused pass on GPUs, row chunks
    on the host for a last-axis LN."""
    if is_device_array(u):
        return elementwise_kernel(
            "wm_ln_fwd", "T u, T mean, T rstd, T scale, T bias", "T xhat, T out",
            "xhat = (u - mean) * rstd; out = xhat * scale + bias;")(u, mean, rstd, scale, bias)
    if not _rows(u, u.ndim - 1) or scale.shape[-1] != u.shape[-1]:
        xhat = (u - mean) * rstd
        return xhat, xhat * scale + bias
    c = u.shape[-1]
    u2, m2, r2 = u.reshape(-1, c), mean.reshape(-1, 1), rstd.reshape(-1, 1)
    s, b = scale.reshape(c), bias.reshape(c)
    xhat, out = np.empty_like(u2), np.empty_like(u2)  # [rows, C]

    def work(lo, hi):
        np.subtract(u2[lo:hi], m2[lo:hi], out=xhat[lo:hi])
        _scale_chunk(xhat[lo:hi], r2[lo:hi], s, b, out[lo:hi])

    _row_chunks(c, work, u2.shape[0])
    return xhat.reshape(u.shape), out.reshape(u.shape)


def _scale_chunk(d, r, scale, bias, out):
    """One row chunk: d = u - mean becomes xhat = d r in place, out = xhat scale + bias."""
    d *= r
    np.multiply(d, scale, out=out)
    out += bias


def _forward_whole_rows(u, scale, bias, n: int):
    """(xhat, out, rstd) of a host LN over the last axis, whole on this rank: each L2-sized
    chunk of rows is read once and taken through every step (mean, u - mean, variance, xhat,
    out), where an axis cut over ranks needs its sums completed between passes over u."""
    c = u.shape[-1]
    u2 = u.reshape(-1, c)  # [rows, C]
    xhat, out = np.empty_like(u2), np.empty_like(u2)  # [rows, C]
    rstd = np.empty((u2.shape[0], 1), dtype=u.dtype)  # [rows, 1]
    ones = np.ones(c, dtype=u.dtype)

    def work(lo, hi):
        d = xhat[lo:hi]
        np.subtract(u2[lo:hi], (u2[lo:hi] @ ones)[:, None] / n, out=d)  # u - mean
        rstd[lo:hi, 0] = 1.0 / np.sqrt(np.einsum("rc,rc->r", d, d) / n + EPS)
        _scale_chunk(d, rstd[lo:hi], scale, bias, out[lo:hi])

    _row_chunks(c, work, u2.shape[0])
    return xhat.reshape(u.shape), out.reshape(u.shape), rstd.reshape(u.shape[:-1] + (1,))


def layernorm_backward(dout, cache, plus=None):
    """Gradients (du, dscale, dbias); with `plus`, du + plus is returned in du's place (a
    fan-out's other gradient, added in the same pass). dscale and dbias are sums over this
    rank's rows only."""
    xhat, rstd, scale, axis, n, allreduce = cache
    if allreduce is None:  # the forward ran in the fused kernels
        return fused.backward(dout, xhat, rstd, scale, axis, plus)
    dout = c_contiguous(dout)  # one copy of a transposed view, then unit-stride passes
    if allreduce is _identity and _rows(dout, axis):  # whole on this rank, on the host
        return _backward_whole_rows(dout, xhat, rstd, scale, n, plus)
    s = _along(scale, dout.ndim, axis)
    if _rows(dout, axis):
        r, dscale, dbias = _backward_sums_rows(dout, xhat, scale)
    else:
        r, dscale, dbias = _backward_sums_gemv(dout, xhat, scale, axis)
    r1, r2 = allreduce(r)  # [.., 1, ..] each
    return _input_gradient(dout, s, xhat, rstd, r1, r2, n, plus), dscale, dbias


def _input_gradient(dout, scale, xhat, rstd, r1, r2, n, plus=None):
    """du = rstd (dout scale - R1 / n - xhat R2 / n) (+ plus): one fused pass on GPUs, row
    chunks on the host."""
    if is_device_array(dout):
        formula = "rstd * (dy * scale - r1 / n - xhat * (r2 / n))"
        args = (dout, scale, xhat, rstd, r1, r2, dout.dtype.type(n))
        ins = "T dy, T scale, T xhat, T rstd, T r1, T r2, T n"
        if plus is None:
            return elementwise_kernel("wm_ln_bwd", ins, "T du", f"du = {formula};")(*args)
        return elementwise_kernel("wm_ln_bwd_plus", ins + ", T plus", "T du",
                                  f"du = {formula} + plus;")(*args, plus)
    if not _rows(dout, dout.ndim - 1) or rstd.shape[-1] != 1:
        du = rstd * (dout * scale - r1 / n - xhat * (r2 / n))
        return du if plus is None else du + plus
    c = dout.shape[-1]
    d2, x2, s = dout.reshape(-1, c), xhat.reshape(-1, c), scale.reshape(c)
    a1, a2, rs = (r1 / n).reshape(-1, 1), (r2 / n).reshape(-1, 1), rstd.reshape(-1, 1)
    p2 = None if plus is None else np.broadcast_to(plus, dout.shape).reshape(-1, c)
    du = np.empty_like(d2)  # [rows, C]

    def work(lo, hi):
        _input_gradient_chunk(d2[lo:hi] * s, x2[lo:hi], a1[lo:hi], a2[lo:hi], rs[lo:hi],
                              None if p2 is None else p2[lo:hi], du[lo:hi])

    _row_chunks(c, work, d2.shape[0])
    return du.reshape(dout.shape)


def _input_gradient_chunk(g, xhat, a1, a2, rstd, plus, du):
    """One row chunk: du = rstd (g - a1 - xhat a2) (+ plus), with g = dout scale and
    a1, a2 = R1 / n, R2 / n [rows, 1]."""
    np.multiply(xhat, a2, out=du)
    np.subtract(g, du, out=du)  # g - xhat R2 / n
    du -= a1
    du *= rstd
    if plus is not None:
        du += plus


def _backward_whole_rows(dout, xhat, rstd, scale, n: int, plus=None):
    """(du, dscale, dbias) of a host LN over the last axis, whole on this rank: each L2-sized
    chunk of rows is taken through the row sums R1, R2, its share of dscale and dbias and du
    in one visit (an axis cut over ranks needs R1, R2 completed before du)."""
    c = dout.shape[-1]
    d2, x2, rs = dout.reshape(-1, c), xhat.reshape(-1, c), rstd.reshape(-1, 1)  # [rows, C]
    p2 = None if plus is None else np.broadcast_to(plus, dout.shape).reshape(-1, c)
    du = np.empty_like(d2)  # [rows, C]
    dscale, dbias = np.zeros(c, dtype=dout.dtype), np.zeros(c, dtype=dout.dtype)

    def work(lo, hi):
        g, r1, r2 = _backward_sums_chunk(d2[lo:hi], x2[lo:hi], scale, dscale, dbias)
        _input_gradient_chunk(g, x2[lo:hi], r1[:, None] / n, r2[:, None] / n, rs[lo:hi],
                              None if p2 is None else p2[lo:hi], du[lo:hi])

    _row_chunks(c, work, d2.shape[0])
    return du.reshape(dout.shape), dscale, dbias


def _backward_sums_gemv(dout, xhat, scale, axis: int):
    """The backward's local sums as matrix-vector products (the device's form, and the host's
    for an inner axis): with p = dout xhat, R1 = sum(dout scale) and R2 = sum(p scale) along
    `axis` (`_dot_along`), dscale and dbias the sums of p and dout over every other axis."""
    p = dout * xhat
    r = get_array_module(dout).stack([_dot_along(dout, scale, axis),  # reduction R1
                                      _dot_along(p, scale, axis)])  # reduction R2
    return r, sum_except(p, axis), sum_except(dout, axis)


def _backward_sums_rows(dout, xhat, scale):
    """The host form of the backward's local sums for a last-axis LN, one L2-sized row chunk
    at a time: r = [R1, R2] per row, and dscale, dbias over the rows."""
    c = dout.shape[-1]
    d2, x2 = dout.reshape(-1, c), xhat.reshape(-1, c)  # [rows, C]
    r = np.empty((2, d2.shape[0]), dtype=dout.dtype)  # [R1 | R2, rows]
    dscale, dbias = np.zeros(c, dtype=dout.dtype), np.zeros(c, dtype=dout.dtype)

    def work(lo, hi):
        _, r[0, lo:hi], r[1, lo:hi] = _backward_sums_chunk(d2[lo:hi], x2[lo:hi], scale,
                                                           dscale, dbias)

    _row_chunks(c, work, d2.shape[0])
    lead = dout.shape[:-1] + (1,)
    return r.reshape((2,) + lead), dscale, dbias


def _backward_sums_chunk(d, xhat, scale, dscale, dbias):
    """One row chunk d [rows, C] of dout: (g = d scale, R1, R2 [rows]), its rows' shares added
    to dscale and dbias [C] in place."""
    g = d * scale
    dscale += np.einsum("rc,rc->c", d, xhat)
    dbias += np.ones(d.shape[0], dtype=d.dtype) @ d
    return g, g @ np.ones(d.shape[1], dtype=d.dtype), np.einsum("rc,rc->r", g, xhat)
