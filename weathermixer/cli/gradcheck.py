"""`weathermixer gradcheck`: finite-difference check of the model's backward pass (float64).

Builds a small model (odd sizes by default, so that a transposed or mis-split axis cannot hide),
runs `weathermixer.mixer.gradcheck.check_model` and prints one row per layer:

    layer                         params   max rel err   status
    encoder                           85      9.00e-09   ok

Exits with status 1 when any row exceeds --tol.
"""
from __future__ import annotations

import math

import click

from weathermixer.mixer.gradcheck import check_model
from weathermixer.cli.options import config_from_options, model_options

# small odd sizes: every axis a different length, T = 3 x 4 = 12 tokens
DEFAULTS = dict(n_lat=6, n_lon=8, n_prognostic=3, n_static=1, patch_lat=2, patch_lon=2,
                embed_dim=5, token_hidden_dim=7, channel_hidden_dim=9, n_blocks=2)


@click.command()
@model_options
@click.option("--rollout", type=click.IntRange(min=1), default=2, show_default=True,
              help="latent rollout steps (the blocks are applied this many times)")
@click.option("--batch", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True,
              help="seed of the parameters, x, target and the check's directions")
@click.option("--tol", type=float, default=1e-6, show_default=True,
              help="largest accepted relative error of a row")
def gradcheck(rollout, batch, seed, tol, **model):
    """Check every parameter gradient of `loss_and_grads` against central differences.

    Per parameter: one random-direction check and a few random entries, with latitude and
    variable weights, in float64 on numpy.
    """
    cfg = config_from_options(DEFAULTS, **model)
    click.echo(f"config: {cfg.to_json()}")
    click.echo(f"rollout={rollout} batch={batch} seed={seed} tol={tol:g} "
               f"({cfg.n_params()} parameters)")
    rows = check_model(cfg, seed=seed, rollout=rollout, batch=batch)
    width = max(len("layer"), *(len(r.name) for r in rows))
    click.echo(f"{'layer':<{width}}  {'params':>8}  {'max rel err':>11}  status")
    failed = []
    for r in rows:
        ok = r.error <= tol  # False for NaN
        if not ok:
            failed.append(r.name)
        click.echo(f"{r.name:<{width}}  {r.size:>8d}  {_fmt(r.error):>11}  "
                   f"{'ok' if ok else 'FAIL'}")
    if failed:
        raise click.ClickException(f"{len(failed)} of {len(rows)} rows exceed tol={tol:g}: "
                                   f"{', '.join(failed)}")
    click.echo(f"all {len(rows)} rows within tol={tol:g}")


def _fmt(err: float) -> str:
    return "nan" if math.isnan(err) else f"{err:.2e}"
