"""Finite-difference checks of hand-written backward passes, in float64 only.

Three checks, from the cheapest per element to the cheapest per tensor (HIPS/autograd's
`check_vjp`, chainer's `check_backward`):

    central_difference   g_i ~ (f(x + eps e_i) - f(x - eps e_i)) / 2 eps      every element
    directional_check    (f(x + eps u) - f(x - eps u)) / 2 eps  vs  <grad, u>  random u
    vjp_check            <v, (F(x + eps u) - F(x - eps u)) / 2 eps>  vs  <J^T v, u>

`weathermixer.mixer.gradcheck.check_model` applies the last two to the whole model.

Error measure. err = |num - ana| / max(|num|, |ana|, floor). The central difference resolves
f only to about eps_mach |f| / eps (~1e-10 |f| at eps = 1e-6), so a directional derivative
smaller than `floor` = 1e-3 max(1, |f|) is judged by its absolute error, to tol * floor. This
matters for gradients that are exactly zero in exact arithmetic, e.g. `token_mixing/fc2/bias`
in SPEC's model: it adds a constant along E, and every consumer of the residual stream is a
LayerNorm over E, so the loss does not depend on it (backprop gives ~1e-17, the difference 0).

Directions. u has independent N(0, 1) entries ("unit-ish" per element, not unit norm): the
signal <grad, u> then grows like |grad| sqrt(n) while the rounding noise does not.
v (the upstream gradient of `vjp_check`) is random too: all-ones hides transposition bugs.

Only float64: in float32 eps_mach / eps is ~0.1 and no tolerance is meaningful.
"""
from __future__ import annotations

import math
import typing

import numpy as np

from weathermixer.autograd.xp import get_array_module, to_module

FLOOR = 1e-3  # relative to max(1, |f|): see the module docstring


class Row(typing.NamedTuple):
    """One line of a model gradient check: a parameter or a layer, its worst relative error
    over all checks, and its number of parameters."""
    name: str
    error: float
    size: int


def require_float64(*arrays):
    for a in arrays:
        if a.dtype != np.float64:
            raise ValueError(f"gradient checks need float64 arrays, got {a.dtype} "
                             f"(float32 finite differences are noise at eps ~ 1e-6)")


def relative_error(num: float, ana: float, floor: float) -> float:
    """|num - ana| / max(|num|, |ana|, floor); NaN stays NaN (and so fails any tolerance)."""
    return abs(num - ana) / max(abs(num), abs(ana), floor)


def worst(a: float, b: float) -> float:
    """max(a, b), except that a NaN wins (so a NaN error is never hidden by a max)."""
    return a if math.isnan(a) else b if math.isnan(b) else max(a, b)


def noise_floor(f_plus: float, f_minus: float) -> float:
    return FLOOR * max(1.0, 0.5 * (abs(f_plus) + abs(f_minus)))


def random_direction(rng: np.random.Generator, like):
    """u with N(0, 1) entries, shaped and placed (numpy or CuPy) like `like`."""
    u = rng.standard_normal(like.shape)  # drawn on the host: the same u for numpy and CuPy
    return to_module(u, get_array_module(like))


def inner(a, b) -> float:
    """<a, b> as a Python float (a host transfer for CuPy arrays)."""
    return float(get_array_module(a).vdot(a.ravel(), b.ravel()))


# ---- scalar functions ----------------------------------------------------------------------
def central_difference(f, x, eps: float = 1e-6):
    """The numerical gradient of the scalar f at x, element by element (2 x.size calls of f).

    f is called with one array that is modified in place between calls (and restored at the
    end, x itself is never touched); it must not keep a reference to it. For tiny shapes."""
    require_float64(x)
    xp = get_array_module(x)
    xc = x.copy()  # [x.shape], perturbed one element at a time
    flat = xc.reshape(-1)  # a view of xc
    grad = xp.zeros(x.size, dtype=xp.float64)  # [x.size]
    for i in range(x.size):
        orig = float(flat[i])
        flat[i] = orig + eps
        f_plus = float(f(xc))
        flat[i] = orig - eps
        f_minus = float(f(xc))
        flat[i] = orig
        grad[i] = (f_plus - f_minus) / (2.0 * eps)
    return grad.reshape(x.shape)


def directional_check(f, x, grad, rng: np.random.Generator, eps: float = 1e-6,
                      floor: float | None = None) -> float:
    """Relative error of <grad, u> against the central difference of f along a random u.

    Two calls of f whatever the size of x. `floor` (default 1e-3 max(1, |f|)) is the
    smallest denominator of the relative error (see the module docstring)."""
    require_float64(x, grad)
    if grad.shape != x.shape:
        raise ValueError(f"gradient shape {grad.shape} differs from x shape {x.shape}")
    u = random_direction(rng, x)  # [x.shape]
    f_plus, f_minus = float(f(x + eps * u)), float(f(x - eps * u))
    num = (f_plus - f_minus) / (2.0 * eps)
    ana = inner(grad, u)
    return relative_error(num, ana, noise_floor(f_plus, f_minus) if floor is None else floor)


def elementwise_check(f, x, grad, indices, eps: float = 1e-6,
                      floor: float | None = None) -> float:
    """Worst relative error of grad at the flat `indices` against central differences of f."""
    require_float64(x, grad)
    err = 0.0
    for i in indices:
        e = get_array_module(x).zeros(x.size, dtype=x.dtype)  # [x.size]
        e[int(i)] = eps
        e = e.reshape(x.shape)
        f_plus, f_minus = float(f(x + e)), float(f(x - e))
        num = (f_plus - f_minus) / (2.0 * eps)
        ana = float(grad.reshape(-1)[int(i)])
        err = worst(err, relative_error(num, ana,
                                        noise_floor(f_plus, f_minus) if floor is None else floor))
    return err


# ---- vector-Jacobian products of primitives --------------------------------------------------
def _as_tuple(a):
    return tuple(a) if isinstance(a, (tuple, list)) else (a,)


def vjp_check(forward, backward, inputs, rng: np.random.Generator, eps: float = 1e-6,
              floor: float | None = None) -> list:
    """Per-input relative errors of <J^T v, u_i> against <v, (F(x + eps u_i) - F(x - eps u_i)) / 2 eps>.

    The layer pattern of STYLE.md: `forward(*inputs)` returns (y, cache), y an array or a
    tuple of arrays; `backward(v, cache)` returns one gradient per input, in input order (a
    bare array when there is one input). v (shaped like y) and each u_i are random normal.
    Inputs that are not differentiated (sizes, axes, a fixed target) belong in the closures.
    `floor` defaults to 1e-3 max(1, |<v, y>|)."""
    inputs = list(inputs)
    require_float64(*inputs)
    y, cache = forward(*inputs)
    ys = _as_tuple(y)
    require_float64(*ys)
    vs = tuple(random_direction(rng, yi) for yi in ys)  # random upstream gradient, like y
    grads = _as_tuple(backward(vs if isinstance(y, tuple) else vs[0], cache))
    if len(grads) != len(inputs):
        raise ValueError(f"backward returned {len(grads)} gradients for {len(inputs)} inputs")
    scale = max(1.0, abs(sum(inner(v, yi) for v, yi in zip(vs, ys))))
    errors = []
    for i, (x, g) in enumerate(zip(inputs, grads)):
        if g is None or g.shape != x.shape:
            raise ValueError(f"gradient {i} has shape {None if g is None else g.shape}, "
                             f"expected {x.shape}")
        u = random_direction(rng, x)
        plus, minus = list(inputs), list(inputs)
        plus[i], minus[i] = x + eps * u, x - eps * u
        y_plus, y_minus = _as_tuple(forward(*plus)[0]), _as_tuple(forward(*minus)[0])
        num = sum(inner(v, yp - ym) for v, yp, ym in zip(vs, y_plus, y_minus)) / (2.0 * eps)
        errors.append(relative_error(num, inner(g, u), FLOOR * scale if floor is None else floor))
    return errors
