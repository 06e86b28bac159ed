"""Where a training step of ours spends its time on one GPU, piece by piece (CUDA events).

    python benchmarks/gpu_profile.py [--model c1|mid]

Times each stage of SPEC.md's forward and backward in isolation on the given model (batch 1)
and prints ms per call next to the GEMM-only time the stage's FLOPs would take at the
large-GEMM rate measured in the same run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import weathermixer as wm  # noqa: E402
from gpu_benchmark import MODELS  # noqa: E402
from weathermixer.autograd import activation, xp as xpmod  # noqa: E402
from weathermixer.mixer import model  # noqa: E402
from weathermixer.mixer.api import serial_layout  # noqa: E402
from weathermixer.mixer.bench import gemm_tflops, seconds  # noqa: E402


def median_ms(cp, fn, n=5):
    fn()
    return 1e3 * float(np.median([seconds(cp, fn) for _ in range(n)]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="c1", choices=sorted(MODELS))
    ap.add_argument("--precision", default="tf32")
    a = ap.parse_args()
    cp = xpmod.module("cupy")
    xpmod.set_matmul_precision(cp, a.precision)
    cfg = wm.Config(**MODELS[a.model])
    lay = serial_layout(cfg)
    params = wm.init_params(cfg, seed=0, dtype="float32", xp=cp)
    rng = np.random.default_rng(0)
    T, E, Mt, Mc = cfg.n_tokens, cfg.embed_dim, cfg.token_hidden_dim, cfg.channel_hidden_dim
    x = cp.asarray(rng.standard_normal((1, cfg.n_vars, cfg.n_lat, cfg.n_lon), dtype=np.float32))
    z = cp.asarray(rng.standard_normal((1, T, E), dtype=np.float32))
    gemm = gemm_tflops(cp, "float32", 8192)
    rows = []

    def add(name, fn, flops=0.0):
        ms = median_ms(cp, fn)
        rows.append((name, ms, 1e3 * flops / (gemm * 1e12) if flops else 0.0))

    y, cache = model.mixer_block_forward(z, params, 0, lay)
    add("block forward", lambda: model.mixer_block_forward(z, params, 0, lay),
        2 * (2 * T * Mt * E) + 2 * (2 * T * E * Mc))
    add("block backward", lambda: model.mixer_block_backward(y, cache, {}),
        2 * (2 * (2 * T * Mt * E) + 2 * (2 * T * E * Mc)))
    _, c_tn, c_t1, c_g1, c_t2, c_cn, c_c1, c_g2, c_c2 = cache  # mixer_block_forward's caches
    b = "blocks/0/"

    def token_backward():
        dh1 = model.dense_backward(y.swapaxes(-1, -2), c_t2, {}, b + "token_mixing/fc2")
        dut = model.dense_backward(activation.gelu_backward(dh1, c_g1), c_t1, {},
                                   b + "token_mixing/fc1")
        return model.norm_backward(dut.swapaxes(-1, -2), c_tn, {}, b + "token_norm")

    def channel_backward():
        dg = model.dense_backward(y, c_c2, {}, b + "channel_mixing/fc2")
        du = model.dense_backward(activation.gelu_backward(dg, c_g2), c_c1, {},
                                  b + "channel_mixing/fc1")
        return model.norm_backward(du, c_cn, {}, b + "channel_norm")

    add("token-mixing backward", token_backward, 4 * (2 * T * Mt * E))
    add("channel-mixing backward", channel_backward, 4 * (2 * T * Mc * E))
    u = cp.asarray(rng.standard_normal((1, E, Mt), dtype=np.float32))
    add("token fc1 (dense)", lambda: model.dense_forward(z.swapaxes(-1, -2), params,
                                                         "blocks/0/token_mixing/fc1", lay),
        2 * T * Mt * E)
    add("token fc2 (dense)", lambda: model.dense_forward(u, params, "blocks/0/token_mixing/fc2",
                                                         lay), 2 * T * Mt * E)
    add("channel fc1 (dense)", lambda: model.dense_forward(z, params,
                                                           "blocks/0/channel_mixing/fc1", lay),
        2 * T * Mc * E)
    add("gelu forward [E, Mt]", lambda: activation.gelu_forward(u))
    add("gelu backward [E, Mt]", lambda: activation.gelu_backward(u, u))
    add("layernorm forward [T, E]", lambda: model.norm_forward(z, params,
                                                                "blocks/0/token_norm", lay, -1, E))
    out, c = model.norm_forward(z, params, "blocks/0/token_norm", lay, -1, E)
    add("layernorm backward [T, E]", lambda: model.norm_backward(out, c, {}, "blocks/0/token_norm"))
    P, HW = cfg.n_prognostic, cfg.n_lat * cfg.n_lon
    y0 = cp.asarray(rng.standard_normal((1, P, cfg.n_lat, cfg.n_lon), dtype=np.float32))
    add("head LN [P, H, W] forward", lambda: model.norm_forward(y0, params, "head/decoded_norm",
                                                                lay, 1, P))
    ho, hcache = model.norm_forward(y0, params, "head/decoded_norm", lay, 1, P)
    add("head LN [P, H, W] backward", lambda: model.norm_backward(ho, hcache, {},
                                                                  "head/decoded_norm"))
    pix = cp.asarray(rng.standard_normal((1, HW, 2 * P), dtype=np.float32))
    add("head linear forward", lambda: model.dense_forward(pix, params, "head/linear", lay),
        2 * HW * 2 * P * P)
    hy, hc = model.dense_forward(pix, params, "head/linear", lay)
    add("head linear backward", lambda: model.dense_backward(hy, hc, {}, "head/linear"),
        4 * HW * 2 * P * P)
    d = cp.asarray(rng.standard_normal((1, T, 2 * E), dtype=np.float32))
    add("recovery forward", lambda: model.dense_forward(d, params, "decoder/recovery", lay),
        2 * T * 2 * E * cfg.recovery_dim)
    ry, rc = model.dense_forward(d, params, "decoder/recovery", lay)
    add("recovery backward", lambda: model.dense_backward(ry, rc, {}, "decoder/recovery"),
        4 * T * 2 * E * cfg.recovery_dim)
    add("patchify x", lambda: model.patchify(x, cfg.patch_lat, cfg.patch_lon))
    from weathermixer.mixer.optim import AdamW
    opt = AdamW(lr=1e-5)
    grads = {k: v.copy() for k, v in params.items()}
    add("AdamW step (all params)", lambda: opt.step(params, grads, lay))
    yf, cf = model.forward(params, x, lay, 1)
    add("whole forward", lambda: model.forward(params, x, lay, 1))
    add("whole backward", lambda: model.backward(yf, cf))
    print(f"{'stage':28} {'ms':>9} {'GEMM-only ms':>13}   (large GEMM {gemm:.0f} TFLOP/s)")
    for name, ms, ideal in rows:
        print(f"{name:28} {ms:>9.2f} {ideal:>13.2f}")


if __name__ == "__main__":
    main()
