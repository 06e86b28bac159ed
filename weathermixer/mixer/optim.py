"""AdamW on sharded parameters, with clipping by the true global gradient norm.

Each rank updates only its own blocks, and of each block only its replica's part: the block,
flattened, is cut into one contiguous part per member of `data` (`Layout.data_parts`). The
moments m and v are kept for that part alone; after the update every replica's part is
gathered over `data`, so that each replica holds the whole updated block again (the
optimizer state is sharded over replicas, as in ZeRO stage 1: 1/n_dp of the AdamW work and
moment memory per replica). With one replica the part is the whole block. Holders of a
replicated block (`ShardSpec.replicated_over`) receive identical gradients (after
`GradientSync`) and so make identical updates.

    g    <- g * min(1, clip / ||g||)         ||g|| over every parameter counted once
    m    <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2
    p    <- p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) - lr wd p   (wd: weights only)

Weight decay is decoupled (Loshchilov & Hutter) and applies to 2-D weights, not to biases or
LayerNorm parameters. A step whose norm is not finite changes nothing (t included).

Nothing here waits for the device: the norm, the clipping factor, the step count t and the
decision to skip are arrays of the parameters' module (a few numbers on the GPU), which the
update kernels read. The caller reads the step's statistics back once, after the whole step
is queued (`read_back`).
"""
from __future__ import annotations

import collections.abc

import numpy as np

from weathermixer.autograd.xp import (elementwise_kernel, get_array_module, is_device_array,
                                      raw_kernel, sum_of_squares, to_host)
from weathermixer.jigsaw import ops
from weathermixer.jigsaw.backend import InFlight


def global_grad_norm_squared(parts: dict, layout):
    """[1]: the sum of squares of every parameter's gradient, each element counted once (a
    block replicated over a group is counted only by that group's member 0), from each
    replica's part of each block (`data_part_of`), summed over `model` and `data`. On GPUs it
    stays on the device."""
    grid = layout.grid
    counted = [parts[name] for name, spec in layout.specs.items()
               if spec.replicated_over is None or grid.group(spec.replicated_over).rank == 0]
    in_model = ops.allreduce_sum(sum_of_squares(counted), grid.model, tag="grad_norm")
    return ops.allreduce_sum(in_model, grid.data, tag="grad_norm")


def data_part_of(block, layout, name: str):
    """This replica's part (`Layout.data_part`) of a block, flattened: a view. `block` may
    be the whole block (any shape) or already the part (as `GradientSync` cuts it)."""
    mine = layout.data_part(name)
    flat = block.reshape(-1)
    return flat if flat.size == mine.stop - mine.start else flat[mine]


def flat_view(p):
    """p [...] as a 1-D view, so that an update of the view is an update of p."""
    if not p.flags.c_contiguous:
        raise ValueError(f"parameter block of shape {p.shape} is not C-contiguous; the "
                         "optimizer updates parameters in place through a flat view")
    return p.reshape(-1)


def step_scalars(norm_sq, t, clip, betas, lr):
    """From the squared norm [1] and the steps taken so far t [1] (float64): the update's
    scalars [scale, lr / c1, c2, applied] and the new t, all arrays of the same module.
    applied is 1 where the norm is finite, else 0 (and t stays)."""
    xp = get_array_module(norm_sq)
    norm_sq = norm_sq.astype(np.float64)
    applied = xp.isfinite(norm_sq)
    norm = xp.sqrt(xp.where(applied, norm_sq, 0.0))
    scale = xp.ones_like(norm) if clip is None else xp.minimum(1.0, clip / (norm + 1e-12))
    t = t + applied
    b1, b2 = betas
    c1, c2 = 1.0 - b1 ** xp.maximum(t, 1.0), 1.0 - b2 ** xp.maximum(t, 1.0)
    return xp.concatenate([xp.where(applied, scale, 0.0), lr / c1, c2, applied * 1.0]), t


_ADAMW_UPDATE = r"""
__device__ __forceinline__ void update(T& p, T& m, T& v, const T g, const T* s, const T b1,
                                       const T b2, const T eps, const T decay) {
    const T gs = g * s[0];
    m = b1 * m + (T(1) - b1) * gs;
    v = b2 * v + (T(1) - b2) * gs * gs;
    p = p * decay - s[1] * m / (sqrt(v / s[2]) + eps);
}
"""

# float32 arrays that all start on a 16-byte boundary: a thread per four elements, the first
# n % 4 threads also taking one of the last n % 4.
_ADAMW_FOUR = _ADAMW_UPDATE + r"""
extern "C" __global__ void wm_adamw4(float* p, float* m, float* v, const float* g,
                                     const float* s, const float b1, const float b2,
                                     const float eps, const float decay, const long long n) {
    if (s[3] == 0.0f) return;  // a skipped step (the norm is not finite)
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n / 4) {
        float4 p4 = reinterpret_cast<float4*>(p)[i], m4 = reinterpret_cast<float4*>(m)[i];
        float4 v4 = reinterpret_cast<float4*>(v)[i];
        const float4 g4 = reinterpret_cast<const float4*>(g)[i];
        update(p4.x, m4.x, v4.x, g4.x, s, b1, b2, eps, decay);
        update(p4.y, m4.y, v4.y, g4.y, s, b1, b2, eps, decay);
        update(p4.z, m4.z, v4.z, g4.z, s, b1, b2, eps, decay);
        update(p4.w, m4.w, v4.w, g4.w, s, b1, b2, eps, decay);
        reinterpret_cast<float4*>(p)[i] = p4;
        reinterpret_cast<float4*>(m)[i] = m4;
        reinterpret_cast<float4*>(v)[i] = v4;
    }
    const long long k = n / 4 * 4 + i;
    if (k < n) update(p[k], m[k], v[k], g[k], s, b1, b2, eps, decay);
}
"""
_THREADS = 256


def adamw_update(p, m, v, g, s, b1, b2, eps, decay):
    """In place: m, v <- the moments of the clipped gradient g * s[0]; p <- the AdamW step with
    lr / c1 = s[1] and c2 = s[2], only where s[3] (applied) is 1. s [4] is `step_scalars`'s,
    in p's dtype. One fused pass over (p, m, v, g) on GPUs, one `update` formula in two
    kernels: four elements a load where all four arrays are 1-D, float32 and 16-byte aligned
    (4.17 TB/s on an H200 against 3.34, docs/benchmarks.md), else CuPy's elementwise loop;
    the same formula in numpy on CPUs."""
    if is_device_array(p):
        t, n = p.dtype.type, p.size
        arrays = (p, m, v, g)
        if all(a.dtype == np.float32 and a.ndim == 1 and a.flags.c_contiguous
               and a.data.ptr % 16 == 0 for a in arrays):
            threads = max(n // 4, n % 4)
            raw_kernel("wm_adamw4", _ADAMW_FOUR, np.float32)(
                (max(1, -(-threads // _THREADS)),), (_THREADS,),
                (p, m, v, g, s, t(b1), t(b2), t(eps), t(decay), np.int64(n)))
            return
        elementwise_kernel("wm_adamw", "T g, raw T s, T b1, T b2, T eps, T decay", "T p, T m, T v",
                           "if (s[3] != T(0)) update(p, m, v, g, &s[0], b1, b2, eps, decay);",
                           preamble=_ADAMW_UPDATE)(g, s, t(b1), t(b2), t(eps), t(decay), p, m, v)
        return
    scale, lr_c1, c2, applied = (float(a) for a in s)
    if not applied:
        return
    gs = g * scale if scale != 1.0 else g
    m *= b1
    m += (1.0 - b1) * gs
    v *= b2
    v += (1.0 - b2) * (gs * gs)
    if decay != 1.0:
        p *= decay
    p -= lr_c1 * m / (np.sqrt(v / c2) + eps)


def read_back(values: dict) -> dict:
    """{name: [1] array} -> {name: float}, in one device-to-host copy (a wait for the device:
    call it once the whole step is queued)."""
    xp = get_array_module(*values.values())
    flat = to_host(xp.concatenate([xp.asarray(v, dtype=np.float64).reshape(1)
                                   for v in values.values()]))
    return {name: float(x) for name, x in zip(values, flat)}


class AdamW:
    """AdamW with optional global-norm clipping; `state()` / `load_state()` for checkpoints.
    `m` and `v` hold this replica's part of each block (`Layout.data_part`), flat."""

    def __init__(self, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, clip_norm: float | None = None):
        self.lr, self.betas, self.eps = lr, betas, eps
        self.weight_decay, self.clip_norm = weight_decay, clip_norm
        self._t = np.zeros(1)  # [1] float64, of the parameters' module after the first step
        self.m: dict = {}
        self.v: dict = {}

    @property
    def t(self) -> int:
        """Steps applied so far (a read-back on GPUs)."""
        return int(to_host(self._t)[0])

    def step(self, params: dict, grads: dict, layout) -> dict:
        """Queue the update of `params` in place (the gathers over `data` may still run when
        `params` is a `ParamsInFlight`). grads[name] is the gradient of this rank's
        block summed over replicas: the whole block, or only this replica's part of it
        (`loss_array_and_grads(..., cut_over_data=True)`, which sends half the bytes).
        Returns {"grad_norm", "clip_scale", "skipped"} as [1] arrays of the parameters'
        module (`read_back` makes them numbers). A non-finite norm skips the step on every
        rank alike (the norm is summed over `model` and `data`)."""
        grid = layout.grid
        parts = {name: data_part_of(grads[name], layout, name) for name in params}
        norm_sq = global_grad_norm_squared(parts, layout)
        xp = get_array_module(norm_sq)
        s, self._t = step_scalars(norm_sq, xp.asarray(self._t), self.clip_norm, self.betas,
                                  self.lr)
        b1, b2 = self.betas
        in_dtype = {}  # s in each parameter dtype, made once
        for name, p in params.items():
            cut, mine, flat = layout.data_parts(name), layout.data_part(name), flat_view(p)
            size = mine.stop - mine.start
            if name not in self.m:  # first step: zero moments (not re-made every step)
                self.m[name] = xp.zeros(size, dtype=p.dtype)
                self.v[name] = xp.zeros_like(self.m[name])
            if self.m[name].size != size:
                raise ValueError(f"optimizer state of {name} has {self.m[name].size} elements, "
                                 f"but this replica's part of the block has {size}: the state "
                                 "is of another layout")
            decay = 1.0 - self.lr * self.weight_decay if p.ndim == 2 else 1.0
            if p.dtype not in in_dtype:
                in_dtype[p.dtype] = s.astype(p.dtype)
            adamw_update(flat[mine], self.m[name], self.v[name], parts[name], in_dtype[p.dtype],
                         b1, b2, self.eps, decay)
            # every replica's updated part to every replica, beside the next part's update
            event = grid.data.allgather_in_place(flat, cut.sizes, tag="optimizer.gather",
                                                 overlap=True, kept=True)  # a parameter
            if event is not None and isinstance(params, ParamsInFlight):
                params.arriving[name] = InFlight(p, event)
        if not isinstance(params, ParamsInFlight):
            grid.data.wait()
        return {"grad_norm": xp.sqrt(norm_sq.astype(np.float64)), "clip_scale": s[0:1],
                "skipped": 1.0 - s[3:4]}

    def state(self, layout) -> dict:
        """{'m': blocks, 'v': blocks}: this rank's whole blocks for a checkpoint, each gathered
        over `data` when asked for (a collective: every replica asks for the same names in
        the same order)."""
        return {"m": WholeBlocks(self.m, layout), "v": WholeBlocks(self.v, layout)}

    def load_state(self, states: dict, t: int, layout):
        """From whole blocks {'m': {...}, 'v': {...}}, keep this replica's parts."""
        self.m, self.v = ({name: data_part_of(block, layout, name).copy()
                           for name, block in states[s].items()} for s in ("m", "v"))
        self._t = np.array([float(t)])


class ParamsInFlight(dict):
    """A parameter dict whose blocks may still be arriving: after `AdamW.step` with replicas
    on GPUs, each block's gather over `data` still runs on the side stream, and reading
    `params[name]` makes the current stream wait for that block's gather alone (the host
    does not wait). So the next forward starts at once, each layer waiting only for its own
    weights while the later ones arrive. `values()` and `items()` wait for every block."""

    def __init__(self, params: dict):
        super().__init__(params)
        self.arriving: dict = {}  # name -> backend.InFlight of the block's gather

    def __getitem__(self, name: str):
        if name in self.arriving:
            self.arriving.pop(name).get()
        return super().__getitem__(name)

    def values(self):
        return [self[name] for name in self]

    def items(self):
        return [(name, self[name]) for name in self]


class WholeBlocks(collections.abc.Mapping):
    """A moment's whole blocks, from every replica's part of them: `[name]` gathers the parts
    of one block over `data` into a new array of the block's shape."""

    def __init__(self, parts: dict, layout):
        self.parts, self.layout = parts, layout

    def __getitem__(self, name: str):
        layout, part = self.layout, self.parts[name]
        cut = layout.data_parts(name)
        flat = get_array_module(part).empty(cut.n, dtype=part.dtype)  # [block size]
        flat[layout.data_part(name)] = part
        layout.grid.data.allgather_in_place(flat, cut.sizes, tag="checkpoint")
        return flat.reshape(layout.specs[name].block_shape(layout.coords))

    def __iter__(self):
        return iter(self.parts)

    def __len__(self):
        return len(self.parts)
