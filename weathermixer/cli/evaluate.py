"""`weathermixer evaluate`: forecast RMSE of a checkpoint per variable, against persistence."""
from __future__ import annotations

import json

import click
import numpy as np

from weathermixer.cli.errors import JobConfigError
from weathermixer.cli.train import (check_request, checkpoint_header, grid_shape, make_layout,
                                    world_size)
from weathermixer.mixer import state
from weathermixer.mixer.evaluate import evaluate as run_evaluation


def open_evaluation_data(data, cfg, meta):
    """The data source, normalised as the checkpoint's training data was."""
    from weathermixer.io.data import DataError, Era5Source
    from weathermixer.io.synthetic import SyntheticSource
    extra = meta["extra"]
    data = list(data) or extra.get("data", [])
    if not data:  # trained on the synthetic task: evaluate on it
        return SyntheticSource(cfg.n_lat, cfg.n_lon, cfg.n_prognostic, cfg.n_static,
                               n_time=extra.get("synthetic_steps", 96), seed=extra.get("seed", 0))
    try:
        source = Era5Source(data, static=extra.get("static", []))
    except DataError as e:
        raise JobConfigError(str(e)) from None
    norm = extra.get("normalization")
    if norm is None or norm["channels"] != list(source.channels):
        raise JobConfigError(f"{data[0]}: channels {list(source.channels)} are not the ones the "
                             f"checkpoint was trained on ({None if norm is None else norm['channels']})")
    source.set_stats(np.asarray(norm["mean"]), np.asarray(norm["std"]))
    return source


@click.command()
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--data", multiple=True, type=click.Path(dir_okay=False),
              help="HDF5 file(s) to evaluate on (default: the checkpoint's training data)")
@click.option("--lead", type=int, default=1, show_default=True,
              help="forecast lead in data steps (the latent rollout)")
@click.option("--samples", "max_samples", type=int, default=None,
              help="evaluate on the first N samples only")
@click.option("--batch", type=int, default=1, show_default=True, help="samples per replica")
@click.option("--jigsaw", type=int, default=1, show_default=True, help="1, 2 or 4")
@click.option("--grid", default=None, help="DOMAINxCHANNEL (overrides --jigsaw)")
@click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto",
              show_default=True)
@click.option("--precision", type=click.Choice(["tf32", "fp32"]), default="tf32",
              show_default=True)
@click.option("--json", "json_path", default=None, help="also write the figures as JSON here")
def evaluate(checkpoint, data, lead, max_samples, batch, jigsaw, grid, device, precision,
             json_path):
    """Latitude-weighted RMSE per prognostic variable (physical units) of CHECKPOINT's
    forecasts, with persistence as the baseline, on any layout."""
    pd, pc = grid_shape(jigsaw, grid)
    n = world_size()
    check_request(n, pd, pc, None, n)  # no batch constraint: each replica takes its samples
    cfg, meta = checkpoint_header(checkpoint)
    source = open_evaluation_data(data, cfg, meta)
    layout, xp = make_layout(cfg, pd, pc, n, device, precision)
    params, _ = state.load(checkpoint, layout, meta["dtype"], xp)  # the trained dtype
    result = run_evaluation(params, cfg, layout, source, lead, max_samples, batch)
    if layout.grid.is_root:
        click.echo(f"{checkpoint} (step {meta['step']}), lead {lead}, {result['samples']} samples, "
                   f"{layout.grid.describe()}")
        click.echo(f"{'variable':>12} {'RMSE':>12} {'persistence':>12}")
        for name, a, b in zip(result["variables"], result["rmse"], result["persistence_rmse"]):
            click.echo(f"{name:>12} {a:>12.5g} {b:>12.5g}")
        if json_path:
            with open(json_path, "w") as fh:
                json.dump(result, fh, indent=2)
