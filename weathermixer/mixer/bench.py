"""Measured cost of a training step on a layout: memory held, bytes sent, time split.

`run_bench` times `loss_and_grads` + AdamW for a config on this rank's layout after warm-up
steps, and reports per rank: parameter bytes held (and their fraction of the 1-way total),
bytes sent per step by each communication operator (from `jigsaw.backend.COMM_LOG`), and the
time per step split into communication (inside collectives) and compute (the rest).

Achieved FLOP/s counts 2 m n k per GEMM of the forward pass and 3x that for a training step.
"""
from __future__ import annotations

import time

import numpy as np

from weathermixer.autograd.xp import synchronize
from weathermixer.jigsaw.backend import COMM_LOG
from weathermixer.mixer.api import loss_and_grads
from weathermixer.mixer.optim import AdamW
from weathermixer.mixer.params import init_params


def forward_flops(cfg, batch: int, rollout: int = 1) -> float:
    """2 m n k summed over the forward GEMMs of SPEC.md, for `batch` samples."""
    T, E, Mt, Mc, P = (cfg.n_tokens, cfg.embed_dim, cfg.token_hidden_dim,
                       cfg.channel_hidden_dim, cfg.n_prognostic)
    encoder = 2 * T * cfg.patch_dim * E
    block = 2 * (2 * T * Mt * E) + 2 * (2 * T * E * Mc)
    decoder = 2 * T * 2 * E * cfg.recovery_dim
    head = 2 * cfg.n_lat * cfg.n_lon * 2 * P * P
    return float(batch) * (encoder + rollout * cfg.n_blocks * block + decoder + head)


def run_bench(cfg, layout, batch: int, steps: int, warmup: int, dtype: str, xp=np,
              rollout: int = 1, seed: int = 0) -> dict:
    """This rank's measurements (see the module docstring); `batch` is the global batch."""
    grid = layout.grid
    params = init_params(cfg, seed=seed, dtype=dtype, layout=layout, xp=xp)
    b_loc = batch // grid.n_dp
    rng = np.random.default_rng([seed, grid.world.rank])
    h, nc, nv = layout.n_lat_local, len(layout.input_channels), len(layout.prognostic_channels)
    x = xp.asarray(rng.normal(size=(b_loc, nc, h, cfg.n_lon)).astype(dtype))
    target = xp.asarray(rng.normal(size=(b_loc, nv, h, cfg.n_lon)).astype(dtype))
    opt = AdamW(lr=1e-4, clip_norm=1.0)

    def step():
        _, grads = loss_and_grads(params, x, target, cfg, rollout=rollout, layout=layout)
        opt.step(params, grads, layout)

    for _ in range(warmup):
        step()
    synchronize(xp)
    grid.world.barrier()
    COMM_LOG.reset()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        synchronize(xp)
        times.append(time.perf_counter() - t0)
    held = sum(int(p.nbytes) for p in params.values())
    total = cfg.n_params() * np.dtype(dtype).itemsize
    per_step = float(np.median(times))
    comm = COMM_LOG.total_seconds / steps
    return {
        "rank": grid.world.rank, "grid": f"{grid.pd}x{grid.pc}", "replicas": grid.n_dp,
        "param_bytes": held, "param_fraction": held / total,
        "seconds_per_step": per_step, "comm_seconds_per_step": comm,
        "compute_seconds_per_step": max(per_step - comm, 0.0),
        "bytes_sent_per_step": {k: v / steps for k, v in sorted(COMM_LOG.bytes_sent.items())},
        "tflops_per_rank": 3 * forward_flops(cfg, b_loc, rollout) / grid.model_size
                           / per_step / 1e12,
    }
