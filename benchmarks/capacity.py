"""Capacity: a model about twice the largest that fits one GPU trains on two (2-way Jigsaw).

    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/capacity.py one --json $OUT/cap1.json
    mpiexec --allow-run-as-root -n 2 python3 benchmarks/capacity.py two --from $OUT/cap1.json \
        --json $OUT/cap2.json

The model family is the paper's C1 (720 x 1440 grid, patch 1 x 60, 69 + 3 variables, E = 4320,
Mt = 8640, Mc = 4320; batch 1, float32, TF32 GEMMs) with N mixer blocks as the size knob, about
336 M parameters a block. On GPUs every card acts as an H100 80GB by default (--card-gib,
default 79.18 GiB, an H100's cudaMemGetInfo total; `card`: the card as it is): the memory
beyond that is taken at the start in one allocation outside CuPy's pool and held to the end,
so a trial fails exactly where cudaMalloc would fail on the smaller card, counting what the
pool does not (CUDA context, cuBLAS, NCCL, and memory of ours that the other GPU of a pair has
mapped). Fragmentation counts, as it would on the card: the pool gives back its free blocks
and tries again before it raises OutOfMemoryError. Phase two takes phase one's card with
--from. `--memory-gib` caps the pool instead (the method before the seventh session; on a
pair it missed the memory the other GPU kept mapped, docs/benchmarks.md).

Phase one (one rank, 1x1): the largest N whose training step (forward, backward, global-norm
clipping, AdamW with its moments) runs twice on the card. Trials of N = 1 and 2 give the bytes a
block adds to the peak of live arrays (a CuPy memory hook); the N predicted from them is tried and
the search walks one block at a time until N fits and N + 1 runs out of memory.
Phase two (mpiexec -n R, grid Rx1: tokens split over R GPUs; NCCL, and the copy engines
between the two GPUs of a pair): the model of R x N_max blocks (or --blocks) trains for --steps
steps, every GPU acting as the same card; the loss must stay finite. It reports ms per step
(median after the first) and the peak memory of every GPU.

Weights are drawn where they live, U(-1/sqrt(fan_in), +1/sqrt(fan_in)) as in `init_params` but
not its values, biases 0, LayerNorm 1 and 0: `init_params` draws every global array in float64 on
the host (seconds a block, on every rank), which for 20-odd blocks would cost more device time
than the measurement itself. Inputs and targets are random.

On CPUs (`--device cpu --tiny`: a small model, numpy) the same phases run as a smoke test against
a fake cap: a trial fits when the bytes of its arrays (parameters, gradients, the two moments,
input and target) are within --memory-gib.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, installed or not

from weathermixer.cli.train import setup_parallel, world_size  # noqa: E402
from weathermixer.config import Config  # noqa: E402
from weathermixer.mixer.api import loss_and_grads  # noqa: E402
from weathermixer.mixer.bench import peak_device_bytes, peak_in_use_bytes, seconds  # noqa: E402
from weathermixer.mixer.layout import Layout  # noqa: E402
from weathermixer.mixer.optim import AdamW  # noqa: E402

FAMILIES = {
    "c1": dict(n_lat=720, n_lon=1440, n_prognostic=69, n_static=3, patch_lat=1, patch_lon=60,
               embed_dim=4320, token_hidden_dim=8640, channel_hidden_dim=4320),
    "tiny": dict(n_lat=8, n_lon=16, n_prognostic=5, n_static=1, patch_lat=1, patch_lon=4,
                 embed_dim=64, token_hidden_dim=48, channel_hidden_dim=96),
}
GIB = 2 ** 30
H100_GIB = 79.18  # an H100 80GB HBM3's cudaMemGetInfo total (79.1787 GiB, seventh session)


def size(b: float) -> str:
    """Bytes for a reader: GiB, or MiB for the tiny model's arrays."""
    return f"{b / GIB:.2f} GiB" if b >= GIB / 4 else f"{b / 2 ** 20:.3f} MiB"


def largest_fitting(fits, guess: int, most: int) -> int:
    """The largest n in 1..most with fits(n), for a fits() that holds up to some n and fails
    beyond it (0 when fits(1) fails). Walks one block at a time from `guess`, so it ends having
    seen n fit and n + 1 fail (unless n = most)."""
    n = min(max(1, guess), most)
    if fits(n):
        while n < most and fits(n + 1):
            n += 1
        return n
    while n > 1 and not fits(n - 1):
        n -= 1
    return n - 1


def device_params(cfg, layout, xp, seed: int = 0) -> dict:
    """This rank's blocks in float32 (see the module docstring). Only weights are random, and
    no weight block is replicated, so the holders of a replicated block agree on its values."""
    rng = xp.random.default_rng(seed + 7919 * layout.grid.world.rank)
    params = {}
    for name, spec in layout.specs.items():
        shape = tuple(s.partition.size(layout.coords[s.group]) for s in spec.splits)
        if name.endswith("/weight"):
            bound = 1.0 / math.sqrt(spec.shape[1])
            w = rng.random(shape, dtype=np.float32)
            w *= 2 * bound
            w -= bound
            params[name] = w
        else:
            params[name] = (xp.ones if name.endswith("norm/scale") else xp.zeros)(shape, np.float32)
    return params


def train(cfg, layout, xp, steps: int, row: dict, seed: int = 0) -> dict:
    """Build this rank's model and take `steps` training steps (batch 1). Fills `row` as it
    goes: losses, ms per step, then the peak bytes of live arrays (GPUs), the pool at the end
    and the bytes of the arrays held."""
    row.update(n_blocks=cfg.n_blocks, params=cfg.n_params(), losses=[], step_ms=[])

    def run():
        params = device_params(cfg, layout, xp, seed)
        rng = xp.random.default_rng(seed + 1 + 7919 * layout.grid.world.rank)
        h, w = layout.n_lat_local, cfg.n_lon
        x = rng.random((1, len(layout.input_channels), h, w), dtype=np.float32)
        target = rng.random((1, len(layout.prognostic_channels), h, w), dtype=np.float32)
        opt = AdamW(lr=1e-4, clip_norm=1.0)

        def step():
            loss, grads = loss_and_grads(params, x, target, cfg, layout=layout)
            opt.step(params, grads, layout)
            row["losses"].append(loss)

        layout.grid.world.barrier()
        for _ in range(steps):
            row["step_ms"].append(1e3 * seconds(xp, step))
        row["param_bytes"] = sum(int(p.nbytes) for p in params.values())
        # parameters, gradients, m and v (same shapes), input and target
        row["array_bytes"] = 4 * row["param_bytes"] + int(x.nbytes + target.nbytes)

    row["peak_in_use_bytes"] = peak_in_use_bytes(xp, run)
    row["pool_bytes"] = peak_device_bytes(xp)
    if xp is not np:  # the CUDA context, cuBLAS and NCCL: the card, not the cap, bounds these
        free_b, total = xp.cuda.runtime.memGetInfo()
        ballast = sum(m.size for m in _BALLAST)
        row["outside_pool_bytes"] = int(total - free_b - row["pool_bytes"] - ballast)
    row["loss_finite"] = bool(np.isfinite(row["losses"]).all())
    # what the cap is checked against: live arrays on GPUs, the arrays' bytes on CPUs
    row["peak_bytes"] = row["array_bytes"] if xp is np else row["peak_in_use_bytes"]
    return row


def out_of_memory(xp, e: BaseException) -> bool:
    if xp is np:
        return False
    return isinstance(e, xp.cuda.memory.OutOfMemoryError) or any(
        s in str(e) for s in ("ALLOC_FAILED", "cudaErrorMemoryAllocation"))


def free(xp):
    gc.collect()
    if xp is not np:
        xp.get_default_memory_pool().free_all_blocks()


_BALLAST: list = []  # the device memory that makes a larger card act as a smaller one (--card-gib)


def device_info(xp, cap_bytes: int, card_bytes: float | None = None) -> dict:
    """The card's name and memory. With `card_bytes` (GPUs), the card is made to act as one
    of that total memory: the difference is taken in one allocation outside CuPy's pool and
    held to the end, the pool has no cap, and an allocation past the card fails in
    cudaMalloc as it would on the smaller card, whatever else holds device memory (CUDA
    context, cuBLAS, NCCL, mappings by the other GPU). Else the pool is capped at `cap_bytes`."""
    if xp is np:
        return {"device": f"CPU {platform.processor() or platform.machine()}",
                "card_gib": None, "free_gib": None, "cap_gib": cap_bytes / GIB}
    dev = xp.cuda.Device().id
    free_b, total = xp.cuda.runtime.memGetInfo()
    info = {"device": xp.cuda.runtime.getDeviceProperties(dev)["name"].decode(),
            "card_gib": total / GIB, "free_gib": free_b / GIB}
    if card_bytes is None:
        xp.get_default_memory_pool().set_limit(size=cap_bytes)
        return dict(info, cap_gib=cap_bytes / GIB)
    if card_bytes < total:
        _BALLAST.append(xp.cuda.Memory(int(total - card_bytes)))  # not from the pool
    return dict(info, cap_gib=None, acts_as_gib=min(card_bytes, total) / GIB)


def describe(info: dict) -> str:
    if info["card_gib"] is None:
        return f"{info['device']}, fake cap {size(info['cap_gib'] * GIB)} on array bytes"
    card = (f"{info['device']} ({info['card_gib']:.2f} GiB on the card, {info['free_gib']:.2f} "
            f"free at start)")
    if info["cap_gib"] is None:
        return card + f", acting as a card of {info['acts_as_gib']:.2f} GiB (no pool cap)"
    return card + f", cap {size(info['cap_gib'] * GIB)} (CuPy pool limit)"


def limits(a, xp) -> tuple[dict, int]:
    """(device_info, the bound a trial's peak is checked against: the pool's cap, or the
    memory of the card acted as, where only cudaMalloc's failure can stop a trial)."""
    cap = int(a.memory_gib * GIB)
    if a.card_gib is None or xp is np:
        return device_info(xp, cap), cap
    card = float("inf") if a.card_gib == "card" else float(a.card_gib) * GIB
    info = device_info(xp, cap, card)
    return info, int(info["acts_as_gib"] * GIB)


def phase_one(a, family: str) -> dict:
    grid, xp = setup_parallel(1, 1, 1, a.device, a.precision)
    info, cap = limits(a, xp)
    trials = {}

    def trial(n: int) -> dict:
        if n not in trials:
            cfg = Config(**FAMILIES[family], n_blocks=n)
            row = {}
            try:
                train(cfg, Layout(cfg, grid), xp, a.steps or 2, row)
                row["fits"] = bool(row["peak_bytes"] <= cap)
                if not row["loss_finite"]:
                    print(f"  warning: N = {n} gave a non-finite loss {row['losses']}")
            except Exception as e:
                if not out_of_memory(xp, e):
                    raise
                row.update(fits=False, error=f"{type(e).__name__}: {e}")
            free(xp)
            trials[n] = row
            print(f"  N = {n:>3}: {'fits' if row['fits'] else 'does not fit'}"
                  + (f", peak {size(row['peak_bytes'])}" if "peak_bytes" in row else ""),
                  flush=True)
        return trials[n]

    print(f"capacity one: {describe(info)}; family {family}; searching N", flush=True)
    calib = {}
    if trial(1)["fits"] and trial(2)["fits"]:
        per_block = trials[2]["peak_bytes"] - trials[1]["peak_bytes"]
        base = trials[1]["peak_bytes"] - per_block
        guess = int((cap - base) // per_block) if per_block > 0 else 2
        calib = {"per_block_bytes": per_block, "base_bytes": base, "predicted_n": guess}
        print(f"  a block adds {size(per_block)} to the peak, the rest is {size(base)}: "
              f"predicted N_max = {guess}", flush=True)
    else:
        guess = 1
    n_max = largest_fitting(lambda n: trial(n)["fits"], guess, a.max_blocks)
    rows = [trials[n] for n in sorted(trials)]
    out = dict(info, phase="one", family=family, config=FAMILIES[family],
               precision=a.precision if xp is not np else None, steps_per_trial=a.steps or 2,
               calibration=calib, trials=rows, n_max=n_max,
               params_n_max=Config(**FAMILIES[family], n_blocks=n_max).n_params() if n_max else 0,
               params_n_max_plus_1=Config(**FAMILIES[family], n_blocks=n_max + 1).n_params())
    print(f"{'N':>4} {'parameters':>15} {'fits':>5} {'peak':>12} {'pool':>12} {'ms/step':>8}"
          f"  (peak: live arrays; pool: what CuPy kept at the end)")
    for r in rows:
        peak = (f"{size(r['peak_bytes']):>12} {size(r['pool_bytes']):>12} {r['step_ms'][-1]:>8.1f}"
                if "peak_bytes" in r else f"{'OOM':>12}")
        print(f"{r['n_blocks']:>4} {r['params']:>15,} {'yes' if r['fits'] else 'no':>5} {peak}")
    if n_max:
        print(f"largest on one GPU under {size(cap)}: N = {n_max} "
              f"({out['params_n_max']:,} parameters); N = {n_max + 1} "
              f"({out['params_n_max_plus_1']:,}) "
              f"{'does not fit' if n_max < a.max_blocks else 'was not tried (--max-blocks)'}")
    else:
        print("not even N = 1 fits under the cap")
    return out


def phase_two(a, family: str, one: dict | None) -> dict | None:
    n_ranks = world_size()
    if n_ranks < 2:
        raise SystemExit("phase two runs under mpiexec with at least 2 ranks")
    blocks = a.blocks or (n_ranks * one["n_max"] if one else 0)
    if blocks < 1:
        raise SystemExit("phase two needs --blocks or --from a phase-one JSON with N_max >= 1")
    cfg = Config(**FAMILIES[family], n_blocks=blocks)
    grid, xp = setup_parallel(n_ranks, 1, n_ranks, a.device, a.precision)
    info, cap = limits(a, xp)
    layout = Layout(cfg, grid)
    if grid.is_root:
        print(f"capacity two: {n_ranks} ranks, grid {n_ranks}x1 (tokens split), "
              f"{describe(info)} per GPU; N = {blocks} ({cfg.n_params():,} parameters)",
              flush=True)
    row = {}
    try:
        train(cfg, layout, xp, a.steps or 3, row)
    except Exception as e:  # one rank alone cannot leave a collective: stop the whole job
        print(f"rank {grid.world.rank}: FAILED in step {len(row.get('losses', [])) + 1}: "
              f"{type(e).__name__}: {e}", flush=True)
        from mpi4py import MPI
        MPI.COMM_WORLD.Abort(1)
        raise
    row.update(info, rank=grid.world.rank, within_cap=bool(row["peak_bytes"] <= cap))
    rows = grid.world.gather_json(row)
    if not grid.is_root:
        return None
    ms = float(np.median([r["step_ms"][1:] or r["step_ms"] for r in rows]))
    finite = all(r["loss_finite"] for r in rows)
    out = dict(info, phase="two", family=family, config=FAMILIES[family], ranks=n_ranks,
               grid=f"{n_ranks}x1", n_blocks=blocks, params=cfg.n_params(), steps=a.steps or 3,
               ms_per_step=ms, loss_finite=finite, within_cap=all(r["within_cap"] for r in rows),
               losses=rows[0]["losses"], rows=rows)
    gpu = xp is not np
    print(f"{'rank':>4} {'peak':>12} {'pool':>12} {'parameters':>12} {'ms/step':>8}"
          + (f" {'outside pool':>12}  (not capped: CUDA context, cuBLAS, NCCL)" if gpu else ""))
    for r in rows:
        print(f"{r['rank']:>4} {size(r['peak_bytes']):>12} {size(r['pool_bytes']):>12} "
              f"{size(r['param_bytes']):>12} "
              f"{float(np.median(r['step_ms'][1:] or r['step_ms'])):>8.1f}"
              + (f" {size(r['outside_pool_bytes']):>12}" if gpu else ""))
    verdict = "trains" if finite and out["within_cap"] else "does NOT train"
    print(f"N = {blocks} on {n_ranks} GPUs {verdict}: {out['steps']} steps, loss "
          f"{' -> '.join(f'{v:.5f}' for v in out['losses'])}, {ms:.1f} ms/step (median after the "
          f"first), peak {size(max(r['peak_bytes'] for r in rows))} per GPU")
    if one and one["n_max"]:
        top = next(t for t in one["trials"] if t["n_blocks"] == one["n_max"])
        out.update(n_max_one_gpu=one["n_max"], params_n_max_one_gpu=one["params_n_max"],
                   params_ratio=cfg.n_params() / one["params_n_max"],
                   peak_bytes_n_max_one_gpu=top["peak_bytes"],
                   ms_per_step_n_max_one_gpu=top["step_ms"][-1])
        print(f"against the largest one-GPU model (N = {one['n_max']}, "
              f"{one['params_n_max']:,} parameters, peak {size(top['peak_bytes'])}, "
              f"{top['step_ms'][-1]:.1f} ms/step): {out['params_ratio']:.3f} x the parameters; "
              f"N = {one['n_max'] + 1} ({one['params_n_max_plus_1']:,}) did not fit one GPU")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("phase", choices=["one", "two"])
    ap.add_argument("--card-gib", default=None,
                    help="GPUs: each card acts as one of this total memory in GiB (default "
                         "79.18, an H100 80GB), or 'card' for the card as it is; phase two "
                         "takes phase one's with --from")
    ap.add_argument("--memory-gib", type=float, default=None,
                    help="cap the pool per GPU at this instead (CPUs: the fake cap; default "
                         "79.0, or phase one's cap with --from)")
    ap.add_argument("--from", dest="from_json", default=None, help="phase two: phase one's JSON")
    ap.add_argument("--blocks", type=int, default=None, help="phase two: N (default R x N_max)")
    ap.add_argument("--steps", type=int, default=None, help="steps a trial takes (one: 2, two: 3)")
    ap.add_argument("--max-blocks", type=int, default=40, help="phase one searches N up to this")
    ap.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    ap.add_argument("--tiny", action="store_true", help="the small model of the CPU smoke test")
    ap.add_argument("--precision", choices=["tf32", "fp32"], default="tf32")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # no NVLink multicast (KINDS.md)
    one = json.loads(Path(a.from_json).read_text()) if a.from_json else None
    family = one["family"] if one else ("tiny" if a.tiny else "c1")
    if a.card_gib is None and one and one.get("acts_as_gib"):
        a.card_gib = one["acts_as_gib"]
    if a.card_gib is None and a.memory_gib is None and one is None:
        a.card_gib = H100_GIB
    if a.memory_gib is None:
        a.memory_gib = one["cap_gib"] if one and one.get("cap_gib") is not None else 79.0
    out = phase_one(a, family) if a.phase == "one" else phase_two(a, family, one)
    if out is not None and a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
