"""Gradient check of the whole model: `weathermixer.loss_and_grads` against finite
differences, parameter by parameter (used by the tests and `weathermixer gradcheck`).

The checks and the error measure are those of `weathermixer.autograd.gradcheck`.
"""
from __future__ import annotations

import numpy as np

from weathermixer.autograd.gradcheck import (Row, random_direction, inner, noise_floor, require_float64,
                                             directional_check, elementwise_check,
                                             relative_error, worst)
from weathermixer.autograd.xp import to_module
from weathermixer.mixer.api import loss_and_grads
from weathermixer.mixer.params import init_params


def layer_of(name: str) -> str:
    """'blocks/0/token_mixing/fc1/weight' -> 'blocks/0/token_mixing/fc1'."""
    return name.rsplit("/", 1)[0]


def check_model(cfg, seed: int = 0, rollout: int = 1, batch: int = 2, lat_weights: bool = True,
                var_weights: bool = True, params: dict | None = None, xp=np, eps: float = 1e-6,
                n_entries: int = 3, per_layer: bool = True) -> list:
    """Gradient check of `weathermixer.loss_and_grads` with respect to every parameter.

    For each parameter: one directional check (random u) and elementwise checks of
    `n_entries` random entries, all with the loss returned by `loss_and_grads` as f. x,
    target, the latitude weights [H] and variable weights [P] (U(0.5, 1.5) when asked for,
    else None) are drawn from `seed`. Without `params`, the parameters are `init_params(cfg,
    seed)` with every LayerNorm scale and bias moved off 1 and 0 (+ 0.3 N(0, 1)): at the
    initial values a backward that forgets them would pass. A last row "(all parameters)"
    checks one joint direction.

    Returns a list of `Row(name, error, size)`, one per layer (weight and bias together) when
    `per_layer`, else one per parameter, in SPEC order."""
    rng = np.random.default_rng(seed)
    if params is None:
        params = init_params(cfg, seed=seed, dtype="float64", xp=xp)
        for name in params:
            if "norm/" in name:
                params[name] = params[name] + to_module(
                    0.3 * rng.standard_normal(params[name].shape), xp)
    else:
        params = {k: to_module(v, xp) for k, v in params.items()}
    require_float64(*params.values())
    P, H, W = cfg.n_prognostic, cfg.n_lat, cfg.n_lon
    x = to_module(rng.standard_normal((batch, cfg.n_vars, H, W)), xp)  # [B, P+S, H, W]
    target = to_module(rng.standard_normal((batch, P, H, W)), xp)  # [B, P, H, W]
    lat_w = to_module(rng.uniform(0.5, 1.5, H), xp) if lat_weights else None  # [H]
    var_w = to_module(rng.uniform(0.5, 1.5, P), xp) if var_weights else None  # [P]

    def loss_with(name, value):
        trial = dict(params)
        trial[name] = value
        loss, _ = loss_and_grads(trial, x, target, cfg, rollout, lat_w, var_w)
        return loss

    _, grads = loss_and_grads(params, x, target, cfg, rollout, lat_w, var_w)
    rows = []
    for name, p in params.items():
        f = lambda value, name=name: loss_with(name, value)  # noqa: E731
        err = directional_check(f, p, grads[name], rng, eps)
        picks = rng.choice(p.size, size=min(n_entries, p.size), replace=False)
        err = worst(err, elementwise_check(f, p, grads[name], picks, eps))
        rows.append(Row(name, err, int(p.size)))
    if per_layer:
        rows = _group(rows)
    rows.append(_joint_row(params, grads, rng, eps, x, target, cfg, rollout, lat_w, var_w))
    return rows


def _group(rows: list) -> list:
    """Per-parameter rows -> per-layer rows (worst error, summed size), in first-seen order."""
    layers: dict = {}
    for r in rows:
        key = layer_of(r.name)
        err, size = layers.get(key, (0.0, 0))
        layers[key] = (worst(err, r.error), size + r.size)
    return [Row(name, err, size) for name, (err, size) in layers.items()]


def _joint_row(params, grads, rng, eps, x, target, cfg, rollout, lat_w, var_w):
    """One direction over all parameters at once: catches nothing new per parameter, but
    checks that the per-parameter gradients add up (the whole-model directional derivative)."""
    us = {name: random_direction(rng, p) for name, p in params.items()}

    def shifted(sign):
        trial = {name: p + sign * eps * us[name] for name, p in params.items()}
        return loss_and_grads(trial, x, target, cfg, rollout, lat_w, var_w)[0]

    f_plus, f_minus = shifted(1.0), shifted(-1.0)
    num = (f_plus - f_minus) / (2.0 * eps)
    ana = sum(inner(grads[name], us[name]) for name in params)
    size = sum(int(p.size) for p in params.values())
    return Row("(all parameters)", relative_error(num, ana, noise_floor(f_plus, f_minus)), size)
