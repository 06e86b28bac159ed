"""AdamW against the formula written out in plain Python floats: clipping by the global norm,
bias correction, decoupled weight decay on 2-D weights only, and a non-finite norm that
changes nothing. On numpy everywhere, and on CuPy (float64) where a GPU is."""
from __future__ import annotations

import math

import numpy as np
import pytest

import weathermixer as wm
from weathermixer.autograd.xp import cupy_available, module, to_host
from weathermixer.mixer.api import serial_layout
from weathermixer.mixer.optim import AdamW, ParamsInFlight, read_back

CFG = wm.Config(n_lat=4, n_lon=8, n_prognostic=2, n_static=1, patch_lat=2, patch_lon=4,
                embed_dim=3, token_hidden_dim=5, channel_hidden_dim=7, n_blocks=1)
XPS = ["numpy", pytest.param("cupy", marks=pytest.mark.skipif(
    not cupy_available(), reason="needs CuPy and a GPU"))]


def _reference_adamw(params, grads_per_step, lr, betas, eps, wd, clip):
    """The update formula element by element, for a list of steps' gradients."""
    b1, b2 = betas
    p = {k: v.copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    s = {k: np.zeros_like(v) for k, v in params.items()}
    t = 0
    for grads in grads_per_step:
        norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads.values()))
        if not math.isfinite(norm):
            continue
        t += 1
        scale = min(1.0, clip / (norm + 1e-12))
        for k in p:
            g = grads[k] * scale
            m[k] = b1 * m[k] + (1 - b1) * g
            s[k] = b2 * s[k] + (1 - b2) * g * g
            decay = 1 - lr * wd if p[k].ndim == 2 else 1.0
            p[k] = p[k] * decay - lr * (m[k] / (1 - b1 ** t)) / (
                np.sqrt(s[k] / (1 - b2 ** t)) + eps)
    return p, m, t


@pytest.mark.parametrize("xp_name", XPS)
def test_adamw_follows_the_formula_and_skips_a_non_finite_step(xp_name):
    xp = module(xp_name)
    rng = np.random.default_rng(5)
    params = wm.init_params(CFG, seed=1, dtype="float64")
    steps = [{k: rng.standard_normal(v.shape) * 3.0 for k, v in params.items()} for _ in range(4)]
    steps[2]["encoder/weight"][0, 0] = np.nan  # this step changes nothing, t included
    want_p, want_m, want_t = _reference_adamw(params, steps, 1e-2, (0.9, 0.99), 1e-8, 0.1, 2.0)

    opt = AdamW(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1, clip_norm=2.0)
    dev = {k: xp.asarray(v) for k, v in params.items()}
    layout = serial_layout(CFG)
    skipped = []
    for grads in steps:
        stats = read_back(opt.step(dev, {k: xp.asarray(g) for k, g in grads.items()}, layout))
        skipped.append(stats["skipped"])
        assert stats["clip_scale"] == (0.0 if stats["skipped"] else
                                       pytest.approx(min(1.0, 2.0 / stats["grad_norm"])))
    assert skipped == [0.0, 0.0, 1.0, 0.0]
    assert opt.t == want_t == 3
    for k in params:
        assert np.abs(to_host(dev[k]) - want_p[k]).max() < 1e-12, k
        assert np.abs(to_host(opt.m[k]).reshape(want_m[k].shape) - want_m[k]).max() < 1e-12, k


def test_clipping_scales_the_first_moment():
    """The first step's m is (1 - b1) g min(1, clip / ||g||): clipped when ||g|| > clip."""
    params = wm.init_params(CFG, seed=2, dtype="float64")
    grads = {k: np.full(v.shape, 1.0) for k, v in params.items()}
    norm = math.sqrt(sum(g.size for g in grads.values()))
    opt = AdamW(lr=1e-3, clip_norm=0.5)
    stats = read_back(opt.step(params, grads, serial_layout(CFG)))
    assert stats["grad_norm"] == pytest.approx(norm)
    for k in params:
        assert np.allclose(opt.m[k], 0.1 * 0.5 / norm)


class _Arrival:
    """Stands in for a gather in flight (`backend.InFlight`): counts the waits for it."""

    def __init__(self):
        self.waits = 0

    def get(self):
        self.waits += 1


def test_params_in_flight_wait_for_each_block_once_when_read():
    """Reading a block waits for its own gather only, once; `values()` / `items()` wait for
    every block; the optimizer reads every block it updates."""
    params = ParamsInFlight(wm.init_params(CFG, seed=3, dtype="float64"))
    names = list(params)
    arrivals = {name: _Arrival() for name in names}
    params.arriving.update(arrivals)
    params[names[0]]
    params[names[0]]
    assert [arrivals[n].waits for n in names[:2]] == [1, 0]
    params.values()
    assert all(a.waits == 1 for a in arrivals.values()) and not params.arriving
    params.arriving.update(arrivals)
    grads = {k: np.ones(v.shape) for k, v in params.items()}
    assert all(a.waits == 2 for a in arrivals.values())
    params.arriving.update(arrivals)
    AdamW(lr=1e-3).step(params, grads, serial_layout(CFG))
    assert all(a.waits == 3 for a in arrivals.values())
