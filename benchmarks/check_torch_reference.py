"""Check that benchmarks/torch_reference.py computes the model of SPEC.md exactly as we do.

In float64 on a small config with odd sizes, for both of the reference's forms of LayerNorm
and GELU (torch's kernels, SPEC.md's formulas written out), for rollout 1 and 2 and with
latitude and variable weights, compare torch's prediction, loss and every parameter gradient against
`weathermixer.predict` and `weathermixer.loss_and_grads`. The LayerNorm scales and biases are
perturbed away from their (1, 0) initialisation so their gradients are tested non-trivially.

    python benchmarks/check_torch_reference.py            # exits 1 on a mismatch

Not collected by the main test suite (testpaths = tests); it needs torch, which the package
does not.
"""
from __future__ import annotations

import itertools
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_reference as tr  # noqa: E402

import weathermixer as wm  # noqa: E402

TOL = 1e-10  # relative: max-abs error over max-abs value, per array (see `rel_err`)
# blocks/{n}/token_mixing/fc2/bias adds b[t] to all E channels of token t, and every consumer
# of the residual stream is a LayerNorm over E, which removes it: its true gradient is exactly
# zero and both implementations return round-off (~1e-18). Such arrays are compared against
# FLOOR x the largest gradient entry of the model instead of their own (zero) scale.
FLOOR = 1e-3

CFG = wm.Config(n_lat=6, n_lon=15, n_prognostic=3, n_static=2, patch_lat=2, patch_lon=3,
                embed_dim=7, token_hidden_dim=5, channel_hidden_dim=9, n_blocks=2)
BATCH = 3


def rel_err(a, b, scale: float = 0.0) -> float:
    """max|a - b| / max(max|b|, scale)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), scale, 1e-300))


def make_case(seed=0):
    rng = np.random.default_rng(seed)
    params = wm.init_params(CFG, seed=seed, dtype="float64")
    for name in params:  # move LN parameters off (1, 0)
        if "norm/" in name:
            params[name] = params[name] + rng.normal(0, 0.3, params[name].shape)
    x = rng.normal(size=(BATCH, CFG.n_vars, CFG.n_lat, CFG.n_lon))
    target = rng.normal(size=(BATCH, CFG.n_prognostic, CFG.n_lat, CFG.n_lon))
    lat = np.linspace(-75, 75, CFG.n_lat)
    lat_w = np.cos(np.deg2rad(lat)) / np.cos(np.deg2rad(lat)).mean()
    var_w = rng.uniform(0.5, 2.0, CFG.n_prognostic)
    return params, x, target, lat_w, var_w


def check(rollout: int, weighted: bool, formulas: str, seed=0) -> list[tuple[str, float]]:
    params, x, target, lat_w, var_w = make_case(seed)
    if not weighted:
        lat_w = var_w = None
    model = tr.build(CFG, params, device="cpu", dtype=torch.float64, formulas=formulas)
    xt, tt = torch.from_numpy(x), torch.from_numpy(target)
    lw = None if lat_w is None else torch.from_numpy(lat_w)
    vw = None if var_w is None else torch.from_numpy(var_w)

    results = []
    with torch.no_grad():
        y_t = model(xt, rollout).numpy()
    y_w = wm.predict(params, x, CFG, rollout=rollout)
    results.append(("predict", rel_err(y_w, y_t)))

    loss_t = tr.loss_fn(model, xt, tt, rollout, lw, vw)
    loss_t.backward()
    g_t = tr.grads_numpy(model)
    loss_w, g_w = wm.loss_and_grads(params, x, target, CFG, rollout=rollout,
                                    lat_weights=lat_w, var_weights=var_w)
    results.append(("loss", rel_err(loss_w, loss_t.item())))
    if set(g_w) != set(g_t):
        raise AssertionError(f"gradient keys differ: {sorted(set(g_w) ^ set(g_t))}")
    gmax = max(float(np.max(np.abs(g))) for g in g_t.values())
    for name in tr.param_shapes(CFG):
        assert g_w[name].shape == g_t[name].shape, name
        results.append((name, rel_err(g_w[name], g_t[name], FLOOR * gmax)))
    return results


def main() -> int:
    torch.set_default_dtype(torch.float64)
    print(f"config: {CFG}, batch {BATCH}, float64, tolerance {TOL:g} (relative, per array)")
    ok = True
    for formulas, rollout, weighted in itertools.product(tr.FORMULAS, (1, 2), (False, True)):
        res = check(rollout, weighted, formulas)
        worst_name, worst = max(res, key=lambda r: r[1])
        live = [r for r in res if "token_mixing/fc2/bias" not in r[0]]
        live_name, live_worst = max(live, key=lambda r: r[1])
        bad = [(n, e) for n, e in res if not e <= TOL]
        ok &= not bad
        print(f"{formulas:7s} rollout={rollout} weights={'lat+var' if weighted else 'none':7s} "
              f"{len(res) - 2} grads + predict + loss: worst rel err {worst:.2e} "
              f"({worst_name}); excluding the null fc2 biases {live_worst:.2e} ({live_name}) "
              f"{'OK' if not bad else 'FAIL'}")
        for n, e in bad:
            print(f"    FAIL {n}: {e:.3e}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def test_torch_reference_matches():  # for `pytest benchmarks/check_torch_reference.py`
    assert main() == 0


if __name__ == "__main__":
    sys.exit(main())
