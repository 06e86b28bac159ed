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

from weathermixer.autograd.linear import sum_except
from weathermixer.autograd.xp import elementwise_kernel, get_array_module, is_device_array

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
    d = u - mean
    var = allreduce(_sum_along(d * d, axis)) / n  # reduction S2
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


def _normalise(d, rstd, scale, bias):
    """(xhat, out) = (d rstd, xhat scale + bias): one fused pass on GPUs."""
    if is_device_array(d):
        return elementwise_kernel("wm_ln_fwd", "T d, T rstd, T scale, T bias", "T xhat, T out",
                                  "xhat = d * rstd; out = xhat * scale + bias;")(d, rstd, scale, bias)
    xhat = d * rstd
    return xhat, xhat * scale + bias


def _input_gradient(g, xhat, rstd, r1, r2, n):
    """du = rstd (g - R1 / n - xhat R2 / n): one fused pass on GPUs."""
    if is_device_array(g):
        return elementwise_kernel(
            "wm_ln_bwd", "T g, T xhat, T rstd, T r1, T r2, T n", "T du",
            "du = rstd * (g - r1 / n - xhat * (r2 / n));")(g, xhat, rstd, r1, r2, g.dtype.type(n))
    return rstd * (g - r1 / n - xhat * (r2 / n))


def layernorm_backward(dout, cache):
    """Gradients (du, dscale, dbias). dscale and dbias are sums over this rank's rows only."""
    xhat, rstd, scale, axis, n, allreduce = cache
    xp = get_array_module(dout)
    dout = xp.ascontiguousarray(dout)  # one copy of a transposed view, then unit-stride passes
    g = dout * _along(scale, dout.ndim, axis)
    r = xp.stack([_sum_along(g, axis),  # reduction R1
                  _sum_along(g * xhat, axis)])  # reduction R2; [2, .., 1, ..]
    r1, r2 = allreduce(r)
    du = _input_gradient(g, xhat, rstd, r1, r2, n)
    dscale = sum_except(dout * xhat, axis)  # [C]
    dbias = sum_except(dout, axis)  # [C]
    return du, dscale, dbias
