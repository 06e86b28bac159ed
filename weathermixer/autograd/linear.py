"""The two linear forms of the mixer, with hand-written backward passes.

    channel form:  Y = X @ W.T + b        X [..., K], W [N, K], b [N]  -> Y [..., N]
    token form:    Y = W @ X + b[:, None] X [..., T, E], W [M, T], b [M] -> Y [..., M, E]

The token form is the channel form on the transposed view of X (no copy), so both share one
backward. Leading axes (the batch) are summed in dW and db.
"""
from __future__ import annotations

import numpy as np

from weathermixer.autograd.xp import from_transposed, get_array_module, is_device_array


def is_transposed(a) -> bool:
    """True for a view whose last two axes are swapped from a C-contiguous array (the token
    mixing's view [.., E, T] of the residual stream [.., T, E])."""
    return a.ndim >= 2 and not a.flags.c_contiguous and a.swapaxes(-1, -2).flags.c_contiguous


def c_contiguous(a):
    """a as a C-contiguous array: itself if it is one; else a copy. On GPUs a transposed view
    of one matrix goes through CuPy's asfortranarray of the matrix it views (cuBLAS geam), a
    batch of them through the tiled kernel `xp.from_transposed` (CuPy's copy reads a
    transposed view elements apart: [17280, 4320] float32 on an H100 took 0.64 ms, geam 0.23,
    the tiled kernel 0.25; benchmarks/gpu_fused.py)."""
    if a.flags.c_contiguous:
        return a
    xp = get_array_module(a)
    if is_device_array(a) and is_transposed(a):
        if a.size == a.shape[-2] * a.shape[-1]:  # one matrix (leading axes of length 1)
            return xp.asfortranarray(a.reshape(a.shape[-2:]).T).T.reshape(a.shape)
        return from_transposed(a)
    return xp.ascontiguousarray(a)


def f_contiguous(a):
    """A 2-D array as a column-major (F-contiguous) array: the transpose of c_contiguous(a.T)."""
    return a if a.flags.f_contiguous else c_contiguous(a.T).T


def add_bias(y, b):
    """y += b along y's last axis, in place, walking y's memory in order (for a transposed
    view the bias runs down the rows of the C-contiguous array it views)."""
    if is_transposed(y):
        rows = y.swapaxes(-1, -2)  # the C-contiguous array y views
        rows += b[:, None]  # (`y.swapaxes(-1, -2)[...] += ` would also copy it onto itself)
    else:
        y += b


def matmul(a, b, out=None, accumulate: bool = False):
    """a [..., m, k] @ b [k, n] -> [..., m, n] as 2-D GEMMs (into `out` if given: C-contiguous,
    or a transposed view, filled as out^T = b^T a^T without a copy). With `accumulate`,
    out += a @ b: on GPUs the GEMM adds into `out` itself (beta = 1), with no temporary and no
    separate pass over `out`.

    2-D products take transposed views without a copy (BLAS transpose flags), and CuPy runs
    them in the precision set by `set_matmul_precision` (its batched path ignores TF32). A
    C-contiguous batch is one tall GEMM; any other batch is a loop of 2-D GEMMs."""
    xp = get_array_module(a)
    if accumulate:
        return _add_product(a, b, out)
    lead, (m, k) = a.shape[:-2], a.shape[-2:]
    if out is None:
        out = xp.empty(lead + (m, b.shape[-1]), dtype=xp.result_type(a, b))  # [..., m, n]
    if is_transposed(out):
        for i in np.ndindex(*lead):
            xp.matmul(b.T, a[i].T, out=out[i].T)  # [n, m], C-contiguous
    elif a.ndim == 2:
        xp.matmul(a, b, out=out)
    elif a.flags.c_contiguous:
        xp.matmul(a.reshape(-1, k), b, out=out.reshape(-1, b.shape[-1]))
    else:
        for i in np.ndindex(*lead):
            xp.matmul(a[i], b, out=out[i])
    return out


def _add_product(a, b, out):
    """out [..., m, n] += a [..., m, k] @ b [k, n]; on GPUs one cuBLAS GEMM per 2-D product
    with beta = 1 (`out` C- or F-contiguous per product: a transposed view is F-contiguous)."""
    if not is_device_array(a):
        out += a @ b
        return out
    from cupy import cublas
    for i in np.ndindex(*a.shape[:-2]):
        cublas.gemm("N", "N", a[i], b, out=out[i], beta=1.0)
    return out


NARROW = 256  # output columns under which a GEMM is bound by memory, not by its arithmetic


def input_gradient_operands(dy, w):
    """(dy, w) for the input-gradient GEMM dy @ w, in layouts cuBLAS runs faster on GPUs: dy
    row-major (copied from a transposed view) and w column-major where it is the smaller
    operand (C1 on an H200, benchmarks/gpu_gemms.py: token fc2 3.68 ms with dy's copy against
    5.70 on the view; recovery 3.61 with w's against 4.31, channel fc1 1.95 against 2.23).
    A GEMM with fewer than NARROW output columns reads memory more than it computes, and
    reads the view as fast: dy stays as it is (the head's [H W, 69] @ [69, 138] on an H200:
    0.59 ms on the view, 1.04 with the copy). Host arrays are returned as they are."""
    if not is_device_array(dy):
        return dy, w
    if is_transposed(dy) and w.shape[-1] >= NARROW:
        dy = c_contiguous(dy)
    if w.size < dy[(0,) * (dy.ndim - 2)].size:
        w = f_contiguous(w)
    return dy, w


def contract_leading(a, b, out=None):
    """sum over every axis but the last of a[..., n] b[..., k] -> [n, k] (dW of a GEMM), into
    `out` (C-contiguous) if given: one tall GEMM for C-contiguous operands, else one 2-D GEMM
    per index of the leading axes."""
    if a.ndim == 1:
        return _into(out, a[:, None] * b[None, :])
    if a.ndim == 2:
        return _tall_product(a, b, out)
    if a.flags.c_contiguous and b.flags.c_contiguous:  # the batch is one tall GEMM
        return _tall_product(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), out)
    for count, i in enumerate(np.ndindex(*a.shape[:-2])):
        if count == 0:
            out = _tall_product(a[i], b[i], out)  # [n, k]
        else:
            out += _tall_product(a[i], b[i])
    return out


def _into(out, value):
    """`value`, written into `out` when one is given."""
    if out is None:
        return value
    out[...] = value
    return out


def _tall_product(a, b, out=None):
    """a^T b for a [m, n], b [m, k] with a long m (a weight gradient), into `out` if given.
    On GPUs, unless b is column-major already, the smaller operand is first copied to a
    layout cuBLAS runs faster: b column-major, or a^T row-major where a is the smaller (C1 on
    an H200, benchmarks/gpu_gemms.py: channel fc2 1.89 ms with the copy against 2.56, token
    fc2 3.72 against 4.27, recovery 3.77 against 5.71). On the host the product is taken as
    it is."""
    xp = get_array_module(a)
    if is_device_array(a) and not b.flags.f_contiguous:
        if a.size < b.size:
            a = c_contiguous(a.T).T
        else:
            b = f_contiguous(b)
    return xp.matmul(a.T, b, out=out)


def around_axis(shape, axis: int) -> tuple[int, int, int]:
    """(lead, C, inner): the sizes of the axes before `axis`, of `axis`, and after it, so that
    a C-contiguous array of `shape` views as [lead, C, inner]."""
    lead = int(np.prod(shape[:axis], dtype=np.int64))
    return lead, shape[axis], int(np.prod(shape[axis + 1:], dtype=np.int64))


def sum_except(a, axis: int):
    """Sum over every axis but `axis` -> [a.shape[axis]], as products with a ones vector:
    BLAS reads each element once at memory speed, where a column reduction would stride.
    A transposed view is summed through the C-contiguous array it views."""
    xp = get_array_module(a)
    axis = axis % a.ndim
    if is_transposed(a):
        a, axis = a.swapaxes(-1, -2), {a.ndim - 1: a.ndim - 2, a.ndim - 2: a.ndim - 1}.get(axis, axis)
    if not a.flags.c_contiguous:
        return a.sum(axis=tuple(i for i in range(a.ndim) if i != axis))
    lead, c, inner = around_axis(a.shape, axis)
    rows = a.reshape(lead * c, inner)  # [lead C, inner]
    per_lead = (rows @ xp.ones(inner, dtype=a.dtype) if inner > 1 else rows[:, 0]).reshape(lead, c)
    return xp.ones(lead, dtype=a.dtype) @ per_lead if lead > 1 else per_lead[0]  # [C]


def linear_forward(x, w, b=None):
    """Y = X @ W.T (+ b). Returns (y [..., N], cache)."""
    y = matmul(x, w.T)  # [..., N]
    if b is not None:
        y = y + b
    return y, (x, w, b is not None)


def linear_backward(dy, cache):
    """Gradients (dx [..., K], dw [N, K], db [N] or None) of `linear_forward`."""
    x, w, has_bias = cache
    dx = matmul(dy, w)  # [..., K]
    dw = contract_leading(dy, x)  # [N, K]
    db = sum_except(dy, -1) if has_bias else None  # [N]
    return dx, dw, db


def token_linear_forward(x, w, b=None):
    """Y = W @ X + b[:, None] over the token axis (-2). Returns (y [..., M, E], cache)."""
    y, cache = linear_forward(x.swapaxes(-1, -2), w, b)  # [..., E, M]
    return y.swapaxes(-1, -2), cache


def token_linear_backward(dy, cache):
    """Gradients (dx [..., T, E], dw [M, T], db [M] or None) of `token_linear_forward`."""
    dxt, dw, db = linear_backward(dy.swapaxes(-1, -2), cache)
    return dxt.swapaxes(-1, -2), dw, db
