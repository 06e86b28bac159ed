"""Distributed kernels equal their serial forms, forward and backward (float64, < 1e-12).

For every grid of this world and both frames: xwt, xw, xtw and their backward passes, the
exact LayerNorm over a channel-sharded axis, and the kernels' adjoint identities
<XW(X, W), G> = <X, XWt(G, W)> = <W, XtW(X, G)>. Sizes are odd and parts uneven, and the
contraction axis is cut into index sets (not ranges) like the patch axis K.
"""
import numpy as np
import pytest

from tests.mpi.harness import (assert_all, grids_for_world, make_grid, relative_error,
                               sum_over_ranks)
from weathermixer.autograd import layernorm as serial_ln
from weathermixer.jigsaw import layernorm as dist_ln
from weathermixer.jigsaw import ops
from weathermixer.jigsaw.matmul import (STANDARD, TRANSPOSED, xtw_backward, xtw_forward,
                                        xw_backward, xw_forward, xwt_backward, xwt_forward)
from weathermixer.jigsaw.shard import Partition, take

GRIDS = grids_for_world()
TOL = 1e-12
B, R, K, N = 2, 7, 9, 11  # batch, rows, contraction, output columns


def coords(grid, frame):
    """(r, c, rows group size, cols group size) of this rank in `frame`."""
    rows, cols = grid.group(frame.rows), grid.group(frame.cols)
    return rows.rank, cols.rank, rows.size, cols.size


def composite(n1, n2, parts):
    """An index-set partition of n1 + n2 (part p = part p of n1, then part p of n2 offset)."""
    return Partition.concat(Partition.even(n1, parts), Partition.even(n2, parts))


def xw_partitions(nr, nc):
    """The cuts of the xw and xtw tests: rows R over `frame.rows`, A = K over `frame.cols` (in
    X) and over `frame.rows` (in W, or in xtw's output), C = N over `frame.cols`."""
    return (Partition.even(R, nr), Partition.even(K, nc), Partition.even(K, nr),
            Partition.even(N, nc))


def close(a, b, what):
    err = relative_error(a, b)
    assert_all(err < TOL, f"{what}: relative error {err:.3e}")


@pytest.mark.parametrize("pd,pc", GRIDS)
@pytest.mark.parametrize("frame", [STANDARD, TRANSPOSED], ids=["standard", "transposed"])
def test_xwt_equals_serial(pd, pc, frame):
    grid = make_grid(pd, pc)
    r, c, nr, nc = coords(grid, frame)
    rng = np.random.default_rng(0)  # the same global arrays on every rank
    X, W, dY = rng.normal(size=(B, R, K)), rng.normal(size=(N, K)), rng.normal(size=(B, R, N))
    rows, kc = Partition.even(R, nr), composite(4, K - 4, nc)
    w_rows, out_cols = Partition.even(N, nr), Partition.even(N, nc)
    x = take(X, (slice(None), rows.index(r), kc.index(c)))
    w = take(W, (w_rows.index(r), kc.index(c)))
    y, cache = xwt_forward(x, w, grid, frame, w_rows, out_cols)
    close(y, take(X @ W.T, (slice(None), rows.index(r), out_cols.index(c))), "xwt forward")
    dx, dw = xwt_backward(take(dY, (slice(None), rows.index(r), out_cols.index(c))), cache)
    close(dx, take(dY @ W, (slice(None), rows.index(r), kc.index(c))), "xwt dX")
    dW = np.einsum("brn,brk->nk", dY, X)
    close(dw, take(dW, (w_rows.index(r), kc.index(c))), "xwt dW")


@pytest.mark.parametrize("pd,pc", GRIDS)
@pytest.mark.parametrize("frame", [STANDARD, TRANSPOSED], ids=["standard", "transposed"])
def test_xw_equals_serial(pd, pc, frame):
    grid = make_grid(pd, pc)
    r, c, nr, nc = coords(grid, frame)
    rng = np.random.default_rng(1)
    X, W, dY = rng.normal(size=(B, R, K)), rng.normal(size=(K, N)), rng.normal(size=(B, R, N))
    rows, a_x, a_w, cols = xw_partitions(nr, nc)
    x = take(X, (slice(None), rows.index(r), a_x.index(c)))
    w = take(W, (a_w.index(r), cols.index(c)))
    y, cache = xw_forward(x, w, grid, frame, a_x, a_w)
    close(y, take(X @ W, (slice(None), rows.index(r), cols.index(c))), "xw forward")
    dx, dw = xw_backward(take(dY, (slice(None), rows.index(r), cols.index(c))), cache)
    close(dx, take(dY @ W.T, (slice(None), rows.index(r), a_x.index(c))), "xw dX")
    close(dw, take(np.einsum("bra,brc->ac", X, dY), (a_w.index(r), cols.index(c))), "xw dW")


@pytest.mark.parametrize("pd,pc", GRIDS)
@pytest.mark.parametrize("frame", [STANDARD, TRANSPOSED], ids=["standard", "transposed"])
def test_xtw_equals_serial(pd, pc, frame):
    grid = make_grid(pd, pc)
    r, c, nr, nc = coords(grid, frame)
    rng = np.random.default_rng(2)
    X, W, dY = rng.normal(size=(B, R, K)), rng.normal(size=(B, R, N)), rng.normal(size=(K, N))
    rows, a_x, a_out, cols = xw_partitions(nr, nc)
    x = take(X, (slice(None), rows.index(r), a_x.index(c)))
    w = take(W, (slice(None), rows.index(r), cols.index(c)))
    y, cache = xtw_forward(x, w, grid, frame, a_x, a_out)
    close(y, take(np.einsum("bra,brc->ac", X, W), (a_out.index(r), cols.index(c))), "xtw forward")
    dx, dw = xtw_backward(take(dY, (a_out.index(r), cols.index(c))), cache)
    close(dx, take(W @ dY.T, (slice(None), rows.index(r), a_x.index(c))), "xtw dX")
    close(dw, take(X @ dY, (slice(None), rows.index(r), cols.index(c))), "xtw dW")


@pytest.mark.parametrize("pd,pc", GRIDS)
def test_kernel_adjoint_identities(pd, pc):
    """<XW(X, W), G> = <X, XWt(G, W)> = <W, XtW(X, G)>, summed over ranks."""
    grid = make_grid(pd, pc)
    frame = STANDARD
    r, c, nr, nc = coords(grid, frame)
    rng = np.random.default_rng(100 + grid.world.rank)  # local blocks differ per rank
    a_x, a_w, cols = Partition.even(K, nc), Partition.even(K, nr), Partition.even(N, nc)
    rows = Partition.even(R, nr)
    x = rng.normal(size=(B, rows.size(r), a_x.size(c)))
    w = rng.normal(size=(a_w.size(r), cols.size(c)))
    g = rng.normal(size=(B, rows.size(r), cols.size(c)))
    y, _ = xw_forward(x, w, grid, frame, a_x, a_w)
    xg, _ = xwt_forward(g, w, grid, frame, a_w, a_x)
    wg, _ = xtw_forward(x, g, grid, frame, a_x, a_w)
    s1, s2, s3 = (sum_over_ranks(np.vdot(y, g)), sum_over_ranks(np.vdot(x, xg)),
                  sum_over_ranks(np.vdot(w, wg)))
    assert_all(abs(s1 - s2) < 1e-12 * abs(s1) and abs(s1 - s3) < 1e-12 * abs(s1),
               f"adjoint identities: {s1} {s2} {s3}")


@pytest.mark.parametrize("pd,pc", GRIDS)
@pytest.mark.parametrize("axis", [-1, 1])
def test_layernorm_over_sharded_axis_equals_serial(pd, pc, axis):
    grid = make_grid(pd, pc)
    rng = np.random.default_rng(3)
    E = 13
    shape = (2, 5, E) if axis == -1 else (2, E, 5, 3)
    U = rng.normal(size=shape) * 3.0 + 1.5
    scale, bias, dOut = rng.normal(size=E), rng.normal(size=E), rng.normal(size=shape)
    out, cache = serial_ln.layernorm_forward(U, scale, bias, axis=axis)
    dU, dscale, dbias = serial_ln.layernorm_backward(dOut, cache)
    ec, rows = Partition.even(E, pc), Partition.even(5, pd)
    if axis == -1:
        index = (slice(None), rows.index(grid.i), ec.index(grid.j))
    else:
        index = (slice(None), ec.index(grid.j), rows.index(grid.i), slice(None))
    e = ec.index(grid.j)
    o, c = dist_ln.layernorm_forward(take(U, index), scale[e], bias[e], grid, axis, E)
    close(o, take(out, index), "layernorm forward")
    du, ds, db = dist_ln.layernorm_backward(take(dOut, index), c)
    close(du, take(dU, index), "layernorm du")
    # dscale, dbias are partial over this rank's rows: complete them over `domain`
    close(ops.allreduce_sum(ds, grid.domain), dscale[e], "layernorm dscale")
    close(ops.allreduce_sum(db, grid.domain), dbias[e], "layernorm dbias")
