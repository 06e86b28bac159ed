"""`weathermixer train`: train WeatherMixer on one rank or under mpiexec/srun with Jigsaw.

    mpiexec -n N weathermixer train --jigsaw J [--data FILE.h5 ...] [size flags]

N = J x D ranks: model groups of J consecutive ranks (1 = 1x1, 2 = 1x2, 4 = 2x2 domain x
channel; `--grid DxC` for any other grid, e.g. 2x1), replicated D times for data parallelism.
Everything that can be checked before the first step is checked on every rank alike, and a
bad request ends the whole job with a one-line error from rank 0.
"""
from __future__ import annotations

import os

import click
import numpy as np

from weathermixer.autograd import xp as xpmod
from weathermixer.cli.errors import JobConfigError
from weathermixer.cli.options import config_from_options, model_options
from weathermixer.jigsaw import ops
from weathermixer.jigsaw.grid import LAYOUTS, ProcessGrid, node_placement, parse_grid
from weathermixer.mixer.layout import Layout, LayoutError, check_splittable
from weathermixer.mixer.train import TrainSettings, train as run_training

# The embedded default: a small model on a learnable synthetic task (see io/synthetic.py).
DEFAULTS = dict(n_lat=16, n_lon=32, n_prognostic=4, n_static=1, patch_lat=2, patch_lon=4,
                embed_dim=48, token_hidden_dim=64, channel_hidden_dim=96, n_blocks=2)


def grid_shape(jigsaw: int, grid: str | None) -> tuple[int, int]:
    if grid is not None:
        try:
            return parse_grid(grid)
        except ValueError as e:
            raise JobConfigError(str(e)) from None
    if jigsaw not in LAYOUTS:
        raise JobConfigError(f"--jigsaw {jigsaw}: choose 1, 2 or 4 (or --grid DxC)")
    return LAYOUTS[jigsaw]


def world_size() -> int:
    from weathermixer.cli.main import under_mpi
    if not under_mpi():
        return 1
    from mpi4py import MPI
    return MPI.COMM_WORLD.Get_size()


def check_request(n: int, pd: int, pc: int, replicas: int | None, batch: int) -> int:
    """D = N / (pd pc), after checking that the launch and the batch fit the request."""
    q = pd * pc
    if n % q:
        raise JobConfigError(f"{n} ranks cannot form model groups of {q} ({pd}x{pc}): "
                             f"launch a multiple of {q} ranks")
    d = n // q
    if replicas is not None and replicas != d:
        raise JobConfigError(f"--replicas {replicas} x model group {q} needs {replicas * q} "
                             f"ranks, but the launcher started {n}")
    if batch % d:
        raise JobConfigError(f"global --batch {batch} is not divisible by the {d} "
                             f"data-parallel replicas")
    return d


def open_source(data, static, cfg_flags, config_file, n_time, seed, defaults=None):
    """(source, cfg): the data source and the model Config (grid and variables from the data,
    the other sizes from the flags, else the TOML file, else `defaults`)."""
    defaults = DEFAULTS if defaults is None else defaults
    from weathermixer.io.data import DataError, Era5Source
    from weathermixer.io.synthetic import SyntheticSource
    if data:
        try:
            source = Era5Source(list(data), static=static)
        except DataError as e:
            raise JobConfigError(str(e)) from None
        found = dict(n_lat=source.n_lat, n_lon=source.n_lon, n_prognostic=source.n_prognostic,
                     n_static=source.n_static)
        for field, value in found.items():
            given = cfg_flags.get(field)
            if given is not None and given != value:
                raise JobConfigError(f"--{field.replace('_', '-')} {given} disagrees with "
                                     f"{data[0]} ({value})")
        cfg = config_from_options(dict(defaults, **found), config_file,
                                  **dict(cfg_flags, **found))
        return source, cfg
    if static:
        raise JobConfigError("--static names channels of a --data file; none was given")
    cfg = config_from_options(defaults, config_file, **cfg_flags)
    return SyntheticSource(cfg.n_lat, cfg.n_lon, cfg.n_prognostic, cfg.n_static,
                           n_time=n_time, seed=seed), cfg


def normalisation(source, data, out_dir, grid):
    """Per-channel mean/std: read from <data>.stats.h5 (or the run directory's copy), else
    computed once by all ranks together (each streams every world-size-th time step) and
    stored beside the data (in the run directory when the data folder is read-only)."""
    from weathermixer.io.data import load_stats, merge_stats, partial_stats, save_stats
    from weathermixer.io.data import stats_path_for
    beside, fallback = stats_path_for(data[0]), os.path.join(out_dir, "normalization.h5")
    found = None
    if grid.is_root:
        found = next((p for p in (beside, fallback) if os.path.exists(p)), None)
    found = grid.world.bcast_json(found)
    if found:
        mean, std = load_stats(found, source.channels) if grid.is_root else (
            np.zeros(len(source.channels)), np.ones(len(source.channels)))
        mean, std = ops.broadcast(mean, grid.world), ops.broadcast(std, grid.world)
    else:
        part = partial_stats(source, grid.world.rank, grid.world.size)
        mean, std = merge_stats(*part, allreduce=lambda a: ops.allreduce_sum(a, grid.world,
                                                                             tag="stats"))
        if grid.is_root:
            os.makedirs(out_dir, exist_ok=True)
            for path in (beside, fallback):
                try:
                    save_stats(path, source.channels, mean, std)
                    break
                except OSError:
                    continue
    source.set_stats(mean, std)
    return {"channels": list(source.channels), "mean": mean.tolist(), "std": std.tolist()}


def checkpoint_header(path):
    """(cfg, meta) of the checkpoint at `path`; a bad file is a one-line error of the job."""
    from weathermixer.io import checkpoint as ckpt
    try:
        return ckpt.read_header(path)
    except ckpt.CheckpointError as e:
        raise JobConfigError(str(e)) from None


def stream_of(saved: dict, **given):
    """The options that define the sample stream (seed, rollout, batch), taken from a
    checkpoint's `extra` wherever the command line left them at their defaults."""
    ctx = click.get_current_context()
    return tuple(saved.get(name, value)
                 if ctx.get_parameter_source(name) == click.core.ParameterSource.DEFAULT
                 else value for name, value in given.items())


def make_layout(cfg, pd: int, pc: int, n: int, device: str, precision: str):
    """(layout, xp) of this rank, after checking that `cfg` can be cut over the grid."""
    try:
        check_splittable(cfg, pd, pc)
    except LayoutError as e:
        raise JobConfigError(str(e)) from None
    grid, xp = setup_parallel(pd, pc, n, device, precision)
    return Layout(cfg, grid), xp


def setup_parallel(pd: int, pc: int, n: int, device: str, precision: str):
    """(grid, xp): the process grid and the array module of this rank.

    On GPUs every rank takes GPU (node rank mod GPUs of the node) and the groups talk NCCL;
    where several ranks share a GPU (NCCL refuses that) they stage through host MPI instead.
    """
    use_gpu = device == "gpu" or (device == "auto" and xpmod.cupy_available())
    xp = xpmod.module("cupy") if use_gpu else np
    backend = "mpi"
    if use_gpu:
        local, on_node = node_placement() if n > 1 else (0, 1)
        gpus = xp.cuda.runtime.getDeviceCount()
        xp.cuda.Device(local % gpus).use()
        backend = "nccl" if on_node <= gpus else "mpi"
    xpmod.set_matmul_precision(xp, precision)
    grid = ProcessGrid.from_mpi(pd, pc, backend=backend) if n > 1 else ProcessGrid.serial()
    return grid, xp


@click.command()
@model_options
@click.option("--data", multiple=True, type=click.Path(dir_okay=False),
              help="HDF5 file(s) in the SPEC layout (repeat for several years); "
                   "synthetic data when none is given")
@click.option("--static", default="", help="comma-separated channel names that are "
                                          "input-only (all others are prognostic)")
@click.option("--jigsaw", "jigsaw", type=int, default=1, show_default=True,
              help="ranks per model group: 1, 2 (1x2) or 4 (2x2)")
@click.option("--grid", default=None, help="model group as DOMAINxCHANNEL, e.g. 2x1 (overrides --jigsaw)")
@click.option("--replicas", type=int, default=None,
              help="expected data-parallel replicas D (checked against the launcher)")
@click.option("--batch", type=int, default=4, show_default=True, help="global batch")
@click.option("--steps", type=int, default=150, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--clip", type=float, default=1.0, show_default=True,
              help="global gradient-norm clip (0: off)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32",
              show_default=True)
@click.option("--rollout", type=int, default=1, show_default=True,
              help="K: each step draws its latent rollout k from 1..K")
@click.option("--device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto",
              show_default=True)
@click.option("--precision", type=click.Choice(["tf32", "fp32"]), default="tf32",
              show_default=True, help="float32 GEMMs on GPUs: TF32 tensor cores or full fp32")
@click.option("--out", "out_dir", default="runs/default", show_default=True,
              help="run directory: last.h5, metrics.jsonl")
@click.option("--resume", type=click.Path(dir_okay=False), default=None,
              help="checkpoint to resume from (any layout)")
@click.option("--checkpoint-every", type=int, default=0, show_default=True)
@click.option("--log-every", type=int, default=10, show_default=True)
@click.option("--synthetic-steps", "n_time", type=int, default=96, show_default=True,
              help="length of the synthetic series")
def train(config, data, static, jigsaw, grid, replicas, batch, steps, lr, weight_decay, clip,
          seed, dtype, rollout, device, precision, out_dir, resume, checkpoint_every, log_every,
          n_time, **size_flags):
    """Train WeatherMixer (AdamW); the final checkpoint is OUT/last.h5."""
    resumed = None  # the checkpoint's model sizes are this run's defaults
    if resume:  # and its data stream continues: seed, rollout and batch as they were
        resumed, meta = checkpoint_header(resume)
        seed, rollout, batch = stream_of(meta["extra"], seed=seed, rollout=rollout, batch=batch)
    if min(batch, steps, rollout) < 1:
        raise JobConfigError("--batch, --steps and --rollout must be at least 1")
    pd, pc = grid_shape(jigsaw, grid)
    n = world_size()
    check_request(n, pd, pc, replicas, batch)
    static_names = [s for s in static.split(",") if s]
    source, cfg = open_source(data, static_names, size_flags, config, n_time, seed,
                              resumed.to_dict() if resumed else None)
    if resumed is not None and cfg != resumed:
        raise JobConfigError(f"--resume {resume}: the checkpoint holds {resumed}, but this run "
                             f"asks for {cfg}")
    layout, xp = make_layout(cfg, pd, pc, n, device, precision)
    pgrid = layout.grid
    extra = {"data": list(data), "static": static_names}
    if not data:
        extra["synthetic_steps"] = n_time
    if data:
        extra["normalization"] = normalisation(source, data, out_dir, pgrid)
    settings = TrainSettings(steps=steps, batch=batch, lr=lr, seed=seed, rollout=rollout,
                             clip=clip or None, weight_decay=weight_decay, dtype=dtype,
                             log_every=log_every, checkpoint_every=checkpoint_every,
                             out_dir=out_dir)
    if pgrid.is_root:
        click.echo(f"weathermixer train: {cfg.n_params():,} parameters, {pgrid.describe()}, "
                   f"{'GPU ' + precision if xp is not np else 'CPU'} {dtype}, global batch {batch}, "
                   f"data {', '.join(data) if data else 'synthetic'}")
    history = run_training(cfg, layout, source, settings, xp=xp, resume=resume, extra=extra)
    if pgrid.is_root and history:
        first, last = history[0]["loss"], history[-1]["loss"]
        click.echo(f"loss {first:.5f} -> {last:.5f}; checkpoint {os.path.join(out_dir, 'last.h5')}")
