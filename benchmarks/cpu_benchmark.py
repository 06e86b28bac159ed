"""CPU timing: `weathermixer.loss_and_grads` (numpy, float32) against the PyTorch reference.

One process, one machine, the same thread count for both: numpy's BLAS (via threadpoolctl
where available) and torch's intra-op pool. Each side is warmed up, then timed `--repeats`
times; the median ms per call (forward + backward + loss, gradients of every parameter) is
reported with the ratio ours / torch.

    python benchmarks/cpu_benchmark.py                       # the mid-size config below
    python benchmarks/cpu_benchmark.py --json out.json       # also write the figures as JSON
    python benchmarks/cpu_benchmark.py --json -              # JSON only, on stdout
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/cpu_benchmark.py

Mid-size config: 32 x 64 grid, patch 1 x 4 (T = 512 tokens, K = 24), P = 5 prognostic +
S = 1 static, E = 256, Mt = 256, Mc = 512, 3 blocks, batch 4, rollout 1.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_reference as tr  # noqa: E402

import weathermixer as wm
from weathermixer.autograd.xp import tune_host_allocator  # noqa: E402

CONFIGS = {
    "mid": dict(n_lat=32, n_lon=64, n_prognostic=5, n_static=1, patch_lat=1, patch_lon=4,
                embed_dim=256, token_hidden_dim=256, channel_hidden_dim=512, n_blocks=3),
    "small": dict(n_lat=8, n_lon=16, n_prognostic=3, n_static=1, patch_lat=1, patch_lon=4,
                  embed_dim=32, token_hidden_dim=16, channel_hidden_dim=64, n_blocks=2),
}
ENV_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
            "MKL_NUM_THREADS", "NVPL_BLAS_DEBUG_CPU_TYPE", "MALLOC_MMAP_THRESHOLD_",
            "MALLOC_TRIM_THRESHOLD_")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_revision() -> str:
    """git commit of the weathermixer that was imported (+ '-dirty' if its files differ)."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(wm.__file__)))
    try:
        rev = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], text=True,
                             capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "weathermixer"],
                               text=True, capture_output=True, check=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def torch_blas() -> str:
    cfg = torch.__config__.show()
    for key in ("BLAS_INFO=",):
        if key in cfg:
            return cfg.split(key, 1)[1].split(",", 1)[0].strip()
    return "unknown"


def blas_info(threads: int | None):
    """(description of numpy's BLAS, a threadpoolctl limiter context or None)."""
    try:
        import threadpoolctl
    except ImportError:
        try:
            blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        except Exception:  # old numpy: no dict mode
            blas = {}
        return {"source": "numpy.show_config (threadpoolctl not installed: BLAS threads not "
                          "set)", "name": blas.get("name"), "version": blas.get("version")}, None
    limiter = threadpoolctl.threadpool_limits(threads, user_api="blas") if threads else None
    info = [dict(prefix=i.get("prefix"), version=i.get("version"), num_threads=i["num_threads"],
                 architecture=i.get("architecture"), threading=i.get("threading_layer"))
            for i in threadpoolctl.threadpool_info() if i.get("user_api") == "blas"
            and "numpy" in i.get("filepath", "")]
    return {"source": "threadpoolctl", "libraries": info}, limiter


class OtherLoad:
    """CPU time used by *other* processes while the benchmark runs, as a fraction of the
    machine (Linux /proc/stat minus this process's os.times()). Timings taken while another
    job shares the cores are not comparable; the figure is printed and stored with them."""

    def __init__(self):
        self.t0 = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                v = [int(a) for a in f.readline().split()[1:]]
        except OSError:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        busy = (sum(v[:8]) - v[3] - v[4]) / hz  # all but idle and iowait (guest is in user)
        own = os.times()
        return busy, own.user + own.system, time.perf_counter()

    def fraction(self) -> float | None:
        t1 = self._sample()
        if t1 is None or self.t0 is None:
            return None
        busy, own, wall = (b - a for a, b in zip(self.t0, t1))
        return max(0.0, (busy - own) / (wall * (os.cpu_count() or 1)))


def _ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_pair(fa, fb, warmup: int, repeats: int, schedule: str, rounds: int):
    """ms per call of fa and fb.

    'blocked' (default): `rounds` times, warm up and time `repeats` calls of a, pause, then the
    same for b; a pause lets the other library's worker threads stop spinning (OpenBLAS
    pthreads and torch's OpenMP threads busy-wait after a parallel region, and on 2 cores a
    spinning thread of one library slows the other one badly). Several rounds spread a drift of
    the machine's speed (a shared VM) over both.
    'interleaved': a, b, a, b, ... (shows that cross-library spinning; not a fair comparison)."""
    if schedule == "interleaved":
        for _ in range(warmup):
            fa()
            fb()
        ta, tb = [], []
        for _ in range(repeats * rounds):
            ta.append(_ms(fa))
            tb.append(_ms(fb))
        return ta, tb
    ta, tb = [], []
    for _ in range(rounds):
        for f, t in ((fa, ta), (fb, tb)):
            time.sleep(0.5)
            for _ in range(warmup):
                f()
            t.extend(_ms(f) for _ in range(repeats))
    return ta, tb


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="mid")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rollout", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10, help="timed calls per round and side")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (ours, torch)")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for both (default: torch's default, numpy's BLAS set to match)")
    ap.add_argument("--schedule", choices=("blocked", "interleaved"), default="blocked")
    ap.add_argument("--compile", action="store_true", help="torch.compile the reference")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON ('-': stdout only)")
    ap.add_argument("--no-allocator-tuning", action="store_true",
                    help="leave glibc malloc as it is (the weathermixer CLI tunes it)")
    args = ap.parse_args(argv)
    quiet = args.json == "-"
    allocator_tuned = False if args.no_allocator_tuning else tune_host_allocator()

    def say(*a):
        if not quiet:
            print(*a, flush=True)

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    blas, limiter = blas_info(threads)  # numpy's BLAS limited to torch's count

    cfg = wm.Config(**CONFIGS[args.config])
    rng = np.random.default_rng(0)
    params = wm.init_params(cfg, seed=0, dtype="float32")
    B = args.batch
    x = rng.standard_normal((B, cfg.n_vars, cfg.n_lat, cfg.n_lon), dtype=np.float32)
    target = rng.standard_normal((B, cfg.n_prognostic, cfg.n_lat, cfg.n_lon), dtype=np.float32)
    lat = np.linspace(-87.1875, 87.1875, cfg.n_lat)
    lat_w = (np.cos(np.deg2rad(lat)) / np.cos(np.deg2rad(lat)).mean()).astype(np.float32)

    model = tr.build(cfg, params, device="cpu", dtype=torch.float32, compile=args.compile)
    xt, tt, lwt = torch.from_numpy(x), torch.from_numpy(target), torch.from_numpy(lat_w)

    def ours():
        return wm.loss_and_grads(params, x, target, cfg, rollout=args.rollout,
                                 lat_weights=lat_w)[0]

    def theirs():
        tr.zero_grad(model)
        loss = tr.loss_fn(model, xt, tt, args.rollout, lwt, None)
        loss.backward()
        return loss.item()

    l_ours, l_torch = ours(), theirs()
    say(f"weathermixer {wm.__version__} ({package_revision()}), numpy {np.__version__}, "
        f"torch {torch.__version__}, CPU {cpu_model()} x {os.cpu_count()}")
    say(f"config {args.config}: {cfg}, batch {B}, rollout {args.rollout}, float32")
    say(f"T={cfg.n_tokens} K={cfg.patch_dim} params={cfg.n_params():,}")
    say(f"threads: torch {threads} (BLAS {torch_blas()}), numpy BLAS {blas}")
    say("env: " + ", ".join(f"{k}={os.environ[k]}" for k in ENV_VARS if k in os.environ))
    say(f"loss ours {l_ours:.7g}, torch {l_torch:.7g} (rel diff {abs(l_ours - l_torch) / abs(l_torch):.1e})")

    load = OtherLoad()
    t_ours, t_torch = time_pair(ours, theirs, args.warmup, args.repeats, args.schedule,
                               args.rounds)
    m_ours, m_torch = statistics.median(t_ours), statistics.median(t_torch)
    say(f"weathermixer.loss_and_grads (numpy): {m_ours:8.1f} ms  "
        f"(min {min(t_ours):.1f}, max {max(t_ours):.1f}, n={len(t_ours)})")
    say(f"torch reference fwd+bwd{' (compiled)' if args.compile else ''}:    {m_torch:8.1f} ms  "
        f"(min {min(t_torch):.1f}, max {max(t_torch):.1f}, n={len(t_torch)})")
    say(f"ratio ours/torch: {m_ours / m_torch:.2f}  (glibc malloc tuned for both: {allocator_tuned})")
    other = load.fraction()
    if other is not None:
        say(f"other processes used {other * 100:.1f}% of the machine during the timing"
            + ("  ** WARNING: machine not quiet, timings unreliable **" if other > 0.03 else ""))

    result = {
        "date": datetime.date.today().isoformat(), "cpu": cpu_model(), "cores": os.cpu_count(),
        "python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
        "weathermixer": wm.__version__, "weathermixer_revision": package_revision(), "env": {k: os.environ.get(k) for k in ENV_VARS},
        "torch_threads": threads, "numpy_blas": blas, "torch_blas": torch_blas(), "config": cfg.to_dict(),
        "config_name": args.config, "batch": B, "rollout": args.rollout, "dtype": "float32",
        "torch_compile": args.compile, "schedule": args.schedule, "warmup": args.warmup, "repeats": args.repeats,
        "rounds": args.rounds,
        "loss_ours": l_ours, "loss_torch": l_torch,
        "ms_ours": t_ours, "ms_torch": t_torch, "median_ms_ours": m_ours,
        "median_ms_torch": m_torch, "ratio_ours_over_torch": m_ours / m_torch,
        "other_processes_cpu_fraction": other, "host_allocator_tuned": allocator_tuned,
    }
    if args.json == "-":
        print(json.dumps(result, indent=1))
    elif args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if limiter is not None:
        limiter.restore_original_limits()
    return result


if __name__ == "__main__":
    main()
