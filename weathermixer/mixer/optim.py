"""AdamW on sharded parameters, with clipping by the true global gradient norm.

Each rank updates only its own blocks; the moments m and v are cut like their parameters.
Holders of a replicated block (`ShardSpec.replicated_over`) receive identical gradients (after
`GradientSync`) and so make identical updates.

    g    <- g * min(1, clip / ||g||)         ||g|| over every parameter counted once
    m    <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2
    p    <- p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) - lr wd p   (wd: weights only)

Weight decay is decoupled (Loshchilov & Hutter) and applies to 2-D weights, not to biases or
LayerNorm parameters.
"""
from __future__ import annotations

import math

import numpy as np

from weathermixer.autograd.xp import (elementwise_kernel, get_array_module, is_device_array,
                                      sum_of_squares)
from weathermixer.jigsaw import ops


def global_grad_norm(grads: dict, layout) -> float:
    """sqrt of the sum of squares of every parameter's gradient, each element counted once:
    a block replicated over a group is counted only by that group's member 0. On GPUs the
    per-parameter sums stay on the device and are read back once."""
    grid = layout.grid
    counted = [grads[name] for name, spec in layout.specs.items()
               if spec.replicated_over is None or grid.group(spec.replicated_over).rank == 0]
    local = sum_of_squares(counted)
    total = ops.allreduce_sum(np.array([local]), grid.model, tag="grad_norm")  # host scalar
    return math.sqrt(float(total[0]))


_ADAMW = """
T gs = g * scale;
m = b1 * m + (T(1) - b1) * gs;
v = b2 * v + (T(1) - b2) * gs * gs;
p = p * decay - lr_c1 * m / (sqrt(v / c2) + eps);
"""


def adamw_update(p, m, v, g, scale, b1, b2, lr_c1, c2, eps, decay):
    """In place: m, v <- the moments of the clipped gradient g * scale; p <- the AdamW step.
    One fused pass over (p, m, v, g) on GPUs; the same formula in numpy on CPUs."""
    if is_device_array(p):
        t = p.dtype.type
        elementwise_kernel("wm_adamw", "T g, T scale, T b1, T b2, T lr_c1, T c2, T eps, T decay",
                           "T p, T m, T v", _ADAMW)(g, t(scale), t(b1), t(b2), t(lr_c1), t(c2),
                                                     t(eps), t(decay), p, m, v)
        return
    xp = get_array_module(p)
    gs = g * scale if scale != 1.0 else g
    m *= b1
    m += (1.0 - b1) * gs
    v *= b2
    v += (1.0 - b2) * (gs * gs)
    if decay != 1.0:
        p *= decay
    p -= lr_c1 * m / (xp.sqrt(v / c2) + eps)


class AdamW:
    """AdamW with optional global-norm clipping; `state()` / `load_state()` for checkpoints."""

    def __init__(self, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, clip_norm: float | None = None):
        self.lr, self.betas, self.eps = lr, betas, eps
        self.weight_decay, self.clip_norm = weight_decay, clip_norm
        self.t = 0
        self.m: dict = {}
        self.v: dict = {}

    def step(self, params: dict, grads: dict, layout) -> dict:
        """Update `params` in place. Returns {"grad_norm", "clip_scale", "skipped"}; a
        non-finite norm skips the step on every rank alike (the norm is agreed over `model`,
        and replicas hold identical gradients)."""
        norm = global_grad_norm(grads, layout)
        if not math.isfinite(norm):
            return {"grad_norm": norm, "clip_scale": 0.0, "skipped": True}
        scale = 1.0
        if self.clip_norm is not None and norm > self.clip_norm:
            scale = self.clip_norm / (norm + 1e-12)
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1.0 - b1 ** self.t, 1.0 - b2 ** self.t
        for name, p in params.items():
            if name not in self.m:  # first step: zero moments (not re-made every step)
                xp = get_array_module(p)
                self.m[name], self.v[name] = xp.zeros_like(p), xp.zeros_like(p)
            m, v = self.m[name], self.v[name]
            decay = 1.0 - self.lr * self.weight_decay if p.ndim == 2 else 1.0
            adamw_update(p, m, v, grads[name], scale, b1, b2, self.lr / c1, c2, self.eps, decay)
        return {"grad_norm": norm, "clip_scale": scale, "skipped": False}

    def state(self) -> dict:
        """{'m': {...}, 'v': {...}} (this rank's blocks) for a checkpoint."""
        return {"m": self.m, "v": self.v}

    def load_state(self, states: dict, t: int):
        self.m, self.v, self.t = dict(states["m"]), dict(states["v"]), int(t)
