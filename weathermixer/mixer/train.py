"""The training loop: sampling, rollout draw, tile reads, loss_and_grads, AdamW, checkpoints.

What a step sees depends only on (seed, step, global batch), never on the layout:
- samples: one seeded permutation of all valid (file, t) per epoch, the same on all ranks;
  step s takes positions s*B .. s*B + B - 1 of the stream of epochs, and replica r takes its
  B / n_dp consecutive positions of that global batch;
- rollout: k ~ U{1..K} drawn from a generator seeded by (seed, step);
- each rank reads only its tile of every sample (variables V_j and S_j, rows of band i), in a
  background thread one step ahead, so reading overlaps the step before it.

One step is in flight on the device: step n + 1 is queued before step n's loss is read back.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import signal
import sys
import threading
import time

import numpy as np

from weathermixer.autograd.xp import host_to_device
from weathermixer.mixer import state
from weathermixer.mixer.api import loss_array_and_grads
from weathermixer.mixer.optim import AdamW, ParamsInFlight, read_back
from weathermixer.mixer.params import init_params


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    steps: int = 100
    batch: int = 4  # global batch, split over the data-parallel replicas
    lr: float = 1e-3
    seed: int = 0
    rollout: int = 1  # K: k is drawn from 1..K each step
    clip: float | None = 1.0
    weight_decay: float = 0.0
    dtype: str = "float32"
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only the final DIR/last.h5
    out_dir: str = "runs/default"


def rollout_for_step(seed: int, step: int, max_rollout: int) -> int:
    """k in 1..K for `step`, a function of (seed, step) only."""
    return int(np.random.default_rng([seed, step, 0x0D11]).integers(1, max_rollout + 1))


class Sampler:
    """Global batches of sample positions: one seeded permutation per epoch."""

    def __init__(self, n_samples: int, global_batch: int, seed: int):
        self.n, self.batch, self.seed = n_samples, global_batch, seed

    def positions(self, step: int) -> np.ndarray:
        """[global_batch] indices into the sample list for `step`."""
        start = step * self.batch
        out = []
        for pos in range(start, start + self.batch):
            epoch, k = divmod(pos, self.n)
            out.append(self._permutation(epoch)[k])
        return np.asarray(out, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if getattr(self, "_epoch", None) != epoch:
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch, 0x5A4D]).permutation(self.n)
        return self._perm


def read_batch(source, samples, lead: int, layout):
    """This rank's tiles: x [B_loc, C_loc, h, W] and target [B_loc, V_loc, h, W] (float32)."""
    rows = layout.lat_rows
    x = np.stack([source.read_input(s, layout.input_channels, rows) for s in samples])
    t = np.stack([source.read_target(s, lead, layout.prognostic_channels, rows) for s in samples])
    return x, t


class Progress:
    """A one-line progress bar on rank 0 (a line every `every` steps where stdout is no TTY)."""

    def __init__(self, total: int, every: int, enabled: bool):
        self.total, self.every, self.enabled = total, max(1, every), enabled
        self.tty = sys.stdout.isatty()

    def update(self, step: int, loss: float, samples_per_s: float, k: int):
        if not self.enabled:
            return
        done = step + 1
        if not self.tty and done % self.every and done != self.total:
            return
        width = 24
        filled = int(width * done / self.total)
        line = (f"step {done:>6}/{self.total} [{'#' * filled}{'.' * (width - filled)}] "
                f"loss {loss:.5f}  {samples_per_s:8.2f} samples/s  k={k}")
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", flush=True)

    def close(self):
        if self.enabled and self.tty:
            print(flush=True)


class StopRequest:
    """SIGTERM, SIGINT or SIGUSR1 (what schedulers send before a time limit) set a flag instead
    of killing the process; the training loop agrees on it across all ranks after every step
    (MAX over the world), so every rank stops after the same step and saves one checkpoint."""
    SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name)
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(cfg, layout, source, settings: TrainSettings, xp=np, resume: str | None = None,
          extra: dict | None = None) -> list[dict]:
    """Run optimizer steps up to `settings.steps`; returns the per-step records (rank 0 logs
    them to DIR/metrics.jsonl and writes DIR/last.h5 at the end). A stop signal on any rank
    ends the run on every rank after the current step, with the checkpoint written."""
    grid, s = layout.grid, settings
    opt = AdamW(lr=s.lr, weight_decay=s.weight_decay, clip_norm=s.clip)
    if resume:
        params, meta = state.load(resume, layout, s.dtype, xp, optimizer=opt)
        start = meta["step"]
    else:
        params, start = init_params(cfg, seed=s.seed, dtype=s.dtype, layout=layout, xp=xp), 0
    params = ParamsInFlight(params)  # a step's last gathers run beside the next forward
    samples = source.samples(max_lead=s.rollout)
    sampler = Sampler(len(samples), s.batch, s.seed)
    b_loc = s.batch // grid.n_dp
    lat_w = source.lat_weights()
    log = None
    if grid.is_root:
        os.makedirs(s.out_dir, exist_ok=True)
        log = open(os.path.join(s.out_dir, "metrics.jsonl"), "a")
    progress = Progress(s.steps, s.log_every, grid.is_root)
    extra = dict(extra or {}, seed=s.seed, rollout=s.rollout, batch=s.batch)

    to_device = host_to_device(xp)

    def load(step: int):
        """(k, x, target) of `step`: this rank's tiles of this replica's samples, already on
        the device (read and copied by the reader thread while the step before runs)."""
        k = rollout_for_step(s.seed, step, s.rollout)
        mine = sampler.positions(step)[grid.replica * b_loc:(grid.replica + 1) * b_loc]
        return (k,) + to_device(*read_batch(source, samples[mine], k, layout))

    reader = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # reads step + 1 during step
    pending = {start: reader.submit(load, start)} if start < s.steps else {}

    def queue_step(step: int) -> tuple:
        """Queue step `step` on the device; its numbers stay there until `finish`."""
        k, x, target = pending.pop(step).result()
        if step + 1 < s.steps:
            pending[step + 1] = reader.submit(load, step + 1)
        loss, grads = loss_array_and_grads(params, x, target, cfg, rollout=k,
                                           lat_weights=lat_w, layout=layout,
                                           cut_over_data=True)  # each replica's part
        stats = {"loss": loss, **opt.step(params, grads, layout)}
        done_at = time.perf_counter() if xp is np else None  # host arrays: the step is done
        return step, k, stats, done_at

    history, done, last_read = [], start, time.perf_counter()

    def finish(queued: tuple):
        """Read a queued step's numbers back (the wait for the device) and log them. Its
        seconds run from the end of the step before it: on a device, each end is the
        read-back, so they are the steady step time; on the host, where a step's work is
        done when it is queued, each end is the moment it was."""
        nonlocal done, last_read
        step, k, stats, done_at = queued
        stats = read_back(stats)
        stats["skipped"] = bool(stats["skipped"])
        now = time.perf_counter() if done_at is None else done_at
        record = {"step": step + 1, **stats, "rollout": k, "seconds": now - last_read}
        last_read, done = now, step + 1
        history.append(record)
        if log:
            log.write(json.dumps(record) + "\n")
            log.flush()
        progress.update(step, record["loss"], s.batch / record["seconds"], k)

    # One step in flight: step n + 1 is queued before step n's numbers are read back, so the
    # device never waits for the host between steps. What is decided between steps (stop,
    # checkpoint) needs no device numbers; it waits for the step in flight only when it acts.
    in_flight = None
    with StopRequest() as stop:
        try:
            for step in range(start, s.steps):
                if step > start:
                    stopping = grid.world.agree(stop.requested, op="max")  # any rank: all stop
                    saving = bool(s.checkpoint_every) and step % s.checkpoint_every == 0
                    if stopping or saving:
                        finish(in_flight)
                        in_flight = None
                    if stopping:
                        if grid.is_root:
                            print(f"\nstop requested: ending after step {done}", flush=True)
                        break
                    if saving:
                        state.save(os.path.join(s.out_dir, "last.h5"), params, cfg, layout, opt,
                                   done, extra)
                queued = queue_step(step)
                if in_flight is not None:
                    finish(in_flight)
                in_flight = queued
            if in_flight is not None:
                finish(in_flight)
        finally:
            reader.shutdown(cancel_futures=True)
            progress.close()
            if log:
                log.close()
    state.save(os.path.join(s.out_dir, "last.h5"), params, cfg, layout, opt, done, extra)
    return history

