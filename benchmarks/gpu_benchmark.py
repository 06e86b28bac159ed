"""Ours against PyTorch (eager and torch.compile) on one GPU: same model, precision, run.

    python benchmarks/gpu_benchmark.py --model c1 --precision tf32 [--json out.json]

`c1` is the paper's 1.06 B skill model (720 x 1440 grid, patch 1 x 60, 69 + 3 variables,
E = 4320, Mt = 8640, Mc = 4320, 3 blocks, batch 1); `mid` a small one for a quick look. The
reference runs with torch's LayerNorm and GELU kernels ("torch eager", "torch.compile") and with
SPEC.md's formulas written out term by term (", spec" rows; see torch_reference.py). A
training step is forward + backward + global-norm clipping + AdamW for every contender, timed
with CUDA events (median of --steps after --warmup). The large-GEMM rate (8192^3 in the same
precision) is measured in the same run; TFLOP/s count 3x the forward's 2 m n k.
PyTorch is a benchmark-only dependency; the package never imports it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import weathermixer as wm  # noqa: E402
from weathermixer.autograd import xp as xpmod  # noqa: E402
from weathermixer.mixer.api import serial_layout  # noqa: E402
from weathermixer.mixer.bench import forward_flops, run_bench  # noqa: E402

MODELS = {
    "c1": dict(n_lat=720, n_lon=1440, n_prognostic=69, n_static=3, patch_lat=1, patch_lon=60,
               embed_dim=4320, token_hidden_dim=8640, channel_hidden_dim=4320, n_blocks=3),
    "mid": dict(n_lat=180, n_lon=360, n_prognostic=69, n_static=3, patch_lat=1, patch_lon=30,
                embed_dim=1024, token_hidden_dim=1024, channel_hidden_dim=1024, n_blocks=3),
}


def torch_step_time(cfg, params, precision, steps, warmup, compile_model, formulas="builtin",
                    batch=1, rollout=1):
    import torch
    import torch_reference as tr
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    torch.cuda.empty_cache()  # the previous contender's cached blocks do not count
    torch.cuda.reset_peak_memory_stats()
    model = tr.build(cfg, params, device="cuda", dtype=torch.float32, compile=compile_model,
                     formulas=formulas)
    del params
    prms = list(tr._module(model).p.values())
    opt = torch.optim.AdamW(prms, lr=1e-5, weight_decay=0.0)
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((batch, cfg.n_vars, cfg.n_lat, cfg.n_lon),
                                             dtype=np.float32)).cuda()
    t = torch.from_numpy(rng.standard_normal((batch, cfg.n_prognostic, cfg.n_lat, cfg.n_lon),
                                             dtype=np.float32)).cuda()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = tr.loss_fn(model, x, t, rollout)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(prms, 1.0)
        opt.step()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return float(np.median(times)), torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="c1")
    ap.add_argument("--precision", choices=["tf32", "fp32"], default="tf32")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--formulas", default="builtin,spec",
                    help="the reference's LayerNorm and GELU, comma-separated: builtin (torch's "
                         "kernels) and/or spec (SPEC.md's formulas written out); default both")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    cp = xpmod.module("cupy")
    xpmod.set_matmul_precision(cp, a.precision)
    cfg = wm.Config(**MODELS[a.model])
    ours = run_bench(cfg, serial_layout(cfg), 1, a.steps, a.warmup, "float32", xp=cp)
    cp.get_default_memory_pool().free_all_blocks()
    flops = 3 * forward_flops(cfg, 1)
    rows = {"ours": {"ms": ours["step_ms"], "peak_gib": ours["peak_in_use_bytes"] / 2**30,
                     "reserved_gib": ours["peak_device_bytes"] / 2**30,
                     "forward_ms": ours["forward_ms"], "backward_ms": ours["backward_ms"]}}
    if not a.no_torch:
        params = wm.init_params(cfg, seed=0, dtype="float32")  # host arrays, not zeros
        for formulas in a.formulas.split(","):
            suffix = "" if formulas == "builtin" else f", {formulas}"
            contenders = [("torch eager" + suffix, False)]
            if not a.no_compile:
                contenders.append(("torch.compile" + suffix, True))
            for name, compiled in contenders:
                s, peak, held = torch_step_time(cfg, params, a.precision, a.steps, a.warmup,
                                                compiled, formulas)
                rows[name] = {"ms": 1e3 * s, "peak_gib": peak / 2**30, "reserved_gib": held / 2**30}
    gemm = ours["gemm_tflops"]
    dev = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()
    print(f"{dev}; model {a.model} ({cfg.n_params():,} params); {a.precision}; batch 1; "
          f"large GEMM {gemm:.1f} TFLOP/s; median of {a.steps} steps")
    print("peak GiB: the most memory live arrays held; pool GiB: what the allocator kept")
    print(f"{'':20} {'ms/step':>9} {'TFLOP/s':>8} {'of GEMM':>8} {'peak GiB':>9} {'pool GiB':>9} "
          f"{'vs ours':>8}")
    for name, r in rows.items():
        r["tflops"] = flops / (r["ms"] / 1e3) / 1e12
        r["gemm_fraction"] = r["tflops"] / gemm
        r["ours_speedup"] = r["ms"] / rows["ours"]["ms"]
        print(f"{name:20} {r['ms']:>9.1f} {r['tflops']:>8.1f} {r['gemm_fraction']:>8.3f} "
              f"{r['peak_gib']:>9.2f} {r['reserved_gib']:>9.2f} {r['ours_speedup']:>8.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps({"device": dev, "model": a.model, "config": MODELS[a.model],
                                            "precision": a.precision, "gemm_tflops": gemm,
                                            "rows": rows, "ours_detail": ours}, indent=2))


if __name__ == "__main__":
    main()
