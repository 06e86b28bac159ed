"""WeatherMixer forward and backward (SPEC.md), one code path for every layout.

Legend (local sizes carry _loc; on a 1 x 1 grid they are the global ones):
    B batch, T_loc tokens of this band, E_loc channels, Mt_loc / Mc_loc hidden units,
    V_loc prognostic variables of this rank, C_loc = V_loc + S_loc input variables,
    h rows of this band, W longitudes.

    X  = patchify(x)                          [B, T_loc, K_loc]
    Z0 = encoder(X)                           [B, T_loc, E_loc]
    rollout x N mixer blocks:                 [B, T_loc, E_loc]
        Z += token_mixing(LN(Z))   on the transposed view [B, E_loc, T_loc]
        Z += channel_mixing(LN(Z))
    D  = [LN(Z), Z0]                          [B, T_loc, 2E_loc]
    R  = recovery(D)                          [B, T_loc, V_loc pl pw]
    Y0 = unpatchify(R)                        [B, V_loc, h, W]
    y  = head(LN_P(Y0), x[:, :V_loc])         [B, V_loc, h, W]

Every linear layer is `jigsaw.matmul.xwt` plus its bias and every LayerNorm is
`jigsaw.layernorm`: the communication lives in those two calls and in `GradientSync`.
Forward functions return (out, cache); backward functions take (dout, cache, grads), add
parameter gradients into `grads` (shared weights across rollout repeats accumulate) and
return the input gradient. Fan-outs (the residual stream, Z0 to the decoder skip, x to the
head) add their branch gradients explicitly.
"""
from __future__ import annotations

from weathermixer.autograd import linear
from weathermixer.autograd.activation import gelu_backward, gelu_forward
from weathermixer.autograd.linear import sum_except
from weathermixer.autograd.shape import (concat_backward, concat_forward, patchify,
                                         patchify_backward, residual_backward, residual_forward,
                                         unpatchify, unpatchify_backward)
from weathermixer.jigsaw import ops
from weathermixer.jigsaw.layernorm import layernorm_backward, layernorm_forward
from weathermixer.jigsaw.matmul import start_panel, xwt_backward, xwt_forward


def _accumulate(grads: dict, name: str, g):
    grads[name] = grads[name] + g if name in grads else g


def _kind(name: str) -> str:
    """'blocks/3/token_mixing/fc1' -> 'token_mixing/fc1' (the layout's name for the layer)."""
    return name.split("/", 2)[2] if name.startswith("blocks/") else name


# ---- layers ------------------------------------------------------------------------------
def dense_forward(x, params, name, layout, add_bias: bool = True, transposed_out: bool = False,
                  panel=None):
    """y = x @ W.T + b as the distributed `xwt` of `layout.dense[kind]`. With add_bias=False
    the caller adds b in its next fused pass (bias + GELU, bias + residual); `transposed_out`
    writes y as a transposed view of a C-contiguous array (see `xwt_forward`); `panel` is the
    layer's weight gather if `start_dense_panel` began it."""
    d = layout.dense[_kind(name)]
    y, cache = xwt_forward(x, params[name + "/weight"], layout.grid, d.frame, d.w_rows, d.out_cols,
                           transposed_out, panel)
    if add_bias:
        linear.add_bias(y, params[name + "/bias"])  # y is a fresh array of this call
    return y, cache


def start_dense_panel(params, name, layout):
    """Begin gathering the weight panel of dense layer `name` (`jigsaw.matmul.start_panel`):
    it travels while the layers before it compute."""
    d = layout.dense[_kind(name)]
    return start_panel(params[name + "/weight"], layout.grid, d.frame, d.w_rows)


def dense_backward(dy, cache, grads, name, need_dx: bool = True, ready=None):
    """The input gradient (None without `need_dx`); the weight and bias gradients go to
    `grads`. `ready(grads, prefix)` (when given) is told of the weight as soon as it is
    complete, before the input-gradient GEMMs where it can be (`xwt_backward`'s `on_dw`), and
    of the bias after its GEMV: the GEMV between them lets the weight's data-parallel sum
    start before the next GEMM holds every SM."""
    ready = ready or _nothing_ready

    def weight_done(dw):
        _accumulate(grads, name + "/weight", dw)
        ready(grads, name + "/weight")
        _accumulate(grads, name + "/bias", sum_except(dy, -1))
        ready(grads, name + "/bias")

    dx, _ = xwt_backward(dy, cache, need_dx, on_dw=weight_done)
    return dx


def norm_forward(u, params, name, layout, axis, count):
    return layernorm_forward(u, params[name + "/scale"], params[name + "/bias"],
                             layout.grid, axis, count)


def norm_backward(dout, cache, grads, name, plus=None):
    """The LayerNorm's input gradient (+ `plus`, the gradient of a fan-out added in the same
    pass)."""
    du, dscale, dbias = layernorm_backward(dout, cache, plus)
    _accumulate(grads, name + "/scale", dscale)
    _accumulate(grads, name + "/bias", dbias)
    return du


# ---- one mixer block -----------------------------------------------------------------------
def mixer_block_forward(z, params, n, layout):
    """z [B, T_loc, E_loc] -> z [B, T_loc, E_loc] through block n."""
    b, E = f"blocks/{n}/", layout.cfg.embed_dim
    u, c_tn = norm_forward(z, params, b + "token_norm", layout, -1, E)
    a1, c_t1 = dense_forward(u.swapaxes(-1, -2), params, b + "token_mixing/fc1", layout, False)
    h1, c_g1 = gelu_forward(a1, params[b + "token_mixing/fc1/bias"])  # [B, E_loc, Mt_loc]
    o, c_t2 = dense_forward(h1, params, b + "token_mixing/fc2", layout, False)  # [B, E_loc, T_loc]
    z = residual_forward(z, o.swapaxes(-1, -2),  # [B, T_loc, E_loc]; the bias runs along T
                         params[b + "token_mixing/fc2/bias"][:, None])
    w1 = start_dense_panel(params, b + "channel_mixing/fc1", layout)  # travel while LN runs
    w2 = start_dense_panel(params, b + "channel_mixing/fc2", layout)
    u, c_cn = norm_forward(z, params, b + "channel_norm", layout, -1, E)
    a2, c_c1 = dense_forward(u, params, b + "channel_mixing/fc1", layout, False, panel=w1)
    g, c_g2 = gelu_forward(a2, params[b + "channel_mixing/fc1/bias"])  # [B, T_loc, Mc_loc]
    o2, c_c2 = dense_forward(g, params, b + "channel_mixing/fc2", layout, False,
                             panel=w2)  # [B, T_loc, E_loc]
    z = residual_forward(z, o2, params[b + "channel_mixing/fc2/bias"])
    return z, (n, c_tn, c_t1, c_g1, c_t2, c_cn, c_c1, c_g2, c_c2)


def mixer_block_backward(dz, cache, grads, ready=None):
    """The input gradient of block n; `ready(grads, prefix)` (when given) is told as each
    layer's parameter gradients are complete (see `backward`)."""
    n, c_tn, c_t1, c_g1, c_t2, c_cn, c_c1, c_g2, c_c2 = cache
    b = f"blocks/{n}/"
    ready = ready or _nothing_ready
    dz, dbranch = residual_backward(dz)
    dg = dense_backward(dbranch, c_c2, grads, b + "channel_mixing/fc2", ready=ready)
    du = dense_backward(gelu_backward(dg, c_g2), c_c1, grads, b + "channel_mixing/fc1",
                        ready=ready)
    dz = norm_backward(du, c_cn, grads, b + "channel_norm", plus=dz)  # z fed the branch too
    ready(grads, b + "channel_norm/")
    dz, dbranch = residual_backward(dz)
    dh1 = dense_backward(dbranch.swapaxes(-1, -2), c_t2, grads, b + "token_mixing/fc2",
                         ready=ready)
    dut = dense_backward(gelu_backward(dh1, c_g1), c_t1, grads, b + "token_mixing/fc1",
                         ready=ready)
    dz = norm_backward(dut.swapaxes(-1, -2), c_tn, grads, b + "token_norm", plus=dz)
    ready(grads, b + "token_norm/")
    return dz


def _nothing_ready(grads, prefix):
    """`ready` for a backward pass whose gradients are not yet complete (an earlier rollout
    repeat of the same block adds to them)."""


# ---- the whole model -------------------------------------------------------------------------
def forward(params, x, layout, rollout: int = 1):
    """x [B, C_loc, h, W] (this rank's tile) -> (y [B, V_loc, h, W], cache)."""
    cfg = layout.cfg
    pl, pw, E, P = cfg.patch_lat, cfg.patch_lon, cfg.embed_dim, cfg.n_prognostic
    B, _, h, W = x.shape
    nv = len(layout.prognostic_channels)
    w_enc = start_dense_panel(params, "encoder", layout)  # travels while x is patchified
    z0, c_enc = dense_forward(patchify(x, pl, pw), params, "encoder", layout,
                              panel=w_enc)  # [B, T_loc, E_loc]
    z, c_blocks = z0, []
    for _ in range(rollout):  # latent rollout: the same blocks, k times
        for n in range(cfg.n_blocks):
            z, c = mixer_block_forward(z, params, n, layout)
            c_blocks.append(c)
    w_rec = start_dense_panel(params, "decoder/recovery", layout)
    dn, c_dn = norm_forward(z, params, "decoder/norm", layout, -1, E)
    d, c_cat = concat_forward(dn, z0, -1)  # [B, T_loc, 2 E_loc]: normed first, skip second
    r, c_rec = dense_forward(d, params, "decoder/recovery", layout,
                             panel=w_rec)  # [B, T_loc, V_loc pl pw]
    y0 = unpatchify(r, pl, pw, h, W)  # [B, V_loc, h, W]
    a, c_an = norm_forward(y0, params, "head/decoded_norm", layout, 1, P)
    hc, c_hcat = concat_forward(a, x[:, :nv], 1)  # [B, 2 V_loc, h, W]
    hh, c_hn = norm_forward(hc, params, "head/norm", layout, 1, 2 * P)
    pixels = hh.reshape(B, 2 * nv, h * W).swapaxes(-1, -2)  # [B, h W, 2 V_loc]
    yt, c_head = dense_forward(pixels, params, "head/linear", layout,
                               transposed_out=True)  # [B, h W, V_loc], pixel axis contiguous
    y = yt.swapaxes(-1, -2).reshape(B, nv, h, W)  # [B, V_loc, h, W], a view
    return y, dict(x_shape=x.shape, enc=c_enc, blocks=c_blocks, dn=c_dn, cat=c_cat, rec=c_rec,
                   an=c_an, hcat=c_hcat, hn=c_hn, head=c_head, layout=layout)


def backward(dy, cache, need_dx: bool = True, release: bool = False, on_ready=None):
    """Gradients (grads: dict of this rank's partial parameter gradients, dx [B, C_loc, h, W]
    or None without `need_dx`). With `release`, each layer's activations are dropped from
    `cache` as soon as its backward is done (lower peak memory; the cache is then spent).
    `on_ready(grads, prefix)` is told when no later layer adds to the gradients of the
    parameters under `prefix` (`GradientSync.ready`)."""
    ready = on_ready or _nothing_ready
    take = cache.pop if release else cache.__getitem__
    layout, (B, _, h, W), c_blocks = cache["layout"], cache["x_shape"], cache["blocks"]
    cfg, grads = layout.cfg, {}
    pl, pw = cfg.patch_lat, cfg.patch_lon
    nv = dy.shape[1]
    dyt = dy.reshape(B, nv, h * W).swapaxes(-1, -2)  # [B, h W, V_loc], a view
    dpix = dense_backward(dyt, take("head"), grads, "head/linear")  # [B, h W, 2 V_loc], a view
    dhc = norm_backward(dpix.swapaxes(-1, -2).reshape(B, 2 * nv, h, W), take("hn"), grads,
                        "head/norm")
    da, dx_head = concat_backward(dhc, take("hcat"))
    dy0 = norm_backward(da, take("an"), grads, "head/decoded_norm")
    dd = dense_backward(unpatchify_backward(dy0, pl, pw), take("rec"), grads, "decoder/recovery")
    ddn, dz0_skip = concat_backward(dd, take("cat"))
    dz = norm_backward(ddn, take("dn"), grads, "decoder/norm")
    ready(grads, "head/")
    ready(grads, "decoder/")
    for n in reversed(range(len(c_blocks))):  # last block first
        # the first rollout repeat of a block is differentiated last: its gradients complete
        dz = mixer_block_backward(dz, c_blocks[n], grads, ready if n < cfg.n_blocks else None)
        if release:
            c_blocks.pop()
    dz0 = dz + dz0_skip  # Z0 fans out to the blocks and to the decoder skip
    dX = dense_backward(dz0, take("enc"), grads, "encoder", need_dx)
    if not need_dx:
        return grads, None
    dx = patchify_backward(dX, pl, pw, h, W)
    dx[:, :nv] += dx_head  # x fans out to the encoder and to the head
    return grads, dx


class GradientSync:
    """Completes every gradient: sums the partials of a replicated block over the group that
    replicates it (`ShardSpec.replicated_over`), then over `data`. The loss of each replica
    is already divided by the *global* batch, so the data sum is the mean over replicas.

    With `cut_over_data` the data sum is a reduce-scatter: each replica keeps only its part of
    the flattened block (`Layout.data_part`), the part its optimizer updates (`mixer.optim`),
    and sends half the bytes of an allreduce. Without, every replica gets the whole sum.

    `ready(grads, prefix)` starts the sums of the parameters under `prefix` as soon as the
    backward has finished them; on GPUs the data sums then run on a side stream (NCCL) while
    the backward of the earlier layers goes on. `finish(grads)` starts what is left and waits.
    """

    def __init__(self, layout, cut_over_data: bool = False):
        self.layout, self.pending = layout, list(layout.specs)
        self.cut_over_data = cut_over_data

    def ready(self, grads: dict, prefix: str = ""):
        grid = self.layout.grid
        for name in [n for n in self.pending if n.startswith(prefix)]:
            g, spec = grads[name], self.layout.specs[name]
            if spec.replicated_over is not None:
                g = ops.allreduce_sum(g, grid.group(spec.replicated_over), tag="sync.replicated")
            if self.cut_over_data:  # a reduce-scatter (the adjoint of a gather), in flight
                grads[name] = ops.start_gather_adjoint(g.reshape(-1), grid.data, 0,
                                                       self.layout.data_parts(name),
                                                       tag="sync.data")
            else:
                grads[name] = ops.allreduce_sum(g, grid.data, tag="sync.data", overlap=True)
            self.pending.remove(name)

    def finish(self, grads: dict) -> dict:
        self.ready(grads)
        if self.cut_over_data:
            for name in grads:
                grads[name] = grads[name].get()
        self.layout.grid.data.wait()
        return grads
