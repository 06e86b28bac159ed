"""Reshaping primitives: patchify / unpatchify, concat / split, residual add.

    patchify:   x [B, V, H, W] -> X [B, T, V*pl*pw],  T = (H/pl)(W/pw)
                X[b, a*(W/pw) + c, (v*pl + i)*pw + j] = x[b, v, a*pl + i, c*pw + j]
    unpatchify: the inverse permutation.

Patchify and unpatchify are permutations, so each one's backward is the other. `H` may be a band of rows (a
rank's domain part): the token index is row-major within whatever rows are passed.
"""
from __future__ import annotations

from weathermixer.autograd.linear import is_transposed
from weathermixer.autograd.xp import (elementwise_kernel, from_transposed, get_array_module,
                                      is_device_array)


def patchify(x, pl: int, pw: int):
    """x [B, V, H, W] -> [B, (H/pl)*(W/pw), V*pl*pw]."""
    B, V, H, W = x.shape
    x6 = x.reshape(B, V, H // pl, pl, W // pw, pw)  # [B, V, a, i, c, j]
    return x6.transpose(0, 2, 4, 1, 3, 5).reshape(B, (H // pl) * (W // pw), V * pl * pw)


def unpatchify(X, pl: int, pw: int, H: int, W: int):
    """[B, (H/pl)*(W/pw), V*pl*pw] -> x [B, V, H, W]."""
    B, T, K = X.shape
    V = K // (pl * pw)
    x6 = X.reshape(B, H // pl, W // pw, V, pl, pw)  # [B, a, c, v, i, j]
    return x6.transpose(0, 3, 1, 4, 2, 5).reshape(B, V, H, W)


# backward passes of the two permutations
def patchify_backward(dX, pl: int, pw: int, H: int, W: int):
    return unpatchify(dX, pl, pw, H, W)


def unpatchify_backward(dx, pl: int, pw: int):
    return patchify(dx, pl, pw)


def concat_forward(a, b, axis: int):
    """[.., Ca, ..] and [.., Cb, ..] -> [.., Ca + Cb, ..] (a first). Returns (out, cache)."""
    xp = get_array_module(a)
    return xp.concatenate([a, b], axis=axis), (a.shape[axis], axis)


def concat_backward(dout, cache):
    """(da, db): the split of dout at the seam."""
    na, axis = cache
    return split(dout, na, axis)


def split(x, first: int, axis: int):
    """x -> (x[.., :first, ..], x[.., first:, ..]) along `axis` (views)."""
    ix = [slice(None)] * x.ndim
    ix[axis] = slice(0, first)
    a = x[tuple(ix)]
    ix[axis] = slice(first, None)
    return a, x[tuple(ix)]


def residual_forward(z, branch, bias=None):
    """z + branch (+ bias): the residual stream (branch = f(z) computed by the caller, `bias`
    the last linear layer's, added in the same pass on GPUs). A branch that is the transposed
    view of a C-contiguous array (token mixing's output [B, E, T] seen as [B, T, E]) is read
    through shared-memory tiles on GPUs (`xp.from_transposed`)."""
    if bias is None:
        return z + branch
    if is_device_array(z):
        if z.flags.c_contiguous and z.ndim >= 2 and is_transposed(branch) and bias.ndim <= 2:
            return from_transposed(branch, z, bias)
        return elementwise_kernel("wm_residual_bias", "T z, T f, T b", "T y",
                                  "y = z + f + b")(z, branch, bias)
    y = z + branch
    y += bias
    return y


def residual_backward(dout):
    """(dz, dbranch) = (dout, dout). z also feeds the branch, so the caller adds the gradient
    that comes back through the branch to dz: a fan-out, summed explicitly."""
    return dout, dout
