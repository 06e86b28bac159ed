"""Measured cost of a training step on a layout: time, rate, memory held, bytes sent.

`run_bench` builds this rank's blocks of a model, then after warm-up times (median of
`steps` repeats; CUDA events on GPUs, the host clock on CPUs):

    forward   predict
    backward  loss_and_grads minus forward
    step      loss_and_grads + AdamW, the training step, timed as `train` runs it: one step
              in flight, each step's numbers read back once the next one is queued, so the
              device does not wait for the host between steps (with replicas each updates
              its part of the parameters and gathers the rest)

With replicas (n_dp > 1) it also times the same step of each replica alone, its `data` group
made a group of one (`solo_layout`: no gradient crosses replicas), in the same processes on the
same GPUs, right after the timed steps: `solo_step_ms`, and `dp_efficiency` = solo / step,
the data-parallel efficiency without a separate 1-GPU run to divide by. Over all ranks,
`data_parallel_efficiency` compares the replicas' throughput stepping together with their
throughput each stepping alone.

It reports per rank: ms per step, achieved TFLOP/s (2 m n k per GEMM of the forward pass,
3x that for a step, divided over the ranks of a model group), the same against the rate of
one large GEMM measured in the same run, the share of the step spent inside collectives
(from a second series of steps in which every collective waits for the device and is timed
on its own; the step time comes from the first series, where nothing waits), parameter bytes
held (and their fraction of the 1-way total), bytes sent per step by each operator, and peak
device memory: what the CuPy pool holds (like PyTorch's max_memory_reserved) and the most
that live arrays used during one step (like max_memory_allocated); and how each group's
device arrays travel (`transport`: NCCL kernels, copy engines, MPI).
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from weathermixer.autograd.xp import synchronize
from weathermixer.jigsaw.backend import COMM_LOG, LocalGroup
from weathermixer.mixer.api import loss_array_and_grads, predict
from weathermixer.mixer.layout import Layout
from weathermixer.mixer.optim import AdamW, ParamsInFlight, read_back
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


def seconds(xp, fn) -> float:
    """Wall time of fn(): CUDA events on the current stream for CuPy, the host clock else."""
    if xp is np:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    start, end = xp.cuda.Event(), xp.cuda.Event()
    start.record()
    fn()
    end.record()
    end.synchronize()
    return xp.cuda.get_elapsed_time(start, end) / 1e3


def steady_step_seconds(xp, step, n: int) -> list:
    """Seconds of each of n steps run as `train` runs them: step() queues a step and returns
    its numbers, still on the device, which are read back once the next step is queued.
    CUDA events between the steps; one more step first, so that each timed one starts with
    the device already busy (its first interval would hold the host's start-up). The host
    clock on CPUs, where every step completes before it returns."""
    if xp is np:
        return [seconds(xp, lambda: read_back(step())) for _ in range(n)]
    marks, in_flight = [], None
    for _ in range(n + 1):
        marks.append(xp.cuda.Event())
        marks[-1].record()
        queued = step()
        if in_flight is not None:
            read_back(in_flight)
        in_flight = queued
    marks.append(xp.cuda.Event())
    marks[-1].record()
    read_back(in_flight)
    marks[-1].synchronize()
    return [xp.cuda.get_elapsed_time(a, b) / 1e3 for a, b in zip(marks[1:-1], marks[2:])]


def gemm_tflops(xp, dtype: str, n: int, repeats: int = 5) -> float:
    """Rate of one n x n x n matrix product in `dtype` (the precision set for the run)."""
    rng = np.random.default_rng(0)
    a = xp.asarray(rng.standard_normal((n, n)).astype(dtype))
    b = xp.asarray(rng.standard_normal((n, n)).astype(dtype))
    a @ b
    synchronize(xp)
    return 2.0 * n ** 3 / float(np.median([seconds(xp, lambda: a @ b) for _ in range(repeats)])) / 1e12


def peak_device_bytes(xp) -> int:
    """High-water mark of the CuPy memory pool (it keeps what it once took); 0 on CPUs."""
    return 0 if xp is np else int(xp.get_default_memory_pool().total_bytes())


def peak_in_use_bytes(xp, fn) -> int:
    """The most device memory live arrays held while fn() ran (a CuPy memory hook sees every
    allocation); 0 on CPUs."""
    if xp is np:
        fn()
        return 0
    pool = xp.get_default_memory_pool()
    peak = [pool.used_bytes()]

    class Peak(xp.cuda.MemoryHook):
        name = "weathermixer_peak"

        def malloc_postprocess(self, **kwargs):
            peak[0] = max(peak[0], pool.used_bytes())

    with Peak():
        fn()
    return peak[0]


def solo_layout(layout) -> Layout:
    """`layout` for one replica alone: its `data` group a group of one, so no gradient
    crosses replicas. Each replica still divides its loss by the global batch, so the step
    does the same work as in the data-parallel run, less the gradient sums."""
    return Layout(layout.cfg, dataclasses.replace(layout.grid, data=LocalGroup("data")))


def run_bench(cfg, layout, batch: int, steps: int, warmup: int, dtype: str, xp=np,
              rollout: int = 1, seed: int = 0, gemm_size: int | None = None) -> dict:
    """This rank's measurements (see the module docstring); `batch` is the global batch."""
    grid = layout.grid
    params = ParamsInFlight(init_params(cfg, seed=seed, dtype=dtype, layout=layout, xp=xp))
    b_loc = batch // grid.n_dp
    rng = np.random.default_rng([seed, grid.world.rank])
    h, nc, nv = layout.n_lat_local, len(layout.input_channels), len(layout.prognostic_channels)
    x = xp.asarray(rng.standard_normal((b_loc, nc, h, cfg.n_lon)).astype(dtype))
    target = xp.asarray(rng.standard_normal((b_loc, nv, h, cfg.n_lon)).astype(dtype))
    opt = AdamW(lr=1e-5, clip_norm=1.0)

    def forward():
        predict(params, x, cfg, rollout=rollout, layout=layout)

    def gradients(lay=layout):
        return loss_array_and_grads(params, x, target, cfg, rollout=rollout, layout=lay,
                                    cut_over_data=True)

    def step(lay=layout, optimizer=opt):  # moments cut over the replicas of `lay`
        loss, grads = gradients(lay)
        return {"loss": loss, **optimizer.step(params, grads, lay)}  # still on the device

    for _ in range(warmup):
        step()
    synchronize(xp)
    grid.world.barrier()
    t_fwd = float(np.median([seconds(xp, forward) for _ in range(steps)]))
    t_grad = float(np.median([seconds(xp, gradients) for _ in range(steps)]))
    t_step = float(np.median(steady_step_seconds(xp, step, steps)))
    t_solo = None
    if grid.n_dp > 1:
        solo = solo_layout(layout)
        solo_opt = AdamW(lr=1e-5, clip_norm=1.0)  # moments of whole blocks, dropped after
        step(solo, solo_opt)
        grid.world.barrier()
        t_solo = float(np.median(steady_step_seconds(xp, lambda: step(solo, solo_opt),
                                                     steps)))
        del solo_opt
    COMM_LOG.reset()  # then the same steps again, each collective timed on its own
    COMM_LOG.synchronize = True
    t_timed = sum(seconds(xp, step) for _ in range(steps))
    COMM_LOG.synchronize = False
    share = COMM_LOG.total_seconds / t_timed
    comm = share * t_step
    sent = {k: v / steps for k, v in sorted(COMM_LOG.bytes_sent.items())}
    in_use = peak_in_use_bytes(xp, step)
    peak = peak_device_bytes(xp)
    gemm = gemm_tflops(xp, dtype, gemm_size or (8192 if xp is not np else 1024))
    held = sum(int(p.nbytes) for p in params.values())
    rate = 3 * forward_flops(cfg, b_loc, rollout) / grid.model_size / t_step / 1e12
    return {
        "rank": grid.world.rank, "grid": f"{grid.pd}x{grid.pc}", "replicas": grid.n_dp,
        "replica": grid.replica,
        "device": "gpu" if xp is not np else "cpu",
        "forward_ms": 1e3 * t_fwd, "backward_ms": 1e3 * (t_grad - t_fwd), "step_ms": 1e3 * t_step,
        "seconds_per_step": t_step, "comm_seconds_per_step": comm,
        "solo_step_ms": None if t_solo is None else 1e3 * t_solo,
        "dp_efficiency": None if t_solo is None else t_solo / t_step,
        "compute_seconds_per_step": t_step - comm, "comm_share": share,
        "tflops_per_rank": rate, "gemm_tflops": gemm, "gemm_fraction": rate / gemm,
        "peak_device_bytes": peak, "peak_in_use_bytes": in_use,
        "param_bytes": held, "param_fraction": held / (cfg.n_params() * np.dtype(dtype).itemsize),
        "bytes_sent_per_step": sent,
        "transport": {name: grid.group(name).transport() for name in ("domain", "channel", "data")},
    }


def data_parallel_efficiency(rows) -> float | None:
    """From every rank's row: n_dp / step (the replicas stepping together, as fast as the
    slowest rank) over the sum over replicas of 1 / solo step (each replica alone, as fast as
    its slowest rank). 1 is perfect scaling; GPUs of unequal speed count as they are. None
    with one replica."""
    if rows[0]["solo_step_ms"] is None:
        return None
    solo = {}
    for r in rows:
        solo[r["replica"]] = max(solo.get(r["replica"], 0.0), r["solo_step_ms"])
    return len(solo) / max(r["step_ms"] for r in rows) / sum(1 / s for s in solo.values())
