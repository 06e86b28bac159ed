"""Kernel by kernel: where one training step of ours spends GPU time (and PyTorch eager's).

    python benchmarks/gpu_kernels.py [--model c1|mid] [--torch] [--top 30]

PyTorch's profiler (CUPTI) records every kernel the process launches, CuPy's and cuBLAS's
included, so it splits our step by kernel name without touching the package. The table sums
the device time of each kernel name over one step (after warm-up) and counts its launches.
Benchmark-only: the package never imports torch.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import weathermixer as wm  # noqa: E402
from gpu_benchmark import MODELS  # noqa: E402
from weathermixer.autograd import xp as xpmod  # noqa: E402
from weathermixer.mixer.api import loss_and_grads, serial_layout  # noqa: E402
from weathermixer.mixer.optim import AdamW  # noqa: E402


def kernel_table(step, top: int, title: str):
    """Run `step` once under the profiler; print device ms per kernel name, largest first."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    total, calls = defaultdict(float), defaultdict(int)
    for e in prof.events():
        if e.device_type.name == "CUDA":
            name = e.name[:90]
            total[name] += e.time_range.elapsed_us() / 1e3
            calls[name] += 1
    if not total:  # this torch keeps device kernels elsewhere: its own table
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=top))
        return
    busy = sum(total.values())
    print(f"\n{title}: device busy {busy:.1f} ms in {sum(calls.values())} kernels")
    print(f"{'ms':>8} {'calls':>6}  kernel")
    for name, ms in sorted(total.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{ms:>8.2f} {calls[name]:>6}  {name}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="c1", choices=sorted(MODELS))
    ap.add_argument("--torch", action="store_true", help="profile PyTorch eager as well")
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    cp = xpmod.module("cupy")
    xpmod.set_matmul_precision(cp, "tf32")
    cfg = wm.Config(**MODELS[a.model])
    lay = serial_layout(cfg)
    params = wm.init_params(cfg, seed=0, dtype="float32", xp=cp)
    rng = np.random.default_rng(0)
    x = cp.asarray(rng.standard_normal((1, cfg.n_vars, cfg.n_lat, cfg.n_lon), dtype=np.float32))
    t = cp.asarray(rng.standard_normal((1, cfg.n_prognostic, cfg.n_lat, cfg.n_lon),
                                       dtype=np.float32))
    opt = AdamW(lr=1e-5, clip_norm=1.0)

    def ours():
        _, grads = loss_and_grads(params, x, t, cfg, layout=lay)
        opt.step(params, grads, lay)

    kernel_table(ours, a.top, "weathermixer step")
    if a.torch:
        import torch
        import torch_reference as tr
        host = wm.init_params(cfg, seed=0, dtype="float32")
        del params, opt
        cp.get_default_memory_pool().free_all_blocks()
        torch.backends.cuda.matmul.allow_tf32 = True
        model = tr.build(cfg, host, device="cuda", dtype=torch.float32)
        prms = list(tr._module(model).p.values())
        topt = torch.optim.AdamW(prms, lr=1e-5)
        xt, tt = torch.as_tensor(x.get()).cuda(), torch.as_tensor(t.get()).cuda()

        def eager():
            topt.zero_grad(set_to_none=True)
            tr.loss_fn(model, xt, tt, 1).backward()
            torch.nn.utils.clip_grad_norm_(prms, 1.0)
            topt.step()

        kernel_table(eager, a.top, "PyTorch eager step")


if __name__ == "__main__":
    main()
