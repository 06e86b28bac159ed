"""The distributed GEMMs of Jigsaw on a Pd x Pc grid (JIGSAW.md sections 3 and 10).

A `Frame` says which grid group cuts the rows of the activation and which cuts its columns.
In the `STANDARD` frame rows are tokens (or pixels), cut over `domain`, and columns are
channels, cut over `channel`. Token mixing runs in the `TRANSPOSED` frame on the transposed
view of the activation [channels, tokens], so the roles of the two groups swap and JIGSAW.md's
token-mixing transpose becomes a local view (its "optional relabelling").

With r the rank's coordinate in `frame.rows` and c its coordinate in `frame.cols`:

    xwt   Y = X W^T   X [.., R_r, K_c]  W [N_r, K_c]  ->  Y [.., R_r, N_c]
          W panel gathered over rows, local GEMM, partial sums reduce-scattered over cols
    xw    Y = X W     X [.., R_r, A_c]  W [A_r, B_c]  ->  Y [.., R_r, B_c]
          X gathered over cols, W gathered over rows, local GEMM
    xtw   Y = X^T W   X [.., R_r, A_c]  W [.., R_r, B_c] -> Y [A_r, B_c]   (batch summed too)
          X gathered over cols, local GEMM, partial sums reduce-scattered over rows

        K_0   K_1        X [T, K], STANDARD frame on a 2 x 2 grid:
  T_0 | r0  | r1  |      T over `domain`, K over `channel`; rank (i, j) = 2i + j
  T_1 | r2  | r3  |      local block [T_loc, K_loc]

Backward passes are two more of these kernels (JIGSAW.md section 3):

    forward          dX                 dW
    xwt(X, W)        xw(dY, W)          xtw(dY, X)
    xw(X, W)         xwt(dY, W)         xtw(X, dY)
    xtw(X, W)        xwt(W, dY)         xw(X, dY)

On a 2 x 2 grid xwt is the balanced pairwise schedule of JIGSAW.md section 8: one W block
from the column partner, two local GEMMs, one partial product each way with the row partner.
Partitions: `w_rows` cuts W's rows over `frame.rows`, `out_cols` cuts Y's columns over
`frame.cols` (both contiguous). The leading axes of X (the batch) ride along.
"""
from __future__ import annotations

import dataclasses

from weathermixer.autograd.linear import (c_contiguous, contract_leading,
                                          input_gradient_operands, matmul)
from weathermixer.autograd.xp import get_array_module
from weathermixer.jigsaw import ops
from weathermixer.jigsaw.shard import Partition, offsets


@dataclasses.dataclass(frozen=True)
class Frame:
    rows: str  # group that cuts the rows of X (and of W in xwt)
    cols: str  # group that cuts the columns of X and of the output


STANDARD = Frame(rows="domain", cols="channel")
TRANSPOSED = Frame(rows="channel", cols="domain")


def start_panel(w, grid, frame: Frame, w_rows: Partition):
    """Begin gathering the W panel [N, K_c] of `xwt` over `frame.rows` (a `backend.InFlight`
    to hand to `xwt_forward`): the panel does not depend on the data, so a layer can start it
    before its input is ready and the gather overlaps the compute before it."""
    return ops.start_gather(w, grid.group(frame.rows), 0, w_rows, tag="xwt.gather_w")


def xwt_forward(x, w, grid, frame: Frame, w_rows: Partition, out_cols: Partition,
                transposed_out: bool = False, panel=None):
    """Y = X W^T: X [.., R_r, K_c], W [N_r, K_c] -> (Y [.., R_r, N_c], cache). With
    `transposed_out`, Y is a transposed view of a C-contiguous [.., N_c, R_r] array, written
    so by the GEMM itself (the head's output, so that the prediction [B, V, h, W] is a view).
    `panel`: the W panel's gather if begun already (`start_panel`).

    The partial product of every output block is handed to the reduce-scatter as soon as it
    is computed, the other members' blocks first: on GPUs each travels while the next GEMM
    runs (`backend.PairwiseExchange`, which also has the own block computed in two pieces)."""
    cols = grid.group(frame.cols)
    wg = (panel or start_panel(w, grid, frame, w_rows)).get()  # [N, K_c]
    sizes, o = out_cols.sizes, offsets(out_cols.sizes)
    store = _parts_store(x, sizes, transposed_out)  # [Pc, .., R_r, m], or [Pc, .., m, R_r]
    parts = store.swapaxes(-1, -2) if transposed_out else store  # [Pc, .., R_r, m]
    exchange = ops.scatter_parts_as_computed(store, cols, tag="xwt.scatter_y")
    for p in exchange.order:
        if p == cols.rank and exchange.split_own and not transposed_out:
            for c0, c1, piece in exchange.own_pieces(sizes[p]):  # [.., R_r, c1 - c0]
                matmul(x, wg[o[p] + c0:o[p] + c1].T, out=piece)
        else:
            _partial_product(x, wg, sizes, p, parts[p])
        exchange.ready(p)
    y = exchange.result()  # [.., R_r, m], or its storage
    y = y.swapaxes(-1, -2) if transposed_out else y  # [.., R_r, m]
    return y[..., :out_cols.size(cols.rank)], (x, w, grid, frame, w_rows, out_cols)


def _parts_store(x, sizes, transposed: bool):
    """Room for the partial products X W[N_p]^T of every output part p, stacked on a leading
    axis and padded to the largest part: [parts, .., R, max(sizes)], ready for a
    reduce-scatter. With `transposed`, the C-contiguous [parts, .., max(sizes), R] array
    whose view that is."""
    xp = get_array_module(x)
    m = max(sizes)
    alloc = xp.empty if all(s == m for s in sizes) else xp.zeros  # zero padding
    lead, r = (len(sizes),) + x.shape[:-2], x.shape[-2]
    return alloc(lead + ((m, r) if transposed else (r, m)), dtype=x.dtype)


def _partial_product(x, wg, sizes, p: int, out):
    """out [.., R, m] <- X W[N_p]^T in its first sizes[p] columns (the rest stays padding)."""
    o = offsets(sizes)
    if sizes[p] == out.shape[-1]:
        matmul(x, wg[o[p]:o[p + 1]].T, out=out)
    else:
        out[..., :sizes[p]] = matmul(x, wg[o[p]:o[p + 1]].T)


def xwt_backward(dy, cache, need_dx: bool = True, on_dw=None):
    """(dX [.., R_r, K_c], dW [N_r, K_c]) = (xw(dY, W), xtw(dY, X)), sharing one gather of dY.
    Without `need_dx` (the first layer), dX is None and its GEMM is skipped. `on_dw(dW)` (if
    given) is called as soon as dW is complete without holding up dX: before the dX GEMMs
    where dW needs no reduce-scatter over `frame.rows`, after them where it does.

    dW first, then dX, so that on GPUs every exchange runs beside a GEMM that does not need
    it: dY's other blocks and the W panel arrive while the own block's dW is computed
    (`backend.PartsGather`, `start_panel`), and dW's partial sums are reduce-scattered while
    dX is computed. Nothing is transposed: dY's blocks are used block by block. The W panel
    is gathered again rather than cached from the forward: one more exchange instead of
    holding a gathered panel per layer between forward and backward.
    """
    x, w, grid, frame, w_rows, out_cols = cache
    rows, cols = grid.group(frame.rows), grid.group(frame.cols)
    sizes, o = out_cols.sizes, offsets(out_cols.sizes)
    xp = get_array_module(dy)
    m = max(sizes)
    # [.., R_r, m]: padded, or made C-contiguous once for both the wire and this rank's GEMMs
    mine = (_pad_last(dy, m) if dy.shape[-1] != m else
            c_contiguous(dy) if cols.size > 1 else dy)
    gathered = ops.scatter_parts_adjoint_own_first(mine, cols, tag="xwt.gather_dy")
    panel = start_panel(w, grid, frame, w_rows) if need_dx else None
    blocks = {}  # dY[.., R_r, N_p] by p
    if len(sizes) == 1:
        blocks[0] = gathered.block(0)
        dwg = contract_leading(blocks[0], x)  # [N, K_c], partial over R parts
    else:
        dwg = xp.empty((o[-1], x.shape[-1]), dtype=x.dtype)  # [N, K_c], partial over R parts
        for p in gathered.order:  # own block first: the first other block waits for the gather
            blocks[p] = gathered.block(p)[..., :sizes[p]]
            contract_leading(blocks[p], x, out=dwg[o[p]:o[p + 1]])
    dw = ops.start_gather_adjoint(dwg, rows, 0, w_rows, tag="xwt.scatter_dw")  # [N_r, K_c]
    early = on_dw is not None and rows.size == 1  # no reduce-scatter over rows: dW is done
    if early:
        on_dw(dw.get())
    dx = None
    if need_dx:
        wg = panel.get()  # [N, K_c]
        for p in gathered.order:  # dX = sum over p of dY[N_p] W[N_p]
            a, b = input_gradient_operands(blocks[p], wg[o[p]:o[p + 1]])
            if dx is None:
                # [.., R_r, K_c], laid out as X is (empty_like keeps the layout: token-major
                # in token mixing)
                dx = matmul(a, b, out=xp.empty_like(x))
            else:
                matmul(a, b, out=dx, accumulate=True)
    if on_dw is not None and not early:
        on_dw(dw.get())
    return dx, dw.get()


def _pad_last(a, m: int):
    """a [.., s] -> [.., m], zeros after s (uneven parts travel padded to one shape)."""
    xp = get_array_module(a)
    out = xp.zeros(a.shape[:-1] + (m,), dtype=a.dtype)
    out[..., :a.shape[-1]] = a
    return out


def xw_forward(x, w, grid, frame: Frame, a_x: Partition, a_w: Partition):
    """Y = X W: X [.., R_r, A_c], W [A_r, B_c] -> (Y [.., R_r, B_c], cache).
    `a_x` cuts A over `frame.cols` (in X), `a_w` cuts A over `frame.rows` (in W)."""
    rows, cols = grid.group(frame.rows), grid.group(frame.cols)
    xg = ops.gather(x, cols, -1, a_x, tag="xw.gather_x")  # [.., R_r, A]
    wg = ops.gather(w, rows, 0, a_w, tag="xw.gather_w")  # [A, B_c]
    return matmul(xg, wg), (x, w, grid, frame, a_x, a_w)


def xw_backward(dy, cache):
    """(dX, dW) = (xwt(dY, W), xtw(X, dY))."""
    x, w, grid, frame, a_x, a_w = cache
    dx, _ = xwt_forward(dy, w, grid, frame, a_w, a_x)
    dw, _ = xtw_forward(x, dy, grid, frame, a_x, a_w)
    return dx, dw


def xtw_forward(x, w, grid, frame: Frame, a_x: Partition, a_out: Partition):
    """Y = X^T W: X [.., R_r, A_c], W [.., R_r, B_c] -> (Y [A_r, B_c], cache), summed over
    the leading axes. `a_x` cuts A over `frame.cols`, `a_out` cuts A over `frame.rows`."""
    rows, cols = grid.group(frame.rows), grid.group(frame.cols)
    xg = ops.gather(x, cols, -1, a_x, tag="xtw.gather_x")  # [.., R_r, A]
    partial = contract_leading(xg, w)  # [A, B_c], partial over R
    y = ops.scatter_sum(partial, rows, 0, a_out, tag="xtw.scatter_y")  # [A_r, B_c]
    return y, (x, w, grid, frame, a_x, a_out)


def xtw_backward(dy, cache):
    """(dX, dW) = (xwt(W, dY), xw(X, dY))."""
    x, w, grid, frame, a_x, a_out = cache
    dx, _ = xwt_forward(w, dy, grid, frame, a_out, a_x)
    dw, _ = xw_forward(x, dy, grid, frame, a_x, a_out)
    return dx, dw
