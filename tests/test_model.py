"""The serial model against SPEC.md: values (against tests/reference.py), gradients (finite
differences), initialisation, parameter table, public API, checkpoints and input validation."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

import weathermixer as wm
from weathermixer.autograd.gradcheck import directional_check
from weathermixer.mixer.gradcheck import check_model
from weathermixer.autograd.xp import cupy_available, module
from weathermixer.mixer import model as model_module
from weathermixer.mixer.api import serial_layout

from reference import reference_loss, reference_predict

# odd sizes, every axis a different length: T = 3 * 4 = 12, K = 5 * 2 * 3 = 30
CFG = wm.Config(n_lat=6, n_lon=12, n_prognostic=3, n_static=2, patch_lat=2, patch_lon=3,
                embed_dim=5, token_hidden_dim=7, channel_hidden_dim=9, n_blocks=2)
GRAD_TOL = 1e-6
VALUE_RTOL = 1e-12


def _perturbed_params(cfg, seed=3):
    """init_params plus noise, so that LN scales are not 1 and biases not 0."""
    rng = np.random.default_rng(seed + 100)
    params = wm.init_params(cfg, seed=seed)
    return {k: v + 0.2 * rng.standard_normal(v.shape) for k, v in params.items()}


def _data(cfg, batch=3, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, cfg.n_vars, cfg.n_lat, cfg.n_lon))
    target = rng.standard_normal((batch, cfg.n_prognostic, cfg.n_lat, cfg.n_lon))
    lat_w = np.cos(np.deg2rad(np.linspace(-75, 75, cfg.n_lat)))
    lat_w = lat_w / lat_w.mean()
    var_w = rng.uniform(0.5, 1.5, cfg.n_prognostic)
    return x, target, lat_w, var_w


def _rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


# ---- values against the reference --------------------------------------------------------------
@pytest.mark.parametrize("rollout", [1, 2])
def test_predict_matches_reference(rollout):
    params = _perturbed_params(CFG)
    x, _, _, _ = _data(CFG)
    y = wm.predict(params, x, CFG, rollout=rollout)
    assert y.shape == (3, CFG.n_prognostic, CFG.n_lat, CFG.n_lon)
    assert _rel(y, reference_predict(params, x, CFG.to_dict(), rollout)) < VALUE_RTOL


@pytest.mark.parametrize("rollout", [1, 2])
@pytest.mark.parametrize("weighted", [False, True])
def test_loss_matches_reference(rollout, weighted):
    params = _perturbed_params(CFG)
    x, target, lat_w, var_w = _data(CFG)
    if not weighted:
        lat_w = var_w = None
    loss, grads = wm.loss_and_grads(params, x, target, CFG, rollout, lat_w, var_w)
    want = reference_loss(params, x, target, CFG, rollout, lat_w, var_w)
    assert abs(loss - want) <= VALUE_RTOL * abs(want)
    assert set(grads) == set(params)  # same keys (SPEC); the order is backward order


def test_rollout_two_is_not_rollout_one():
    params = _perturbed_params(CFG)
    x, _, _, _ = _data(CFG)
    assert _rel(wm.predict(params, x, CFG, 2), wm.predict(params, x, CFG, 1)) > 1e-3


@pytest.mark.parametrize("rollout", [1, 2])
def test_gradients_against_reference_loss(rollout):
    """Directional derivatives of the *reference* loss against loss_and_grads' gradients,
    one direction per parameter: independent of the package's forward pass."""
    params = _perturbed_params(CFG)
    x, target, lat_w, var_w = _data(CFG, batch=2)
    _, grads = wm.loss_and_grads(params, x, target, CFG, rollout, lat_w, var_w)
    rng = np.random.default_rng(11)
    for name in ["encoder/weight", "blocks/0/token_mixing/fc1/weight",
                 "blocks/1/channel_norm/scale", "decoder/recovery/weight", "head/norm/bias"]:
        def f(value, name=name):
            trial = dict(params)
            trial[name] = value
            return reference_loss(trial, x, target, CFG, rollout, lat_w, var_w)
        err = directional_check(f, params[name], grads[name], rng)
        assert err < GRAD_TOL, f"{name}: {err:.2e}"


# ---- whole-model gradient check ---------------------------------------------------------------
@pytest.mark.parametrize("rollout", [1, 2])
@pytest.mark.parametrize("weights", [(True, True), (False, False)])
def test_gradcheck_whole_model(rollout, weights):
    rows = check_model(CFG, seed=0, rollout=rollout, batch=2, lat_weights=weights[0],
                       var_weights=weights[1], per_layer=False)
    assert len(rows) == len(wm.init_params(CFG)) + 1  # every parameter, plus the joint row
    bad = [(r.name, r.error) for r in rows if not r.error <= GRAD_TOL]
    assert not bad, bad


@pytest.mark.skipif(not cupy_available(), reason="CuPy with a GPU is not available")
def test_gradcheck_whole_model_cupy():
    rows = check_model(CFG, seed=0, rollout=2, batch=2, xp=module("cupy"))
    bad = [(r.name, r.error) for r in rows if not r.error <= GRAD_TOL]
    assert not bad, bad


def test_gradcheck_with_given_params_and_a_single_sample():
    cfg = wm.Config(n_lat=3, n_lon=5, n_prognostic=2, n_static=0, patch_lat=1, patch_lon=5,
                    embed_dim=3, token_hidden_dim=2, channel_hidden_dim=4, n_blocks=1)
    rows = check_model(cfg, seed=4, rollout=3, batch=1, params=_perturbed_params(cfg))
    assert all(r.error <= GRAD_TOL for r in rows), rows


def test_rollout_gradients_accumulate():
    """Shared weights collect one contribution per rollout repeat: rollout 2 gradients differ
    from rollout 1 (and the rollout-2 check above passes); an implementation that keeps only
    the last repeat's contribution fails the check."""
    params = _perturbed_params(CFG)
    x, target, lat_w, var_w = _data(CFG, batch=2)
    _, g1 = wm.loss_and_grads(params, x, target, CFG, 1, lat_w, var_w)
    _, g2 = wm.loss_and_grads(params, x, target, CFG, 2, lat_w, var_w)
    for name in params:
        if name.endswith("token_mixing/fc2/bias"):
            continue  # exactly zero gradient, see weathermixer.autograd.gradcheck
        assert _rel(g2[name], g1[name]) > 1e-6, name


def test_gradcheck_detects_overwritten_rollout_gradients(monkeypatch):
    def overwrite(grads, name, g):
        grads[name] = g  # the bug: the last repeat's gradient replaces the earlier ones
    monkeypatch.setattr(model_module, "_accumulate", overwrite)
    rows = check_model(CFG, rollout=2, per_layer=True)
    bad = {r.name for r in rows if r.error > GRAD_TOL}
    assert "blocks/0/channel_mixing/fc1" in bad and "encoder" not in bad


@pytest.mark.parametrize("rollout", [1, 3])
def test_gradients_are_complete_when_backward_says_ready(rollout):
    """The data-parallel sums start when backward reports a layer's gradients ready
    (`GradientSync`): nothing may be added to a gradient after that. Every parameter but the
    encoder's is reported during the backward, each exactly as it ends."""
    params = _perturbed_params(CFG)
    x, _, _, _ = _data(CFG, batch=2)
    y, cache = model_module.forward(params, x, serial_layout(CFG), rollout)
    dy = np.random.default_rng(5).standard_normal(y.shape)
    seen = {}

    def on_ready(grads, prefix):
        for name, g in grads.items():
            if name.startswith(prefix) and name not in seen:
                seen[name] = g.copy()

    grads, _ = model_module.backward(dy, cache, need_dx=False, release=True, on_ready=on_ready)
    assert set(seen) == {n for n in params if not n.startswith("encoder/")}
    for name, g in seen.items():
        assert np.array_equal(g, grads[name]), name


def test_fc2_token_bias_gradient_is_zero():
    """The token-mixing fc2 bias adds a constant along E, which every consumer (a LayerNorm
    over E) removes: its true gradient is zero, and backprop gives rounding noise only."""
    params = _perturbed_params(CFG)
    x, target, lat_w, var_w = _data(CFG, batch=2)
    _, grads = wm.loss_and_grads(params, x, target, CFG, 2, lat_w, var_w)
    scale = np.abs(grads["blocks/0/token_mixing/fc2/weight"]).max()
    for n in range(CFG.n_blocks):
        assert np.abs(grads[f"blocks/{n}/token_mixing/fc2/bias"]).max() < 1e-12 * max(1, scale)


def test_backward_twice_is_bitwise_identical_and_inputs_untouched():
    params = _perturbed_params(CFG)
    x, target, lat_w, var_w = _data(CFG, batch=2)
    copies = [a.copy() for a in (x, target, lat_w, var_w)]
    p_copy = {k: v.copy() for k, v in params.items()}
    l1, g1 = wm.loss_and_grads(params, x, target, CFG, 2, lat_w, var_w)
    l2, g2 = wm.loss_and_grads(params, x, target, CFG, 2, lat_w, var_w)
    assert l1 == l2
    for name in params:
        assert np.array_equal(g1[name], g2[name]), name
        assert np.array_equal(params[name], p_copy[name]), name
    for a, b in zip((x, target, lat_w, var_w), copies):
        assert np.array_equal(a, b)


# ---- parameters -------------------------------------------------------------------------------
def _spec_table(cfg):
    """SPEC.md's parameter table, written out independently of weathermixer.config."""
    E, Mt, Mc, P = cfg.embed_dim, cfg.token_hidden_dim, cfg.channel_hidden_dim, cfg.n_prognostic
    T = (cfg.n_lat // cfg.patch_lat) * (cfg.n_lon // cfg.patch_lon)
    K = (P + cfg.n_static) * cfg.patch_lat * cfg.patch_lon
    R = P * cfg.patch_lat * cfg.patch_lon
    table = [("encoder/weight", (E, K)), ("encoder/bias", (E,))]
    for n in range(cfg.n_blocks):
        b = f"blocks/{n}/"
        table += [(b + "token_norm/scale", (E,)), (b + "token_norm/bias", (E,)),
                  (b + "token_mixing/fc1/weight", (Mt, T)), (b + "token_mixing/fc1/bias", (Mt,)),
                  (b + "token_mixing/fc2/weight", (T, Mt)), (b + "token_mixing/fc2/bias", (T,)),
                  (b + "channel_norm/scale", (E,)), (b + "channel_norm/bias", (E,)),
                  (b + "channel_mixing/fc1/weight", (Mc, E)),
                  (b + "channel_mixing/fc1/bias", (Mc,)),
                  (b + "channel_mixing/fc2/weight", (E, Mc)),
                  (b + "channel_mixing/fc2/bias", (E,))]
    table += [("decoder/norm/scale", (E,)), ("decoder/norm/bias", (E,)),
              ("decoder/recovery/weight", (R, 2 * E)), ("decoder/recovery/bias", (R,)),
              ("head/decoded_norm/scale", (P,)), ("head/decoded_norm/bias", (P,)),
              ("head/norm/scale", (2 * P,)), ("head/norm/bias", (2 * P,)),
              ("head/linear/weight", (P, 2 * P)), ("head/linear/bias", (P,))]
    return table


CONFIGS = [
    CFG,
    wm.Config(n_lat=8, n_lon=12, n_prognostic=3, n_static=1, patch_lat=1, patch_lon=3,
              embed_dim=10, token_hidden_dim=7, channel_hidden_dim=9, n_blocks=2),
    wm.Config(n_lat=5, n_lon=7, n_prognostic=1, n_static=0, patch_lat=1, patch_lon=1,
              embed_dim=3, token_hidden_dim=11, channel_hidden_dim=2, n_blocks=3),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"T{c.n_tokens}E{c.embed_dim}")
def test_param_names_shapes_and_count(cfg):
    params = wm.init_params(cfg, seed=0)
    table = _spec_table(cfg)
    assert [(k, v.shape) for k, v in params.items()] == table
    assert all(v.dtype == np.float64 for v in params.values())
    assert cfg.n_params() == sum(int(np.prod(s)) for _, s in table)
    assert cfg.n_params() == sum(v.size for v in params.values())


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"T{c.n_tokens}E{c.embed_dim}")
def test_init_bounds_and_norms(cfg):
    params = wm.init_params(cfg, seed=5)
    for name, v in params.items():
        if "norm/" in name:
            want = 1.0 if name.endswith("/scale") else 0.0
            assert np.all(v == want), name
            continue
        fan_in = params[name.rsplit("/", 1)[0] + "/weight"].shape[1]
        bound = 1.0 / np.sqrt(fan_in)
        assert np.abs(v).max() <= bound, name
        if v.size >= 20:  # drawn over the whole range, not a narrower one
            assert np.abs(v).max() > 0.5 * bound, name
        assert np.unique(v).size == v.size, name  # no two entries alike


def test_init_deterministic_per_seed():
    a, b, c = (wm.init_params(CFG, seed=s) for s in (7, 7, 8))
    for name in a:
        assert np.array_equal(a[name], b[name]), name
        if "norm/" not in name:
            assert not np.array_equal(a[name], c[name]), name
    # parameters do not share a stream: the two fc1 weights of the blocks differ
    assert not np.array_equal(a["blocks/0/token_mixing/fc1/weight"],
                              a["blocks/1/token_mixing/fc1/weight"])
    f32 = wm.init_params(CFG, seed=7, dtype="float32")
    for name in a:
        assert f32[name].dtype == np.float32
        assert np.array_equal(f32[name], a[name].astype(np.float32)), name


# ---- public API, checkpoints, validation --------------------------------------------------------
def test_spec_api_example(tmp_path):
    cfg = wm.Config(n_lat=8, n_lon=12, n_prognostic=3, n_static=1, patch_lat=1, patch_lon=3,
                    embed_dim=10, token_hidden_dim=7, channel_hidden_dim=9, n_blocks=2)
    params = wm.init_params(cfg, seed=0, dtype="float64")        # dict name -> global array
    x = np.random.default_rng(0).standard_normal((2, 4, 8, 12))
    target = np.random.default_rng(1).standard_normal((2, 3, 8, 12))
    y = wm.predict(params, x, cfg, rollout=1)                     # [B, P+S, H, W] -> [B, P, H, W]
    loss, grads = wm.loss_and_grads(params, x, target, cfg, rollout=1,
                                    lat_weights=None, var_weights=None)  # same keys as params
    path = tmp_path / "model.h5"
    wm.save_checkpoint(path, params, cfg)                         # layout-independent HDF5
    params2, cfg2 = wm.load_checkpoint(path)
    assert y.shape == (2, 3, 8, 12)
    assert np.isfinite(loss) and loss > 0
    assert set(grads) == set(params)
    assert cfg2 == cfg
    assert _rel(y, reference_predict(params, x, cfg, 1)) < VALUE_RTOL


def test_checkpoint_round_trip_and_plain_h5py(tmp_path):
    params = _perturbed_params(CFG)
    path = tmp_path / "ckpt.h5"
    wm.save_checkpoint(path, params, CFG, step=17)
    loaded, cfg = wm.load_checkpoint(path)
    assert cfg == CFG
    assert list(loaded) == list(params)
    for name in params:
        assert loaded[name].dtype == params[name].dtype
        assert np.array_equal(loaded[name], params[name]), name
    with h5py.File(path, "r") as f:  # readable without weathermixer
        assert f.attrs["format"] == "weathermixer-checkpoint"
        assert int(f.attrs["format_version"]) >= 1
        assert int(f.attrs["step"]) == 17
        assert json.loads(f.attrs["config"]) == CFG.to_dict()
        for name, value in params.items():
            assert np.array_equal(f[f"params/{name}"][()], value), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.h5"]  # no temporary left


def test_bad_input_shapes_raise_value_error():
    params = wm.init_params(CFG, seed=0)
    x, target, lat_w, var_w = _data(CFG, batch=2)
    bad_inputs = [x[:, :-1], x[:, :, :-1], x[:, :, :, :-1], x[0], x[..., None]]
    for bad in bad_inputs:
        with pytest.raises(ValueError, match="shape"):
            wm.predict(params, bad, CFG)
        with pytest.raises(ValueError, match="shape"):
            wm.loss_and_grads(params, bad, target, CFG)
    for bad_target in (target[:, :-1], x, target[0]):
        with pytest.raises(ValueError, match="shape"):
            wm.loss_and_grads(params, x, bad_target, CFG)
    with pytest.raises(ValueError, match="shape"):
        wm.loss_and_grads(params, x, target, CFG, lat_weights=lat_w[:-1])
    with pytest.raises(ValueError, match="shape"):
        wm.loss_and_grads(params, x, target, CFG, var_weights=np.ones(CFG.n_vars))


def test_bad_config_raises():
    with pytest.raises(ValueError, match="divisible"):
        wm.Config(n_lat=7, n_lon=12, n_prognostic=3, n_static=1, patch_lat=2, patch_lon=3,
                  embed_dim=5, token_hidden_dim=7, channel_hidden_dim=9, n_blocks=1)
    with pytest.raises(ValueError):
        wm.Config(n_lat=6, n_lon=12, n_prognostic=0, n_static=1, patch_lat=2, patch_lon=3,
                  embed_dim=5, token_hidden_dim=7, channel_hidden_dim=9, n_blocks=1)


def test_solo_layout_is_one_replica_alone():
    """`mixer.bench.solo_layout`: the same partitions, `data` a group of one, the other
    groups and the replica count kept (so each replica still divides by the global batch)."""
    import dataclasses

    from weathermixer.jigsaw.backend import LocalGroup
    from weathermixer.jigsaw.grid import ProcessGrid
    from weathermixer.mixer.bench import solo_layout
    from weathermixer.mixer.layout import Layout
    cfg = wm.Config(n_lat=10, n_lon=12, n_prognostic=5, n_static=2, patch_lat=2, patch_lon=4,
                    embed_dim=13, token_hidden_dim=7, channel_hidden_dim=9, n_blocks=2)
    import types
    data = types.SimpleNamespace(size=3, rank=1)  # the data group of replica 1 of 3
    grid = dataclasses.replace(ProcessGrid.serial(), n_dp=3, data=data)
    layout = Layout(cfg, grid)
    solo = solo_layout(layout)
    assert isinstance(solo.grid.data, LocalGroup) and solo.grid.n_dp == 3
    assert solo.grid.model is grid.model and solo.grid.world is grid.world
    assert solo.tokens == layout.tokens
    cut, n = layout.data_parts("encoder/weight"), 13 * (5 + 2) * 2 * 4  # [E, (P + S) pl pw]
    assert cut.sizes == [n // 3 + (r < n % 3) for r in range(3)]
    assert layout.data_part("encoder/weight") == cut.index(1)
    assert solo.data_parts("encoder/weight").sizes == [n]  # one replica updates all of it
    assert np.array_equal(solo.prognostic_channels, layout.prognostic_channels)
