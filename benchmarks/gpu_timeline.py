"""When the collectives of a training step run, against the compute around them.

    mpiexec -n 2 python benchmarks/gpu_timeline.py [--grid DxC] [--batch B] [--model c1]
                                                   [--trace out.json]

Runs the step of `weathermixer bench` under PyTorch's profiler (CUPTI sees CuPy's and NCCL's
kernels) and prints, for every rank: the step's span, its GEMM, other compute and NCCL kernel
time, the NCCL time with no compute beside it, and the time with no kernel at all (the device
waiting for the host or for the other rank); then rank 0's NCCL kernels, each with its start,
length and the part of it that ran beside compute kernels. Benchmark-only: the package never imports torch.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_benchmark import MODELS  # noqa: E402
import weathermixer as wm  # noqa: E402
from weathermixer.cli.train import make_layout  # noqa: E402
from weathermixer.mixer.api import loss_array_and_grads  # noqa: E402
from weathermixer.mixer.bench import seconds  # noqa: E402
from weathermixer.mixer.optim import AdamW, ParamsInFlight  # noqa: E402
from weathermixer.mixer.params import init_params  # noqa: E402


def merged(intervals):
    out = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def overlap(a, b, busy):
    return sum(max(0.0, min(b, y) - max(a, x)) for x, y in busy)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="c1", choices=sorted(MODELS))
    ap.add_argument("--grid", default="1x1")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--trace", default=None)
    ap.add_argument("--top", type=int, default=0,
                    help="also print rank 0's N costliest compute kernels and N longest idle gaps")
    ap.add_argument("--sites", type=int, default=0,
                    help="then profile one more step with Python stacks and print rank 0's N "
                         "costliest (kernel, launching line of the package) pairs, GEMMs aside")
    a = ap.parse_args()
    from mpi4py import MPI
    from torch.profiler import ProfilerActivity, profile
    cfg = wm.Config(**MODELS[a.model])
    pd, pc = (int(v) for v in a.grid.split("x"))
    layout, xp = make_layout(cfg, pd, pc, MPI.COMM_WORLD.Get_size(), "gpu", "tf32")
    grid = layout.grid
    params = ParamsInFlight(init_params(cfg, seed=0, dtype="float32", layout=layout, xp=xp))
    b_loc = a.batch // grid.n_dp
    rng = np.random.default_rng(grid.world.rank)
    h, nc, nv = layout.n_lat_local, len(layout.input_channels), len(layout.prognostic_channels)
    x = xp.asarray(rng.standard_normal((b_loc, nc, h, cfg.n_lon), dtype=np.float32))
    t = xp.asarray(rng.standard_normal((b_loc, nv, h, cfg.n_lon), dtype=np.float32))
    opt = AdamW(lr=1e-5, clip_norm=1.0)

    def step():
        _, grads = loss_array_and_grads(params, x, t, cfg, layout=layout, cut_over_data=True)
        opt.step(params, grads, layout)

    for _ in range(2):
        step()
    xp.cuda.Device().synchronize()
    grid.world.barrier()
    ms = 1e3 * float(np.median([seconds(xp, step) for _ in range(3)]))
    with profile(activities=[ProfilerActivity.CUDA]):  # the profiler's own start-up, untimed
        step()
        xp.cuda.Device().synchronize()
    grid.world.barrier()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        xp.cuda.Device().synchronize()  # this rank's GPU (torch's current device is GPU 0)
    path = a.trace if (a.trace and grid.world.rank == 0) else tempfile.mktemp(suffix=".json")
    prof.export_chrome_trace(path)
    events = [e for e in json.load(open(path))["traceEvents"]
              if e.get("cat") == "kernel" and "dur" in e]
    summary, nccl_rows = summarise(events)
    site_events = None
    if a.sites:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA],
                     with_stack=True) as prof:
            step()
            xp.cuda.Device().synchronize()
        prof.export_chrome_trace(path)
        site_events = json.load(open(path))["traceEvents"]
    summary["step_ms"] = ms
    rows = grid.world.gather_json(summary)
    if grid.world.rank != 0:
        return
    print(f"grid {a.grid}, batch {a.batch}; ms of one profiled step per rank (busy: union of "
          f"kernels; exposed NCCL: NCCL with no compute kernel beside it; idle: no kernel)")
    keys = ["step_ms", "span", "gemm", "other", "nccl", "nccl_exposed", "idle"]
    print("rank " + " ".join(f"{k:>13}" for k in keys))
    for r, row in enumerate(rows):
        print(f"{r:>4} " + " ".join(f"{row[k]:>13.2f}" for k in keys))
    if a.top:
        print_top(events, a.top)
    if a.sites:
        print_sites(site_events, a.sites)
    print("rank 0's NCCL kernels:")
    print(f"{'start ms':>9} {'ms':>7} {'beside compute ms':>18} stream  kernel")
    for row in nccl_rows:
        print(row)


def summarise(events):
    """Per-category device ms of one step's kernels, and rank 0's NCCL kernel lines."""
    nccl = [e for e in events if "nccl" in e["name"].lower()]
    compute = [e for e in events if "nccl" not in e["name"].lower()]
    busy = merged([(e["ts"], e["ts"] + e["dur"]) for e in compute])
    anything = merged([(e["ts"], e["ts"] + e["dur"]) for e in events])
    t0 = min(e["ts"] for e in events)
    end = max(e["ts"] + e["dur"] for e in events)
    gemm = sum(e["dur"] for e in compute if "gemm" in e["name"].lower())
    exposed = sum(e["dur"] - overlap(e["ts"], e["ts"] + e["dur"], busy) for e in nccl)
    summary = {"span": (end - t0) / 1e3, "gemm": gemm / 1e3,
               "other": (sum(e["dur"] for e in compute) - gemm) / 1e3,
               "nccl": sum(e["dur"] for e in nccl) / 1e3, "nccl_exposed": exposed / 1e3,
               "idle": (end - t0 - sum(y - x for x, y in anything)) / 1e3}
    lines = [f"{(e['ts'] - t0) / 1e3:>9.2f} {e['dur'] / 1e3:>7.2f} "
             f"{overlap(e['ts'], e['ts'] + e['dur'], busy) / 1e3:>18.2f} "
             f"{e.get('args', {}).get('stream', '?'):>6}  {e['name'][:60]}" for e in nccl]
    return summary, lines

def print_sites(trace, n):
    """Each non-GEMM, non-NCCL kernel charged to the innermost frame of the package that was
    running when the host launched it (CUPTI correlation ids tie a kernel to its launch)."""
    launches = {e["args"]["correlation"]: e for e in trace
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in
                e.get("args", {})}
    frames = sorted((e["ts"], e["ts"] + e["dur"], e["tid"], e["name"]) for e in trace
                    if e.get("cat") == "python_function" and "weathermixer" in e["name"]
                    and "dur" in e)
    totals = {}
    for k in trace:
        name = k.get("name", "").lower()
        if k.get("cat") != "kernel" or "gemm" in name or "nccl" in name:
            continue
        launch = launches.get(k.get("args", {}).get("correlation"))
        site = "?"
        if launch is not None:
            t, tid = launch["ts"], launch["tid"]
            inner = [f for f in frames if f[0] <= t <= f[1] and f[2] == tid]
            if inner:  # the innermost two frames of the package
                site = " < ".join(f[3].split("weathermixer/")[-1] for f in sorted(inner)[::-1][:2])
        key = (k["name"][:40], site[:110])
        c, ms = totals.get(key, (0, 0.0))
        totals[key] = (c + 1, ms + k["dur"] / 1e3)
    print(f"rank 0's costliest kernels by launching line (GEMMs and NCCL aside):\n"
          f"{'count':>6} {'ms':>8}  kernel | line")
    for (kname, site), (c, ms) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:n]:
        print(f"{c:>6} {ms:>8.2f}  {kname} | {site}")


def print_top(events, n):
    """Rank 0's costliest compute kernels (by name: count, total ms) and its longest gaps with
    no kernel (start ms, length ms, the kernels either side)."""
    totals = {}
    for e in events:
        if "nccl" not in e["name"].lower():
            c, t = totals.get(e["name"][:70], (0, 0.0))
            totals[e["name"][:70]] = (c + 1, t + e["dur"] / 1e3)
    print(f"rank 0's costliest compute kernels:\n{'count':>6} {'ms':>8}  kernel")
    for name, (c, t) in sorted(totals.items(), key=lambda kv: -kv[1][1])[:n]:
        print(f"{c:>6} {t:>8.2f}  {name}")
    ev = sorted(events, key=lambda e: e["ts"])
    t0, gaps, end = ev[0]["ts"], [], ev[0]["ts"] + ev[0]["dur"]
    for prev_i, e in enumerate(ev[1:]):
        if e["ts"] > end:
            gaps.append((e["ts"] - end, end, ev[prev_i]["name"][:40], e["name"][:40]))
        end = max(end, e["ts"] + e["dur"])
    print(f"rank 0's idle gaps: {len(gaps)}, {sum(g[0] for g in gaps) / 1e3:.2f} ms; "
          f"{sum(g[0] for g in gaps if g[0] < 20) / 1e3:.2f} ms in gaps under 20 us; longest:")
    for g, at, before, after in sorted(gaps, reverse=True)[:n]:
        print(f"{(at - t0) / 1e3:>9.2f} {g / 1e3:>7.3f}  after {before} | before {after}")


if __name__ == "__main__":
    main()
