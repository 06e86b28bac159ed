"""CuPy correctness: runs where CuPy sees a GPU (the device machine), skips cleanly elsewhere.

float64 CuPy equals float64 numpy for predict, loss and every gradient; a short TF32
training run's loss curve tracks the fp32 one; and every 2-rank layout on 2 GPUs and every
4-rank layout on 4 GPUs (NCCL) ends where 1 GPU ends in float64.
"""
import json

import numpy as np
import pytest

import weathermixer as wm
from weathermixer.autograd.xp import cupy_available, module

pytestmark = pytest.mark.skipif(not cupy_available(), reason="needs CuPy and a GPU")

CFG = wm.Config(n_lat=10, n_lon=12, n_prognostic=5, n_static=2, patch_lat=2, patch_lon=4,
                embed_dim=13, token_hidden_dim=7, channel_hidden_dim=9, n_blocks=2)


def test_cupy_float64_equals_numpy_float64():
    cp = module("cupy")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, CFG.n_vars, CFG.n_lat, CFG.n_lon))
    t = rng.standard_normal((3, CFG.n_prognostic, CFG.n_lat, CFG.n_lon))
    lat_w, var_w = rng.uniform(0.5, 1.5, CFG.n_lat), rng.uniform(0.5, 1.5, CFG.n_prognostic)
    host = wm.init_params(CFG, seed=1)
    dev = wm.init_params(CFG, seed=1, xp=cp)
    for rollout in (1, 2):
        loss, grads = wm.loss_and_grads(host, x, t, CFG, rollout, lat_w, var_w)
        dloss, dgrads = wm.loss_and_grads(dev, cp.asarray(x), cp.asarray(t), CFG, rollout,
                                          cp.asarray(lat_w), cp.asarray(var_w))
        assert abs(dloss - loss) <= 1e-12 * abs(loss)
        scale = max(np.abs(g).max() for g in grads.values())
        for k in grads:
            assert isinstance(dgrads[k], cp.ndarray)
            err = np.abs(cp.asnumpy(dgrads[k]) - grads[k]).max() / max(np.abs(grads[k]).max(), scale)
            assert err < 1e-12, (k, err)
        y = wm.predict(dev, cp.asarray(x), CFG, rollout)
        assert np.abs(cp.asnumpy(y) - wm.predict(host, x, CFG, rollout)).max() < 1e-12


def _losses(tmp_path, name, *args, n=1):
    from tests.test_train_cli import ok, train_cli
    out = tmp_path / name
    ok(train_cli(["--device", "gpu", "--steps", "40", "--out", str(out)] + list(args), n=n))
    return [json.loads(line)["loss"] for line in open(out / "metrics.jsonl")], out


def test_tf32_training_tracks_fp32(tmp_path):
    tf32, _ = _losses(tmp_path, "tf32", "--precision", "tf32")
    fp32, _ = _losses(tmp_path, "fp32", "--precision", "fp32")
    assert tf32[-1] < 0.5 * tf32[0]
    rel = np.abs(np.array(tf32) - np.array(fp32)) / np.array(fp32)
    assert rel.max() < 0.05, rel


@pytest.mark.skipif(not cupy_available() or module("cupy").cuda.runtime.getDeviceCount() < 2,
                    reason="needs 2 GPUs")
@pytest.mark.parametrize("copies", ["copy-engines", "nccl-only"])
@pytest.mark.parametrize("layout", [("--jigsaw", "2"), ("--grid", "2x1"), ("--jigsaw", "1")],
                         ids=["1x2", "2x1", "two-replicas"])
def test_two_gpus_equal_one_gpu(tmp_path, monkeypatch, layout, copies):
    """2 GPUs: 2-way over channels, 2-way over tokens, and 2 replicas (whose gradient sums
    overlap the backward on a side stream) end where 1 GPU ends, float64; with the pair's
    block transfers on the copy engines (`jigsaw.peer`, the default) and with NCCL alone."""
    from tests.test_train_cli import EXACT, max_relative_difference
    monkeypatch.setenv("WEATHERMIXER_PEER_COPIES", "1" if copies == "copy-engines" else "0")
    _, one = _losses(tmp_path, "one", *EXACT)
    _, two = _losses(tmp_path, "two", *EXACT, *layout, n=2)
    assert max_relative_difference(one / "last.h5", two / "last.h5") < 1e-10


@pytest.mark.skipif(not cupy_available() or module("cupy").cuda.runtime.getDeviceCount() < 2,
                    reason="needs 2 GPUs")
def test_a_pair_of_gpus_moves_blocks_on_the_copy_engines(tmp_path):
    """`weathermixer bench` on 2x1 reports the domain pair's transfers on the copy engines
    (the CUDA IPC set-up succeeded on both ranks), and NCCL alone where they are turned off."""
    import os
    from tests.test_bench_cli import SMALL
    from tests.test_mpi import run_under_mpi
    args = ["-m", "weathermixer", "bench", "--device", "gpu", "--grid", "2x1", "--batch",
            "1"] + SMALL
    for setting, want in (("1", "copy engines"), ("0", "NCCL kernels")):
        out = tmp_path / f"bench-{setting}.json"
        proc = run_under_mpi(2, args + ["--json", str(out)], limit=300,
                             env=dict(os.environ, WEATHERMIXER_PEER_COPIES=setting))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        rows = json.loads(out.read_text())["rows"]
        assert all(want in r["transport"]["domain"] for r in rows), rows
        assert all(r["transport"]["channel"] == "none (one rank)" for r in rows), rows
        if setting == "0":
            assert all("copy" not in r["transport"]["domain"] for r in rows), rows


@pytest.mark.parametrize("dtype, n, offset, tol", [(np.float64, 35, 0, 1e-14),
                                                  (np.float32, 1003, 0, 1e-6),
                                                  (np.float32, 3, 0, 1e-6),
                                                  (np.float32, 1003, 1, 1e-6)],
                         ids=["float64", "float32-four-a-load", "float32-tail-only",
                              "float32-unaligned"])
def test_fused_adamw_equals_the_numpy_formula(dtype, n, offset, tol):
    """The AdamW kernel against numpy: float64, float32 four elements a load with a tail of
    n % 4, and float32 views that start off a 16-byte boundary (one at a time)."""
    from weathermixer.mixer.optim import adamw_update
    cp = module("cupy")
    rng = np.random.default_rng(3)
    p, m, g = (rng.standard_normal(n + offset).astype(dtype) for _ in range(3))
    v = rng.uniform(0.1, 1.0, n + offset).astype(dtype)
    for applied in (1.0, 0.0):  # a step, and a skipped one
        s = np.array([0.7, 1e-3 / 0.1, 1 - 0.999 ** 3, applied], dtype=dtype)
        args = (0.9, 0.999, 1e-8, 0.99)
        dev = [cp.asarray(a) for a in (p, m, v)]
        adamw_update(*(d[offset:] for d in dev), cp.asarray(g)[offset:], cp.asarray(s), *args)
        adamw_update(p[offset:], m[offset:], v[offset:], g[offset:], s, *args)
        for d, h in zip(dev, (p, m, v)):
            assert np.abs(cp.asnumpy(d) - h).max() <= tol * max(1.0, np.abs(h).max())


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 2e-5)])
@pytest.mark.parametrize("shape, axis", [((3, 41, 1), -1), ((3, 41, 7), -1), ((2, 500, 4327), -1),
                                         ((601, 8192), -1), ((3, 5, 7, 11), 1), ((37, 5, 6), 0),
                                         ((2, 138, 33, 61), 1), ((1, 23, 700, 450), 1)],
                         ids=["rows-of-one", "rows-under-a-warp", "rows-several-per-block",
                              "rows-longest", "columns", "columns-axis-0", "columns-138",
                              "columns-more-than-one-wave"])
def test_fused_layernorm_equals_the_numpy_formula(shape, axis, dtype, tol):
    """The fused kernels (`autograd.layernorm_fused`) against numpy float64. Rows (the last
    axis): one element, fewer than a warp, several elements per thread with blocks of several
    rows and a shorter last one, the longest row they take. Columns (an inner axis): odd
    sizes, the first axis, 138 channels as the head's second norm, and more positions than
    one wave of blocks. Backward with and without `plus`. (A row of one element has no
    variance: rstd = 1 / sqrt(eps) scales float32's rounding of dy scale - R1 to 3e-5 there,
    so that case runs in float64 only.)"""
    if shape[axis] == 1 and dtype == np.float32:
        pytest.skip("float32 rounding scaled by 1 / sqrt(eps): checked in float64")
    from weathermixer.autograd import layernorm_fused as fused
    from weathermixer.autograd.layernorm import layernorm_backward, layernorm_forward
    cp = module("cupy")
    rng = np.random.default_rng(5)
    u, dout, plus = (rng.standard_normal(shape) * 3 + 1 for _ in range(3))
    c = shape[axis]
    scale, bias = rng.standard_normal(c), rng.standard_normal(c)
    dev = [cp.asarray(a, dtype=dtype) for a in (u, scale, bias, dout, plus)]
    assert (fused.rows_apply if axis == -1 else fused.columns_apply)(dev[0], axis, c)
    out, cache = layernorm_forward(u, scale, bias, axis)
    d_out, d_cache = layernorm_forward(*dev[:3], axis)
    assert d_cache[-1] is None and d_out.dtype == dtype
    for p in (None, plus):
        want = layernorm_backward(dout, cache, p)
        got = layernorm_backward(dev[3], d_cache, None if p is None else dev[4])
        for g, w in zip((d_out, d_cache[0], d_cache[1]) + got, (out, cache[0], cache[1]) + want):
            assert g.shape == w.shape and g.dtype == dtype
            assert np.abs(cp.asnumpy(g) - w).max() <= tol * max(1.0, np.abs(w).max())


def test_fused_layernorm_backward_reads_strided_rows():
    """The rows backward equals numpy given dout as a slice [.., c0:c1] of a wider array and
    as every other row (evenly spaced: read in place, `layernorm_fused.row_pitch`), and as
    the first half of each batch's rows (not evenly spaced: copied first)."""
    from weathermixer.autograd import layernorm_fused as fused
    from weathermixer.autograd.layernorm import layernorm_backward, layernorm_forward
    cp = module("cupy")
    rng = np.random.default_rng(10)
    u = rng.standard_normal((3, 41, 37))
    scale, bias = rng.standard_normal(37), rng.standard_normal(37)
    _, cache = layernorm_forward(u, scale, bias, -1)
    _, d_cache = layernorm_forward(*(cp.asarray(a) for a in (u, scale, bias)), -1)
    for wide, index, pitch in (((3, 41, 50), (Ellipsis, slice(5, 42)), 50),
                               ((3, 82, 37), (slice(None), slice(None, None, 2)), 74),
                               ((3, 82, 37), (slice(None), slice(0, 41)), None)):
        wide = rng.standard_normal(wide)
        dout, d_dout = wide[index], cp.asarray(wide)[index]  # [3, 41, 37] each
        assert fused.row_pitch(d_dout) == pitch
        for g, w in zip(layernorm_backward(d_dout, d_cache), layernorm_backward(dout, cache)):
            assert np.abs(cp.asnumpy(g) - w).max() <= 1e-12 * max(1.0, np.abs(w).max())


def test_layernorms_too_long_for_the_fused_kernels_take_the_unfused_path():
    """Rows longer than MAX_COLS and columns whose warp sums overflow SHARED_BYTES are not
    given to the fused kernels (nor an axis whose global count differs: a cut one), and the
    unfused path still computes them: forward and backward equal numpy in float64."""
    from weathermixer.autograd import layernorm_fused as fused
    from weathermixer.autograd.layernorm import layernorm_backward, layernorm_forward
    cp = module("cupy")
    assert fused.columns_apply(cp.zeros((2, 384, 3)), 1, 384)
    assert not fused.rows_apply(cp.zeros((2, 8)), -1, 16)  # a cut axis: its count is global
    rng = np.random.default_rng(9)
    for shape, axis in (((2, fused.MAX_COLS + 1), -1), ((2, 385, 3), 1)):  # 8 x 2 x 385 x 8 B
        u, dout = rng.standard_normal(shape), rng.standard_normal(shape)
        c = shape[axis]
        scale, bias = rng.standard_normal(c), rng.standard_normal(c)
        dev = [cp.asarray(a) for a in (u, scale, bias, dout)]
        assert not (fused.rows_apply(dev[0], axis, c) or fused.columns_apply(dev[0], axis, c))
        out, cache = layernorm_forward(u, scale, bias, axis)
        d_out, d_cache = layernorm_forward(*dev[:3], axis)
        for g, w in zip((d_out,) + layernorm_backward(dev[3], d_cache),
                        (out,) + layernorm_backward(dout, cache)):
            assert np.abs(cp.asnumpy(g) - w).max() <= 1e-12 * max(1.0, np.abs(w).max())


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-13), (np.float32, 1e-5)])
@pytest.mark.parametrize("shape", [(2, 5, 7, 37), (1, 3, 2, 300), (1, 4, 3, 1)],
                         ids=["odd", "rows-longer-than-a-block", "one-longitude"])
def test_fused_loss_equals_the_numpy_formula(shape, dtype, tol):
    """`weighted_sse_and_grad` on the device (one kernel) against numpy's forward and
    backward: the loss and dL/dy, with random latitude and variable weights."""
    from weathermixer.autograd.loss import (weighted_sse_and_grad, weighted_sse_backward,
                                            weighted_sse_forward)
    cp = module("cupy")
    rng = np.random.default_rng(11)
    y, t = rng.standard_normal(shape), rng.standard_normal(shape)
    lw, vw = rng.uniform(0.5, 1.5, shape[2]), rng.uniform(0.5, 1.5, shape[1])
    want, cache = weighted_sse_forward(y, t, lw, vw, 13.0)
    want_dy = weighted_sse_backward(1.0, cache)
    loss, dy = weighted_sse_and_grad(*(cp.asarray(a, dtype=dtype) for a in (y, t, lw, vw)),
                                     13.0)
    assert dy.dtype == dtype and dy.shape == shape
    assert abs(float(loss) - want) <= tol * abs(want)
    assert np.abs(cp.asnumpy(dy) - want_dy).max() <= tol * np.abs(want_dy).max()


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_device_sum_of_squares_equals_numpy(dtype):
    """`sum_of_squares` over arrays of many sizes (empty, under one load, more than one wave
    of blocks) and views that start off a 16-byte boundary, each element once."""
    from weathermixer.autograd.xp import sum_of_squares
    cp = module("cupy")
    rng = np.random.default_rng(12)
    host = [rng.standard_normal(n) for n in (0, 1, 3, 5, 4099, 3_000_001)]
    host.append(rng.standard_normal((7, 33)))
    dev = [cp.asarray(a, dtype=dtype) for a in host]
    dev += [cp.asarray(host[4], dtype=dtype)[k:] for k in (1, 2, 3)]  # unaligned starts
    host += [host[4][k:] for k in (1, 2, 3)]
    want = sum(float((a * a).sum()) for a in host)
    got = sum_of_squares(dev)
    assert got.shape == (1,) and got.dtype == dtype
    assert abs(float(got[0]) - want) <= (1e-12 if dtype == np.float64 else 1e-5) * want


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_transposing_copies_keep_every_element(dtype):
    """`linear.c_contiguous` of transposed views (a batch of matrices through the tiled
    kernel, sizes off the tile; one matrix, with or without a leading axis of length 1,
    through cuBLAS) and `linear.f_contiguous` of C-contiguous matrices: the layouts asked
    for, and every element where it was."""
    from weathermixer.autograd.linear import c_contiguous, f_contiguous
    cp = module("cupy")
    rng = np.random.default_rng(14)
    for shape in ((3, 45, 37), (1, 45, 37), (1, 1, 70), (64, 33)):
        a = rng.standard_normal(shape).astype(dtype)
        view = cp.asarray(a).swapaxes(-1, -2)
        got = c_contiguous(view)
        assert got.flags.c_contiguous and np.array_equal(cp.asnumpy(got), a.swapaxes(-1, -2))
    for shape in ((45, 37), (1, 9), (33, 64)):
        a = rng.standard_normal(shape).astype(dtype)
        got = f_contiguous(cp.asarray(a))
        assert got.flags.f_contiguous and np.array_equal(cp.asnumpy(got), a)


@pytest.mark.parametrize("bias_shape", [(37, 1), (45,), (37, 45)], ids=["rows", "cols", "full"])
def test_residual_with_a_transposed_branch_equals_numpy(bias_shape):
    """The tiled kernel of `residual_forward` (branch: the transposed view of a C-contiguous
    array, as token mixing's output) against numpy, on sizes that are not multiples of a
    tile and a batch axis; the bias along either axis."""
    from weathermixer.autograd.shape import residual_forward
    cp = module("cupy")
    rng = np.random.default_rng(13)
    z, f, b = rng.standard_normal((3, 37, 45)), rng.standard_normal((3, 45, 37)), \
        rng.standard_normal(bias_shape)
    got = residual_forward(cp.asarray(z), cp.asarray(f).swapaxes(-1, -2), cp.asarray(b))
    assert got.flags.c_contiguous
    assert np.array_equal(cp.asnumpy(got), residual_forward(z, f.swapaxes(-1, -2), b))


@pytest.mark.skipif(not cupy_available() or module("cupy").cuda.runtime.getDeviceCount() < 4,
                    reason="needs 4 GPUs")
@pytest.mark.parametrize("layout", [("--jigsaw", "4"), ("--grid", "4x1"), ("--grid", "1x4"),
                                    ("--grid", "2x1")],
                         ids=["2x2", "4x1", "1x4", "2x1-two-replicas"])
def test_four_gpus_equal_one_gpu(tmp_path, layout):
    """NCCL on 4 GPUs, uneven parts: the pairwise exchanges with 3 partners (4x1, 1x4), both
    groups' side streams at once (2x2), and model groups beside the data group's gradient
    sums (2 replicas of 2x1) end where 1 GPU ends, float64."""
    from tests.test_train_cli import EXACT, max_relative_difference
    _, one = _losses(tmp_path, "one", *EXACT)
    _, four = _losses(tmp_path, "four", *EXACT, *layout, n=4)
    assert max_relative_difference(one / "last.h5", four / "last.h5") < 1e-10


@pytest.mark.skipif(not cupy_available() or module("cupy").cuda.runtime.getDeviceCount() >= 4,
                    reason="4 GPUs: 4 ranks get a GPU each (test_four_gpus_equal_one_gpu)")
def test_four_way_with_ranks_sharing_gpus_equals_one_gpu(tmp_path):
    """4 ranks on fewer GPUs: NCCL refuses two ranks of a communicator on one GPU, so the
    groups stage through host MPI; the 2x2 run still ends where 1 GPU ends (float64)."""
    from tests.test_train_cli import EXACT, max_relative_difference
    _, one = _losses(tmp_path, "one", *EXACT)
    _, four = _losses(tmp_path, "four", *EXACT, "--jigsaw", "4", n=4)
    assert max_relative_difference(one / "last.h5", four / "last.h5") < 1e-10


@pytest.mark.parametrize("n,grid", [(1, "1x1"), (2, "2x1"), (2, "1x2"), (2, "1x1")],
                         ids=["1-gpu", "2x1", "1x2", "two-replicas"])
def test_steps_after_warmup_keep_no_buffers_and_reuse_the_pool(n, grid):
    """After three warm-up steps, nine more hold exactly the live bytes they started with on
    every rank (no activation, gradient or communication buffer outlives its step), and the
    pool serves them from the blocks it holds: fewer than half of the nine take any new
    device memory (CuPy's choice among free blocks varies by process, so a step now and then
    takes one small block: see tests/gpu_step_allocations.py), where a buffer taken anew
    each step would show in all of them."""
    if n > module("cupy").cuda.runtime.getDeviceCount():
        pytest.skip(f"needs {n} GPUs")
    from tests.test_mpi import run_under_mpi
    proc = run_under_mpi(n, ["tests/gpu_step_allocations.py", grid], limit=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) == n, rows
    for r in rows:
        assert r["live_after"] == r["live_before"], r
        assert sum(1 for a in r["allocations_per_step"] if a) <= 4, r


@pytest.mark.skipif(not cupy_available() or module("cupy").cuda.runtime.getDeviceCount() < 2,
                    reason="needs 2 GPUs")
def test_memory_the_other_gpu_mapped_comes_back_when_the_pool_needs_it():
    """A GiB of ours that the other GPU of a pair mapped stays taken after our pool frees it
    (the driver keeps it for the mapping), and an allocation that needs it succeeds: before
    cudaMalloc the memory hook has the other close the mapping (tests/gpu_peer_memory.py)."""
    from tests.test_mpi import run_under_mpi
    proc = run_under_mpi(2, ["tests/gpu_peer_memory.py"], limit=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) == 2, rows
    for r in rows:
        assert "copy engines" in r["engine"], r
        assert r["after_free"] - r["start"] > 0.9, r  # kept taken by the other's mapping
        assert r["allocated"], r
        assert r["end"] - r["start"] < 0.25, r  # and given back


def test_steady_step_seconds_gives_each_queued_step_its_device_time():
    """`bench.steady_step_seconds` on CuPy: one interval per timed step, and for a step of
    device work alone (eight GEMMs) each lasts as long as the same step timed on its own."""
    cp = module("cupy")
    from weathermixer.mixer.bench import seconds, steady_step_seconds
    a = cp.ones((2048, 2048), dtype=cp.float32)

    def step():
        for _ in range(8):
            b = a @ a
        return {"loss": b[:1, 0]}  # [1], read back once the next step is queued

    step()
    alone = float(np.median([seconds(cp, step) for _ in range(5)]))
    steady = steady_step_seconds(cp, step, 5)
    assert len(steady) == 5 and min(steady) > 0
    assert abs(float(np.median(steady)) / alone - 1) < 0.1, (steady, alone)


def test_accumulating_matmul_on_cupy_equals_numpy():
    """The beta = 1 GEMMs of `linear.matmul(..., accumulate=True)` (cupy.cublas.gemm) for the
    layouts the backward gives them: out C-contiguous or a transposed view, the right operand
    C- or F-contiguous; float64 exactly, float32 in TF32 within TF32's rounding."""
    from weathermixer.autograd.linear import matmul
    from weathermixer.autograd.xp import set_matmul_precision
    cp = module("cupy")
    rng = np.random.default_rng(6)
    set_matmul_precision(cp, "tf32")
    try:
        _check_accumulating_matmul(cp, rng, matmul)
    finally:
        set_matmul_precision(cp, "fp32")  # CuPy's default, for the tests after this one


def _check_accumulating_matmul(cp, rng, matmul):
    for dtype, tol in (("float64", 1e-12), ("float32", 1e-2)):
        a, b = rng.standard_normal((1, 33, 17)), rng.standard_normal((17, 29))
        for transposed in (False, True):
            for b_order in ("C", "F"):
                base = rng.standard_normal((1, 29, 33) if transposed else (1, 33, 29))
                out = cp.asarray(base.astype(dtype))
                view = out.swapaxes(-1, -2) if transposed else out
                matmul(cp.asarray(a.astype(dtype)), cp.asarray(b.astype(dtype), order=b_order),
                       out=view, accumulate=True)
                want = (base.swapaxes(-1, -2) if transposed else base) + a @ b
                err = np.abs(cp.asnumpy(view) - want).max() / np.abs(want).max()
                assert err < tol, (dtype, transposed, b_order, err)
