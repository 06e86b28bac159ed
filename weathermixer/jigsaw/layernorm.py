"""Exact LayerNorm over an axis sharded across the `channel` group (JIGSAW.md section 5).

The serial `autograd.layernorm` names its four reductions (two in forward, two packed into
one in backward); here each is completed by an allreduce-sum over `channel`, and every
division uses the global length `count` of the axis (E, P or 2P), never the local one.
Forward is the two-pass form (sum, then sum of squared deviations): no cancellation in float32.
Where `channel` is one rank the axis is whole here and no allreduce is passed, which on GPUs
lets the LN run in fused kernels (`autograd.layernorm_fused`).

    u [B, T_loc, E_loc] (or [B, P_loc, rows_loc, W] for the head, axis=1):
    E (or P) cut over `channel`; scale, bias [E_loc]: replicated over `domain`, whose gradient
    sums are completed by the gradient synchronisation step (`mixer.model.GradientSync`).
"""
from __future__ import annotations

from weathermixer.autograd import layernorm as serial
from weathermixer.jigsaw import ops


def layernorm_forward(u, scale, bias, grid, axis: int, count: int):
    """Returns (out, cache); `layernorm_backward` completes its reductions the same way."""
    group = grid.channel

    def allreduce(partial):
        return ops.allreduce_sum(partial, group, tag="layernorm")

    return serial.layernorm_forward(u, scale, bias, axis=axis, count=count,
                                    allreduce=allreduce if group.size > 1 else None)


layernorm_backward = serial.layernorm_backward
