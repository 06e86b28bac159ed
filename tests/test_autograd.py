"""Gradient checks of every serial primitive in `weathermixer.autograd`, in float64.

Each primitive is a `Case`: inputs drawn at tiny odd shapes, `forward(*inputs) -> (y, cache)`
and `backward(v, cache) -> one gradient per input` (the layer pattern of STYLE.md). For each
case and array module (numpy, and CuPy where a GPU is present):

- elementwise central differences of <v, F(x)> against backward(v), v random;
- the dot-product check <v, (F(x + eps u) - F(x - eps u)) / 2 eps> = <J^T v, u>, random u, v;
- backward twice is bitwise identical; neither the inputs nor v are mutated;
- a zero upstream gradient gives zero gradients.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from weathermixer.autograd import gradcheck as gc
from weathermixer.autograd.activation import gelu_backward, gelu_forward
from weathermixer.autograd.layernorm import layernorm_backward, layernorm_forward
from weathermixer.autograd.linear import (linear_backward, linear_forward, token_linear_backward,
                                          token_linear_forward)
from weathermixer.autograd.loss import weighted_sse_backward, weighted_sse_forward
from weathermixer.autograd.shape import (concat_backward, concat_forward, patchify,
                                         patchify_backward, residual_backward, residual_forward,
                                         split, unpatchify, unpatchify_backward)
from weathermixer.autograd.xp import cupy_available, module, to_host

TOL = 1e-6
XPS = ["numpy"] + (["cupy"] if cupy_available() else [])

# tiny odd sizes; patches of 2 x 3 on a 6 x 9 grid: T = 3 * 3 = 9 tokens
B, V, H, W, PL, PW = 2, 3, 6, 9, 2, 3
T, K = (H // PL) * (W // PW), V * PL * PW


@dataclasses.dataclass
class Case:
    name: str
    shapes: tuple  # input shapes
    forward: object  # (*inputs) -> (y, cache)
    backward: object  # (v, cache) -> tuple of gradients, one per input
    positive: tuple = ()  # indices of inputs drawn positive (weights)


def _no_cache(fn):
    return lambda *a: (fn(*a), None)


CASES = [
    Case("linear", ((B, 5, 7), (3, 7), (3,)), linear_forward,
         lambda v, c: linear_backward(v, c)),
    Case("linear_no_bias", ((B, 5, 7), (3, 7)), linear_forward,
         lambda v, c: linear_backward(v, c)[:2]),
    Case("linear_2d", ((5, 7), (3, 7), (3,)), linear_forward,
         lambda v, c: linear_backward(v, c)),
    Case("token_linear", ((B, 5, 7), (3, 5), (3,)), token_linear_forward,
         lambda v, c: token_linear_backward(v, c)),
    Case("gelu", ((B, 5, 7),), gelu_forward, lambda v, c: (gelu_backward(v, c),)),
    Case("layernorm_last", ((B, 5, 7), (7,), (7,)),
         lambda u, s, b: layernorm_forward(u, s, b, axis=-1), layernorm_backward),
    Case("layernorm_axis1", ((B, 5, 3, 7), (5,), (5,)),
         lambda u, s, b: layernorm_forward(u, s, b, axis=1), layernorm_backward),
    Case("patchify", ((B, V, H, W),), _no_cache(lambda x: patchify(x, PL, PW)),
         lambda v, c: (patchify_backward(v, PL, PW, H, W),)),
    Case("unpatchify", ((B, T, K),), _no_cache(lambda X: unpatchify(X, PL, PW, H, W)),
         lambda v, c: (unpatchify_backward(v, PL, PW),)),
    Case("concat_last", ((B, 5, 3), (B, 5, 4)), lambda a, b: concat_forward(a, b, -1),
         concat_backward),
    Case("concat_axis1", ((B, 3, 5, 7), (B, 2, 5, 7)), lambda a, b: concat_forward(a, b, 1),
         concat_backward),
    # split's backward is the concat of the two upstream gradients
    Case("split", ((B, 5, 7),), _no_cache(lambda x: split(x, 2, 1)),
         lambda v, c: (concat_forward(v[0], v[1], 1)[0],)),
    Case("residual", ((B, 5, 7), (B, 5, 7)), _no_cache(residual_forward),
         lambda v, c: residual_backward(v)),
    Case("weighted_sse", ((B, V, H, W), (B, V, H, W), (H,), (V,)),
         lambda y, t, lw, vw: weighted_sse_forward(y, t, lw, vw, 7.0),
         lambda v, c: (weighted_sse_backward(v, c),), positive=(2, 3)),
]
# cases whose backward differentiates only the first n inputs (the loss: y, not the data)
_SSE_ARGS = {"weighted_sse": 1}


def _inputs(case, xp, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i, shape in enumerate(case.shapes):
        a = rng.uniform(0.5, 1.5, shape) if i in case.positive else rng.standard_normal(shape)
        out.append(xp.asarray(a, dtype=xp.float64))
    return out


def _split_inputs(case, inputs):
    """(differentiated inputs, forward over them): weighted_sse closes over its data."""
    n = _SSE_ARGS.get(case.name)
    if n is None:
        return inputs, case.forward
    fixed = inputs[n:]
    return inputs[:n], lambda *a: case.forward(*a, *fixed)


def _as_tuple(a):
    return a if isinstance(a, tuple) else (a,)


@pytest.fixture(params=XPS)
def xp(request):
    return module(request.param)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_elementwise_central_difference(case, xp):
    inputs, forward = _split_inputs(case, _inputs(case, xp))
    rng = np.random.default_rng(1)
    y, cache = forward(*inputs)
    vs = tuple(xp.asarray(rng.standard_normal(yi.shape)) for yi in _as_tuple(y))
    v = vs if isinstance(y, tuple) else vs[0]
    grads = case.backward(v, cache)
    assert len(grads) == len(inputs)
    for i, (x, g) in enumerate(zip(inputs, grads)):
        def f(xi, i=i):
            args = list(inputs)
            args[i] = xi
            yy = _as_tuple(forward(*args)[0])
            return sum(float(xp.vdot(a.ravel(), b.ravel())) for a, b in zip(vs, yy))
        num = gc.central_difference(f, x)
        assert g.shape == x.shape
        err = float(xp.abs(num - g).max()) / max(1.0, float(xp.abs(num).max()))
        assert err < TOL, f"{case.name}: input {i}: max error {err:.2e}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_vjp_dot_product(case, xp):
    inputs, forward = _split_inputs(case, _inputs(case, xp, seed=2))
    for seed in range(3):  # several random (u, v) pairs
        errors = gc.vjp_check(forward, case.backward, inputs, np.random.default_rng(seed))
        assert max(errors) < TOL, f"{case.name}: errors {errors}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_backward_deterministic_pure_and_linear_in_v(case, xp):
    inputs = _inputs(case, xp, seed=3)
    before = [to_host(a).copy() for a in inputs]
    y, cache = case.forward(*inputs)
    rng = np.random.default_rng(4)
    vs = tuple(xp.asarray(rng.standard_normal(yi.shape)) for yi in _as_tuple(y))
    v = vs if isinstance(y, tuple) else vs[0]
    v_before = [to_host(a).copy() for a in vs]
    g1 = [to_host(g).copy() for g in case.backward(v, cache)]
    g2 = [to_host(g).copy() for g in case.backward(v, cache)]
    for a, b in zip(g1, g2):
        assert np.array_equal(a, b), f"{case.name}: a second backward differs"
    for a, b in zip(inputs, before):
        assert np.array_equal(to_host(a), b), f"{case.name}: an input was mutated"
    for a, b in zip(vs, v_before):
        assert np.array_equal(to_host(a), b), f"{case.name}: the upstream gradient was mutated"
    zeros = tuple(xp.zeros_like(a) for a in vs)
    for g in case.backward(zeros if isinstance(y, tuple) else zeros[0], cache):
        assert not np.any(to_host(g)), f"{case.name}: zero upstream gradient, nonzero gradient"


# ---- orderings and exact values --------------------------------------------------------------
def test_patchify_ordering_matches_spec(xp):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((B, V, H, W))
    X = to_host(patchify(xp.asarray(x), PL, PW))
    assert X.shape == (B, T, K)
    cols = W // PW
    for a in range(H // PL):
        for b in range(cols):
            for v in range(V):
                for i in range(PL):
                    for j in range(PW):
                        assert X[1, a * cols + b, (v * PL + i) * PW + j] == x[1, v, a * PL + i, b * PW + j]
    assert np.array_equal(to_host(unpatchify(xp.asarray(X), PL, PW, H, W)), x)


def test_token_linear_is_w_at_x(xp):
    rng = np.random.default_rng(6)
    x, w, b = rng.standard_normal((B, 5, 7)), rng.standard_normal((3, 5)), rng.standard_normal(3)
    y, _ = token_linear_forward(xp.asarray(x), xp.asarray(w), xp.asarray(b))
    np.testing.assert_allclose(to_host(y), w @ x + b[:, None], rtol=1e-13, atol=1e-13)


def test_layernorm_values(xp):
    rng = np.random.default_rng(7)
    u, s, b = rng.standard_normal((B, 5, 3, 7)), rng.standard_normal(5), rng.standard_normal(5)
    y, _ = layernorm_forward(xp.asarray(u), xp.asarray(s), xp.asarray(b), axis=1)
    m, var = u.mean(1, keepdims=True), u.var(1, keepdims=True)
    want = (u - m) / np.sqrt(var + 1e-5) * s[:, None, None] + b[:, None, None]
    np.testing.assert_allclose(to_host(y), want, rtol=1e-12, atol=1e-12)


def test_layernorm_backward_sums_agree_between_host_and_device_forms():
    """The device form of the last-axis backward sums (matrix-vector products) equals the host
    form (row chunks), both on host arrays here: odd sizes, more rows than one chunk."""
    from weathermixer.autograd.layernorm import _backward_sums_gemv, _backward_sums_rows
    rng = np.random.default_rng(11)
    dout, xhat = rng.standard_normal((3, 4099, 37)), rng.standard_normal((3, 4099, 37))
    scale = rng.standard_normal(37)
    for a, b in zip(_backward_sums_gemv(dout, xhat, scale, 2),
                    _backward_sums_rows(dout, xhat, scale)):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11)


def test_gelu_values(xp):
    u = np.linspace(-4, 4, 17)
    y, _ = gelu_forward(xp.asarray(u))
    want = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))
    np.testing.assert_allclose(to_host(y), want, rtol=1e-14, atol=1e-15)


def test_weighted_sse_value(xp):
    rng = np.random.default_rng(8)
    y, t = rng.standard_normal((B, V, H, W)), rng.standard_normal((B, V, H, W))
    lw, vw = rng.uniform(0.5, 1.5, H), rng.uniform(0.5, 1.5, V)
    loss, _ = weighted_sse_forward(*(xp.asarray(a) for a in (y, t, lw, vw)), 7.0)
    want = sum(lw[h] * vw[v] * ((y[:, v, h] - t[:, v, h]) ** 2).sum()
               for v in range(V) for h in range(H)) / 7.0
    assert abs(float(loss) - want) <= 1e-13 * abs(want)


# ---- the checker itself ------------------------------------------------------------------
def test_checks_reject_float32():
    x = np.ones(3, dtype=np.float32)
    with pytest.raises(ValueError, match="float64"):
        gc.central_difference(lambda a: float(a.sum()), x)
    with pytest.raises(ValueError, match="float64"):
        gc.directional_check(lambda a: float(a.sum()), x, x, np.random.default_rng(0))
    with pytest.raises(ValueError, match="float64"):
        gc.vjp_check(gelu_forward, lambda v, c: (gelu_backward(v, c),), [x],
                     np.random.default_rng(0))


def test_checks_catch_a_transposed_backward():
    """A backward that is right for all-ones v but transposes dW must fail."""
    def bad_backward(v, cache):
        dx, dw, db = linear_backward(v, cache)
        return dx, dw[::-1], db  # rows of dW swapped
    rng = np.random.default_rng(9)
    inputs = [rng.standard_normal(s) for s in ((4, 5), (3, 5), (3,))]
    errors = gc.vjp_check(linear_forward, bad_backward, inputs, rng)
    assert errors[1] > 1e-3 and errors[0] < TOL and errors[2] < TOL


def test_directional_check_and_central_difference_on_a_known_function():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((3, 5))

    def f(a):
        return float(np.sum(np.sin(a) * a))
    grad = np.cos(x) * x + np.sin(x)
    np.testing.assert_allclose(gc.central_difference(f, x), grad, rtol=1e-8, atol=1e-9)
    assert gc.directional_check(f, x, grad, rng) < TOL
    assert gc.directional_check(f, x, grad * 1.001, rng) > 1e-4
    # an exactly zero gradient passes through the floor instead of dividing 0 by 0
    assert gc.directional_check(lambda a: 1.0, x, np.zeros_like(x), rng) == 0.0


def test_matmul_accumulate_adds_the_product_into_out():
    """`linear.matmul(a, b, out, accumulate=True)` is out += a @ b for C-contiguous outputs,
    transposed views (the token-mixing layout) and a leading batch; the rest of the array
    that `out` views is untouched."""
    from weathermixer.autograd.linear import matmul
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((2, 7, 5)), rng.standard_normal((5, 3))
    for transposed in (False, True):
        base = rng.standard_normal((2, 3, 7) if transposed else (2, 7, 3))
        out = base.copy()
        view = out.swapaxes(-1, -2) if transposed else out  # [2, 7, 3]
        want = (base.swapaxes(-1, -2) if transposed else base) + a @ b
        assert matmul(a, b, out=view, accumulate=True) is view
        assert np.abs(view - want).max() < 1e-12


def test_row_pitch_says_where_rows_are_evenly_spaced():
    """`layernorm_fused.row_pitch`, which lets the fused LayerNorm backward read a strided
    gradient in place: C-contiguous arrays, slices of columns, every other row and single
    rows are evenly spaced; a cut through each batch's rows, a transposed view and reversed
    columns are not."""
    from weathermixer.autograd.layernorm_fused import row_pitch
    a = np.zeros((3, 82, 50))
    assert row_pitch(a) == 50
    assert row_pitch(a[..., 5:42]) == 50
    assert row_pitch(a[:, ::2]) == 100
    assert row_pitch(a[:1, :1, 3:9]) == 6
    assert row_pitch(a[:, :41]) is None
    assert row_pitch(a.swapaxes(-1, -2)) is None
    assert row_pitch(a[..., ::-1]) is None


@pytest.mark.parametrize("threads", [1, 2])
def test_parallel_ranges_covers_every_index_once_in_grain_sized_chunks(threads):
    """`xp.parallel_ranges` hands out [0, n) in chunks of `grain` (the last shorter), on one
    thread as on several: the host LayerNorm's row chunks rely on it for cache locality."""
    from weathermixer.autograd.xp import parallel_ranges
    seen = []
    parallel_ranges(10, lambda lo, hi: seen.append((lo, hi)), grain=3, threads=threads)
    assert sorted(seen) == [(0, 3), (3, 6), (6, 9), (9, 10)]


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-13), (np.float32, 2e-6)])
def test_host_layernorm_in_one_visit_per_chunk_equals_the_pass_by_pass_form(dtype, tol):
    """A host LN over a whole last axis takes each row chunk through every step at once
    (`_forward_whole_rows`, `_backward_whole_rows`); an allreduce hook (the identity, as one
    rank of a cut axis) forces the pass-by-pass form, whose sums wait for the hook. Both give
    out, du, dscale and dbias alike, with and without `plus`, over more rows than one chunk
    (4000 rows of 37: GRAIN // 37 = 3542 rows a chunk)."""
    from weathermixer.autograd.layernorm import layernorm_backward, layernorm_forward
    rng = np.random.default_rng(15)
    u, dout, plus = (rng.standard_normal((4, 1000, 37)).astype(dtype) * 2 + 1 for _ in range(3))
    scale, bias = rng.standard_normal(37).astype(dtype), rng.standard_normal(37).astype(dtype)
    out, cache = layernorm_forward(u, scale, bias, -1)
    want_out, want_cache = layernorm_forward(u, scale, bias, -1, allreduce=lambda r: r)
    assert np.abs(out - want_out).max() <= tol * np.abs(want_out).max()
    for p in (None, plus):
        got, want = layernorm_backward(dout, cache, p), layernorm_backward(dout, want_cache, p)
        for g, w in zip(got, want):
            assert g.shape == w.shape and np.abs(g - w).max() <= tol * np.abs(w).max()
