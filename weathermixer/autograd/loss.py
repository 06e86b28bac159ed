"""The weighted mean-squared error of SPEC.md.

    L = sum_{b,v,h,w} lat_w[h] var_w[v] (y - target)^2 / normaliser,   normaliser = B P H W

`weighted_sse_forward` returns the *local* sum divided by the global normaliser, so the
partial losses of the ranks of a model group (and of the replicas) add up to L. dL/dy is local.
"""
from __future__ import annotations


def _weights(lat_w, var_w, ndim: int):
    """lat_w [H] and var_w [P] shaped to broadcast over y [B, P, H, W]."""
    return var_w.reshape(1, -1, 1, 1) * lat_w.reshape(1, 1, -1, 1)


def weighted_sse_forward(y, target, lat_w, var_w, normaliser: float):
    """Returns (partial loss, cache): this rank's share of L."""
    r = y - target  # [B, P, H, W]
    w = _weights(lat_w, var_w, y.ndim)
    return (w * r * r).sum() / normaliser, (r, w, normaliser)


def weighted_sse_backward(dloss, cache):
    """dL/dy = 2 w (y - target) / normaliser * dloss."""
    r, w, normaliser = cache
    return (2.0 * dloss / normaliser) * w * r
