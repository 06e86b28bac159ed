"""GELU, tanh form (SPEC.md): GELU(u) = 0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3))).

    t        = tanh(sqrt(2/pi) (u + a u^3)),   a = 0.044715
    GELU(u)  = 0.5 u (1 + t)
    GELU'(u) = 0.5 (1 + t) + 0.5 u (1 - t^2) sqrt(2/pi) (1 + 3 a u^2)

Forward computes GELU'(u) beside GELU(u) and caches it instead of u (the same memory), so
tanh is evaluated once and backward is one multiply. On GPUs forward is one fused kernel; on
CPUs the same formula in numpy, in place, on L2-sized chunks spread over the host's threads.
"""
from __future__ import annotations

import math

import numpy as np

from weathermixer.autograd.xp import elementwise_kernel, is_device_array, parallel_ranges

_C = math.sqrt(2.0 / math.pi)
_A = 0.044715

_FORWARD = (f"T t = tanh(T({_C!r}) * (u + T({_A!r}) * u * u * u)); "
            f"y = T(0.5) * u * (T(1) + t); "
            f"d = T(0.5) * (T(1) + t) + T(0.5) * u * (T(1) - t * t) * T({_C!r}) "
            f"* (T(1) + T({3 * _A!r}) * u * u);")


def gelu_forward(u, bias=None):
    """Returns (GELU(u + bias), cache = GELU'(u + bias)); `bias` broadcasts along the last axis
    (a linear layer's bias, added in the same pass on GPUs)."""
    if is_device_array(u):
        if bias is None:
            return elementwise_kernel("wm_gelu", "T u", "T y, T d", _FORWARD)(u)
        return elementwise_kernel("wm_bias_gelu", "T x, T b", "T y, T d",
                                  "T u = x + b; " + _FORWARD)(u, bias)
    u = np.ascontiguousarray(u) if bias is None else u + bias
    flat = u.reshape(-1)
    y, d = np.empty_like(flat), np.empty_like(flat)
    parallel_ranges(flat.size, lambda lo, hi: _gelu_host(flat[lo:hi], y[lo:hi], d[lo:hi]))
    return y.reshape(u.shape), d.reshape(u.shape)


def _gelu_host(u, y, d):
    """y = GELU(u), d = GELU'(u) for one chunk, in place in y and d plus one temporary, with the
    constants folded: z = u (C + A C u^2), q = 0.5 (1 + t), GELU = q u,
    GELU' = q + u (1 - t^2) (0.5 C + 1.5 A C u^2)."""
    u2 = u * u
    np.multiply(u2, _A * _C, out=y)
    y += _C
    y *= u  # z = C (u + a u^3)
    t = np.tanh(y, out=y)  # t, held in y
    np.multiply(t, t, out=d)
    np.subtract(1.0, d, out=d)
    d *= u
    u2 *= 1.5 * _A * _C
    u2 += 0.5 * _C
    d *= u2  # 0.5 u (1 - t^2) C (1 + 3 a u^2)
    t *= 0.5
    t += 0.5  # q = 0.5 (1 + t)
    d += t  # GELU'(u)
    t *= u  # GELU(u) = q u, in y


def gelu_backward(dy, dgelu):
    """dy * GELU'(u), with GELU'(u) cached by forward."""
    return dy * dgelu
