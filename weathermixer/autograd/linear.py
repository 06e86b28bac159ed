"""The two linear forms of the mixer, with hand-written backward passes.

    channel form:  Y = X @ W.T + b        X [..., K], W [N, K], b [N]  -> Y [..., N]
    token form:    Y = W @ X + b[:, None] X [..., T, E], W [M, T], b [M] -> Y [..., M, E]

The token form is the channel form on the transposed view of X (no copy), so both share one
backward. Leading axes (the batch) are summed in dW and db.
"""
from __future__ import annotations


def linear_forward(x, w, b=None):
    """Y = X @ W.T (+ b). Returns (y [..., N], cache)."""
    y = x @ w.T  # [..., N]
    if b is not None:
        y = y + b
    return y, (x, w, b is not None)


def linear_backward(dy, cache):
    """Gradients (dx [..., K], dw [N, K], db [N] or None) of `linear_forward`."""
    x, w, has_bias = cache
    lead = tuple(range(dy.ndim - 1))
    dx = dy @ w  # [..., K]
    dw = _contract_leading(dy, x, lead)  # [N, K]
    db = dy.sum(axis=lead) if has_bias else None  # [N]
    return dx, dw, db


def _contract_leading(a, b, lead):
    """sum over the leading axes of a[..., n] b[..., k] -> [n, k]."""
    if not lead:
        return a[:, None] * b[None, :]
    a2 = a.reshape(-1, a.shape[-1])  # [rows, N]
    b2 = b.reshape(-1, b.shape[-1])  # [rows, K]
    return a2.T @ b2


def token_linear_forward(x, w, b=None):
    """Y = W @ X + b[:, None] over the token axis (-2). Returns (y [..., M, E], cache)."""
    y, cache = linear_forward(x.swapaxes(-1, -2), w, b)  # [..., E, M]
    return y.swapaxes(-1, -2), cache


def token_linear_backward(dy, cache):
    """Gradients (dx [..., T, E], dw [M, T], db [M] or None) of `token_linear_forward`."""
    dxt, dw, db = linear_backward(dy.swapaxes(-1, -2), cache)
    return dxt.swapaxes(-1, -2), dw, db
