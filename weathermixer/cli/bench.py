"""`weathermixer bench`: what a training step costs on each rank of a layout."""
from __future__ import annotations

import json

import click
import numpy as np

from weathermixer.cli.options import config_from_options, model_options
from weathermixer.cli.train import check_request, grid_shape, make_layout, world_size
from weathermixer.mixer.bench import data_parallel_efficiency, run_bench

# a mid-size default: 32 x 64 grid, patch 1 x 4, E = 256, Mt = 256, Mc = 512, 3 blocks
DEFAULTS = dict(n_lat=32, n_lon=64, n_prognostic=5, n_static=1, patch_lat=1, patch_lon=4,
                embed_dim=256, token_hidden_dim=256, channel_hidden_dim=512, n_blocks=3)


@click.command()
@model_options
@click.option("--jigsaw", type=int, default=1, show_default=True, help="1, 2 or 4")
@click.option("--grid", default=None, help="DOMAINxCHANNEL (overrides --jigsaw)")
@click.option("--batch", type=int, default=4, show_default=True, help="global batch")
@click.option("--steps", type=int, default=5, show_default=True, help="timed steps")
@click.option("--warmup", type=int, default=2, show_default=True)
@click.option("--rollout", type=int, default=1, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32",
              show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto",
              show_default=True)
@click.option("--precision", type=click.Choice(["tf32", "fp32"]), default="tf32",
              show_default=True)
@click.option("--json", "json_path", default=None, help="also write the rows as JSON here")
def bench(config, jigsaw, grid, batch, steps, warmup, rollout, dtype, device, precision, json_path,
          **size_flags):
    """Per rank: parameter bytes held, bytes sent per step by each operator, compute and
    communication time per step."""
    pd, pc = grid_shape(jigsaw, grid)
    n = world_size()
    check_request(n, pd, pc, None, batch)
    cfg = config_from_options(DEFAULTS, config, **size_flags)
    layout, xp = make_layout(cfg, pd, pc, n, device, precision)
    pgrid = layout.grid
    row = run_bench(cfg, layout, batch, steps, warmup, dtype, xp=xp, rollout=rollout)
    rows = pgrid.world.gather_json(row)
    if pgrid.is_root:
        click.echo(f"{cfg.n_params():,} parameters; {pgrid.describe()}; global batch {batch}; "
                   f"{dtype}{' ' + precision if xp is not np else ''}; median of {steps} steps; "
                   f"large-GEMM rate {rows[0]['gemm_tflops']:.1f} TFLOP/s")
        click.echo("groups: " + ", ".join(f"{name} {how}" for name, how
                                          in rows[0]["transport"].items()))
        click.echo(format_table(rows))
        efficiency = data_parallel_efficiency(rows)
        if efficiency is not None:
            click.echo(f"data-parallel efficiency of the {pgrid.n_dp} replicas together: "
                       f"{efficiency:.3f}")
        if json_path:
            with open(json_path, "w") as fh:
                json.dump({"config": cfg.to_dict(), "rows": rows,
                           "dp_efficiency": efficiency}, fh, indent=2)


def format_table(rows) -> str:
    ops = sorted({op for r in rows for op in r["bytes_sent_per_step"]})
    head = (f"{'rank':>4} {'grid':>5} {'fwd ms':>8} {'bwd ms':>8} {'step ms':>8} {'comm %':>6} "
            f"{'TFLOP/s':>8} {'of GEMM':>7} {'pool GiB':>8} {'used GiB':>8} {'params MB':>10} "
            f"{'of 1-way':>8}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['rank']:>4} {r['grid']:>5} {r['forward_ms']:>8.2f} "
                     f"{r['backward_ms']:>8.2f} {r['step_ms']:>8.2f} "
                     f"{100 * r['comm_share']:>6.1f} {r['tflops_per_rank']:>8.3f} "
                     f"{r['gemm_fraction']:>7.3f} {r['peak_device_bytes'] / 2**30:>8.2f} "
                     f"{r['peak_in_use_bytes'] / 2**30:>8.2f} "
                     f"{r['param_bytes'] / 1e6:>10.2f} {r['param_fraction']:>8.3f}")
    if any(r.get("dp_efficiency") is not None for r in rows):
        lines.append("data-parallel efficiency: the step of this replica alone (no gradient sums "
                     "over `data`, same processes and GPUs) / the step above")
        lines.append(f"{'rank':>4} {'alone ms':>8} {'step ms':>8} {'efficiency':>10}")
        for r in rows:
            lines.append(f"{r['rank']:>4} {r['solo_step_ms']:>8.2f} {r['step_ms']:>8.2f} "
                         f"{r['dp_efficiency']:>10.3f}")
    if ops:
        lines.append("bytes sent per step (MB) by operator:")
        lines.append(f"{'rank':>4} " + " ".join(f"{op:>20}" for op in ops))
        for r in rows:
            lines.append(f"{r['rank']:>4} " + " ".join(
                f"{r['bytes_sent_per_step'].get(op, 0) / 1e6:>20.3f}" for op in ops))
    return "\n".join(lines)
