"""GELU, tanh form (SPEC.md): GELU(u) = 0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3))).

    t        = tanh(sqrt(2/pi) (u + a u^3)),   a = 0.044715
    GELU(u)  = 0.5 u (1 + t)
    GELU'(u) = 0.5 (1 + t) + 0.5 u (1 - t^2) sqrt(2/pi) (1 + 3 a u^2)

On GPUs each direction is one fused kernel (one read, one write); on CPUs the same formula in
numpy. Only the input is cached: t is recomputed in backward.
"""
from __future__ import annotations

import math

from weathermixer.autograd.xp import elementwise_kernel, get_array_module, is_device_array

_C = math.sqrt(2.0 / math.pi)
_A = 0.044715

_FORWARD = f"T t = tanh(T({_C!r}) * (u + T({_A!r}) * u * u * u)); y = T(0.5) * u * (T(1) + t);"
_BACKWARD = (f"T t = tanh(T({_C!r}) * (u + T({_A!r}) * u * u * u)); "
             f"du = dy * (T(0.5) * (T(1) + t) + T(0.5) * u * (T(1) - t * t) * T({_C!r}) "
             f"* (T(1) + T({3 * _A!r}) * u * u));")


def gelu_forward(u):
    """Returns (GELU(u), cache = u)."""
    if is_device_array(u):
        return elementwise_kernel("wm_gelu_fwd", "T u", "T y", _FORWARD)(u), u
    t = get_array_module(u).tanh(_C * (u + _A * u * u * u))
    return 0.5 * u * (1.0 + t), u


def gelu_backward(dy, u):
    """dy * GELU'(u)."""
    if is_device_array(u):
        return elementwise_kernel("wm_gelu_bwd", "T dy, T u", "T du", _BACKWARD)(dy, u)
    t = get_array_module(u).tanh(_C * (u + _A * u * u * u))
    dt = (1.0 - t * t) * _C * (1.0 + 3.0 * _A * u * u)
    return dy * (0.5 * (1.0 + t) + 0.5 * u * dt)
