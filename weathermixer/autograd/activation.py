"""GELU, tanh form (SPEC.md): GELU(u) = 0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3)))."""
from __future__ import annotations

import math

from weathermixer.autograd.xp import get_array_module

_C = math.sqrt(2.0 / math.pi)
_A = 0.044715


def _tanh_term(u):
    """t = tanh(sqrt(2/pi) (u + 0.044715 u^3)), same shape as u."""
    return get_array_module(u).tanh(_C * (u + _A * u * u * u))


def gelu_forward(u):
    """Returns (GELU(u), cache). Caches only the input: tanh is recomputed in backward."""
    return 0.5 * u * (1.0 + _tanh_term(u)), u


def gelu_backward(dy, u):
    """dy * GELU'(u), with GELU'(u) = 0.5 (1 + t) + 0.5 u (1 - t^2) sqrt(2/pi) (1 + 3a u^2)."""
    t = _tanh_term(u)
    dt = (1.0 - t * t) * _C * (1.0 + 3.0 * _A * u * u)
    return dy * (0.5 * (1.0 + t) + 0.5 * u * dt)
