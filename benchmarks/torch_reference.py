"""The WeatherMixer of SPEC.md in plain PyTorch: a reference for checks and benchmarks only.

The package never imports torch; this file lives under benchmarks/ and is used by
`check_torch_reference.py` (equality with `weathermixer.predict` / `loss_and_grads`) and
`cpu_benchmark.py` (timing). Parameter names are exactly SPEC.md's ("encoder/weight",
"blocks/0/token_mixing/fc1/bias", ...), so `load_params(model, wm.init_params(cfg))` copies
our arrays in and `grads_numpy(model)` gives gradients keyed like `wm.loss_and_grads`.

    x [B, P+S, H, W] -> patchify -> X [B, T, K] -> Z0 = encoder(X) [B, T, E]
    rollout x N blocks:   Z += token_mixing(LN(Z)) (on [B, E, T]),  Z += channel_mixing(LN(Z))
    D = [LN(Z), Z0] -> R = recovery(D) -> Y0 = unpatchify(R) [B, P, H, W]
    y = head_linear(LN_2P([LN_P(Y0), x[:, :P]])) per pixel

GELU is the tanh form, LayerNorm uses the population variance and eps 1e-5, over E for the
tokens and over the channel axis, per pixel, for the head. `formulas="builtin"` (the default)
computes them with torch's own kernels (`F.layer_norm`, `F.gelu(approximate="tanh")`);
`formulas="spec"` writes them out as SPEC.md states them, one tensor operation per term, as a
plain transcription of the spec would (eager PyTorch then keeps each term for the backward).

    import torch_reference as tr
    model = tr.build(cfg, params, device="cpu", dtype=torch.float64)
    loss = tr.loss_fn(model, x, target, rollout=1, lat_w=None, var_w=None)
    loss.backward(); g = tr.grads_numpy(model)
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-5
FORMULAS = ("builtin", "spec")


def param_shapes(cfg) -> dict:
    """Global shape of every parameter of SPEC.md (a copy of weathermixer.config.param_shapes
    written from SPEC.md, so this file does not depend on the package for the contract)."""
    E, Mt, Mc, P = cfg.embed_dim, cfg.token_hidden_dim, cfg.channel_hidden_dim, cfg.n_prognostic
    pl, pw = cfg.patch_lat, cfg.patch_lon
    T = (cfg.n_lat // pl) * (cfg.n_lon // pw)
    K = (P + cfg.n_static) * pl * pw
    R = P * pl * pw
    shapes = {"encoder/weight": (E, K), "encoder/bias": (E,)}
    for n in range(cfg.n_blocks):
        b = f"blocks/{n}/"
        shapes.update({
            b + "token_norm/scale": (E,), b + "token_norm/bias": (E,),
            b + "token_mixing/fc1/weight": (Mt, T), b + "token_mixing/fc1/bias": (Mt,),
            b + "token_mixing/fc2/weight": (T, Mt), b + "token_mixing/fc2/bias": (T,),
            b + "channel_norm/scale": (E,), b + "channel_norm/bias": (E,),
            b + "channel_mixing/fc1/weight": (Mc, E), b + "channel_mixing/fc1/bias": (Mc,),
            b + "channel_mixing/fc2/weight": (E, Mc), b + "channel_mixing/fc2/bias": (E,),
        })
    shapes.update({
        "decoder/norm/scale": (E,), "decoder/norm/bias": (E,),
        "decoder/recovery/weight": (R, 2 * E), "decoder/recovery/bias": (R,),
        "head/decoded_norm/scale": (P,), "head/decoded_norm/bias": (P,),
        "head/norm/scale": (2 * P,), "head/norm/bias": (2 * P,),
        "head/linear/weight": (P, 2 * P), "head/linear/bias": (P,),
    })
    return shapes


def patchify(x, pl: int, pw: int):
    """x [B, V, H, W] -> X [B, (H/pl)(W/pw), V pl pw]; X[b, a*(W/pw)+c, (v*pl+i)*pw+j]."""
    B, V, H, W = x.shape
    x6 = x.reshape(B, V, H // pl, pl, W // pw, pw)  # [B, v, a, i, c, j]
    return x6.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // pl) * (W // pw), V * pl * pw)


def unpatchify(X, pl: int, pw: int, H: int, W: int):
    """The inverse of `patchify`: X [B, T, V pl pw] -> x [B, V, H, W]."""
    B, T, K = X.shape
    V = K // (pl * pw)
    x6 = X.reshape(B, H // pl, W // pw, V, pl, pw)  # [B, a, c, v, i, j]
    return x6.permute(0, 3, 1, 4, 2, 5).reshape(B, V, H, W)


class WeatherMixer(nn.Module):
    """SPEC.md's model; `self.p[name]` holds the parameter called `name` in SPEC.md."""

    def __init__(self, cfg, dtype=torch.float32, device="cpu", formulas: str = "builtin"):
        super().__init__()
        if formulas not in FORMULAS:
            raise ValueError(f"formulas={formulas!r}: expected one of {FORMULAS}")
        self.cfg = cfg
        self.formulas = formulas
        self.p = nn.ParameterDict({
            name: nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))
            for name, shape in param_shapes(cfg).items()})

    def _ln(self, u, name):
        """LN over the last axis with SPEC's `name/scale`, `name/bias`."""
        scale, bias = self.p[name + "/scale"], self.p[name + "/bias"]
        if self.formulas == "builtin":
            return F.layer_norm(u, (u.shape[-1],), scale, bias, EPS)
        mean = u.mean(-1, keepdim=True)
        var = ((u - mean) ** 2).mean(-1, keepdim=True)  # population variance
        return (u - mean) / torch.sqrt(var + EPS) * scale + bias

    def _gelu(self, u):
        if self.formulas == "builtin":
            return F.gelu(u, approximate="tanh")
        return 0.5 * u * (1 + torch.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u ** 3)))

    def _linear(self, u, name):
        return F.linear(u, self.p[name + "/weight"], self.p[name + "/bias"])

    def _block(self, z, n: int):
        b = f"blocks/{n}/"
        u = self._ln(z, b + "token_norm").transpose(1, 2)  # [B, E, T]
        h1 = self._gelu(self._linear(u, b + "token_mixing/fc1"))  # [B, E, Mt]
        z = z + self._linear(h1, b + "token_mixing/fc2").transpose(1, 2)  # [B, T, E]
        u = self._ln(z, b + "channel_norm")
        g = self._gelu(self._linear(u, b + "channel_mixing/fc1"))  # [B, T, Mc]
        return z + self._linear(g, b + "channel_mixing/fc2")

    def forward(self, x, rollout: int = 1):
        """x [B, P+S, H, W] -> y [B, P, H, W], the state `rollout` steps ahead."""
        cfg = self.cfg
        pl, pw, P = cfg.patch_lat, cfg.patch_lon, cfg.n_prognostic
        B, _, H, W = x.shape
        z0 = self._linear(patchify(x, pl, pw), "encoder")  # [B, T, E]
        z = z0
        for _ in range(rollout):  # latent rollout: the same weights each time
            for n in range(cfg.n_blocks):
                z = self._block(z, n)
        d = torch.cat([self._ln(z, "decoder/norm"), z0], dim=-1)  # [B, T, 2E]
        y0 = unpatchify(self._linear(d, "decoder/recovery"), pl, pw, H, W)  # [B, P, H, W]
        # head, per pixel: channels last
        a = self._ln(y0.permute(0, 2, 3, 1), "head/decoded_norm")  # [B, H, W, P]
        hc = torch.cat([a, x[:, :P].permute(0, 2, 3, 1)], dim=-1)  # [B, H, W, 2P]
        y = self._linear(self._ln(hc, "head/norm"), "head/linear")  # [B, H, W, P]
        return y.permute(0, 3, 1, 2)


def build(cfg, params=None, device="cpu", dtype=torch.float32, compile: bool = False,
          compile_kwargs: dict | None = None, formulas: str = "builtin"):
    """The model of `cfg` with `params` (dict name -> numpy/CuPy array) copied in.

    compile=True wraps the module with torch.compile (useful on GPU; slow to compile on CPU).
    formulas: "builtin" (torch's LayerNorm and GELU kernels) or "spec" (SPEC.md's formulas
    written out term by term). The returned object has `.p` and is called as model(x, rollout)."""
    model = WeatherMixer(cfg, dtype=dtype, device=device, formulas=formulas)
    if params is not None:
        load_params(model, params)
    if compile:
        compiled = torch.compile(model, **(compile_kwargs or {}))
        return compiled  # an OptimizedModule: .p, .parameters() and .cfg pass through
    return model


def _module(model):
    return getattr(model, "_orig_mod", model)


def load_params(model, params: dict):
    """Copy `params` (SPEC names -> arrays of any array library) into the model."""
    p = _module(model).p
    missing = set(p.keys()) - set(params)
    extra = set(params) - set(p.keys())
    if missing or extra:
        raise KeyError(f"parameter names differ: missing {sorted(missing)}, extra {sorted(extra)}")
    with torch.no_grad():
        for name, value in params.items():
            arr = value.get() if hasattr(value, "get") and not isinstance(value, np.ndarray) \
                else np.asarray(value)
            t = torch.from_numpy(np.ascontiguousarray(arr))
            if tuple(t.shape) != tuple(p[name].shape):
                raise ValueError(f"{name}: shape {tuple(t.shape)}, expected {tuple(p[name].shape)}")
            p[name].copy_(t.to(p[name].dtype))
    return model


def grads_numpy(model) -> dict:
    """SPEC name -> gradient as a float64-or-native numpy array (after loss.backward())."""
    return {name: prm.grad.detach().cpu().numpy() for name, prm in _module(model).p.items()}


def zero_grad(model):
    for prm in _module(model).p.values():
        prm.grad = None


def loss_fn(model, x, target, rollout: int = 1, lat_w=None, var_w=None):
    """SPEC.md's loss: sum_{b,v,h,w} lat_w[h] var_w[v] (y - target)^2 / (B P H W)."""
    y = model(x, rollout)
    B, P, H, W = y.shape
    r = y - target
    sq = r * r
    if var_w is not None:
        sq = sq * var_w.reshape(1, P, 1, 1)
    if lat_w is not None:
        sq = sq * lat_w.reshape(1, 1, H, 1)
    return sq.sum() / (B * P * H * W)
