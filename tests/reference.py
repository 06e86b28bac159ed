"""An independent plain-numpy forward pass of SPEC.md, the oracle of the model tests.

Written from SPEC.md's pseudo-code, one sample at a time, with the orderings spelled out as
index formulas (not reshapes). It imports nothing of `weathermixer`, so a shared
misunderstanding in the package's primitives cannot make both sides agree.
"""
from __future__ import annotations

import math

import numpy as np

FIELDS = ("n_lat", "n_lon", "n_prognostic", "n_static", "patch_lat", "patch_lon", "embed_dim",
          "token_hidden_dim", "channel_hidden_dim", "n_blocks")
LN_EPS = 1e-5


def _sizes(cfg) -> dict:
    """The Config fields from a Config or a plain dict."""
    return {f: (cfg[f] if isinstance(cfg, dict) else getattr(cfg, f)) for f in FIELDS}


def layer_norm(u, scale, bias, axis):
    """(u - mean) / sqrt(var + 1e-5) * scale + bias over `axis`, population variance."""
    mean = u.mean(axis=axis, keepdims=True)
    var = ((u - mean) ** 2).mean(axis=axis, keepdims=True)
    shape = [1] * u.ndim
    shape[axis] = -1
    return (u - mean) / np.sqrt(var + LN_EPS) * scale.reshape(shape) + bias.reshape(shape)


def gelu(u):
    return 0.5 * u * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * u ** 3)))


def patch_index(s: dict, n_vars: int):
    """For every (t, k): the pixel (v, h, w) it holds, from SPEC's orderings:
    t = a * (W / pw) + b and k = (v * pl + i) * pw + j hold x[v, a*pl + i, b*pw + j]."""
    pl, pw = s["patch_lat"], s["patch_lon"]
    rows, cols = s["n_lat"] // pl, s["n_lon"] // pw
    T, K = rows * cols, n_vars * pl * pw
    v_of, h_of, w_of = (np.empty((T, K), dtype=np.int64) for _ in range(3))
    for a in range(rows):
        for b in range(cols):
            t = a * cols + b
            for v in range(n_vars):
                for i in range(pl):
                    for j in range(pw):
                        k = (v * pl + i) * pw + j
                        v_of[t, k], h_of[t, k], w_of[t, k] = v, a * pl + i, b * pw + j
    return v_of, h_of, w_of


def reference_predict(params: dict, x, cfg, rollout: int = 1):
    """x [B, P+S, H, W] -> y [B, P, H, W], sample by sample, as SPEC.md writes it."""
    s = _sizes(cfg)
    P, S, H, W, N = s["n_prognostic"], s["n_static"], s["n_lat"], s["n_lon"], s["n_blocks"]
    x = np.asarray(x, dtype=np.float64)
    assert x.shape[1:] == (P + S, H, W), x.shape
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    in_v, in_h, in_w = patch_index(s, P + S)
    out_v, out_h, out_w = patch_index(s, P)
    ys = []
    for xb in x:  # one sample: [P+S, H, W]
        X = xb[in_v, in_h, in_w]  # [T, K]
        Z0 = X @ p["encoder/weight"].T + p["encoder/bias"]  # [T, E]
        Z = Z0
        for _ in range(rollout):
            for n in range(N):
                b = f"blocks/{n}/"
                U = layer_norm(Z, p[b + "token_norm/scale"], p[b + "token_norm/bias"], 1)
                H1 = gelu(p[b + "token_mixing/fc1/weight"] @ U
                          + p[b + "token_mixing/fc1/bias"][:, None])  # [Mt, E]
                Z = Z + p[b + "token_mixing/fc2/weight"] @ H1 + p[b + "token_mixing/fc2/bias"][:, None]
                U = layer_norm(Z, p[b + "channel_norm/scale"], p[b + "channel_norm/bias"], 1)
                G = gelu(U @ p[b + "channel_mixing/fc1/weight"].T
                         + p[b + "channel_mixing/fc1/bias"])  # [T, Mc]
                Z = Z + G @ p[b + "channel_mixing/fc2/weight"].T + p[b + "channel_mixing/fc2/bias"]
        D = np.concatenate([layer_norm(Z, p["decoder/norm/scale"], p["decoder/norm/bias"], 1), Z0],
                           axis=1)  # [T, 2E]
        R = D @ p["decoder/recovery/weight"].T + p["decoder/recovery/bias"]  # [T, P pl pw]
        Y0 = np.empty((P, H, W))
        Y0[out_v, out_h, out_w] = R  # unpatchify: the inverse of the same index map
        A = layer_norm(Y0, p["head/decoded_norm/scale"], p["head/decoded_norm/bias"], 0)
        Hh = layer_norm(np.concatenate([A, xb[:P]], axis=0),
                        p["head/norm/scale"], p["head/norm/bias"], 0)  # [2P, H, W]
        y = np.einsum("vc,chw->vhw", p["head/linear/weight"], Hh) \
            + p["head/linear/bias"][:, None, None]  # [P, H, W]
        ys.append(y)
    return np.stack(ys)


def reference_loss(params: dict, x, target, cfg, rollout: int = 1, lat_weights=None,
                   var_weights=None) -> float:
    """L = sum lat_w[h] var_w[v] (y - target)^2 / (B P H W)."""
    s = _sizes(cfg)
    y = reference_predict(params, x, cfg, rollout)
    B, P, H, W = y.shape
    lat_w = np.ones(H) if lat_weights is None else np.asarray(lat_weights, dtype=np.float64)
    var_w = np.ones(P) if var_weights is None else np.asarray(var_weights, dtype=np.float64)
    assert P == s["n_prognostic"]
    total = 0.0
    for v in range(P):
        for h in range(H):
            total += lat_w[h] * var_w[v] * float(((y[:, v, h, :] - target[:, v, h, :]) ** 2).sum())
    return total / (B * P * H * W)
