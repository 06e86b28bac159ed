"""The public functions of SPEC.md: predict and loss_and_grads, for any layout.

Without `layout` the arrays are global and the model runs on one rank. With a
`Layout(cfg, grid)`, `params` holds this rank's blocks (`init_params(..., layout=layout)`),
`x` and `target` hold this rank's tile (variables `layout.input_channels` /
`layout.prognostic_channels`, rows `layout.lat_rows`, all longitudes, this replica's samples),
and the gradients come back as this rank's blocks of the true gradient of the global loss.
`lat_weights` [H] and `var_weights` [P] are always global.
"""
from __future__ import annotations

from weathermixer.autograd.loss import weighted_sse_and_grad
from weathermixer.autograd.xp import get_array_module, to_host, to_module
from weathermixer.config import Config
from weathermixer.jigsaw import ops
from weathermixer.jigsaw.grid import ProcessGrid
from weathermixer.mixer import model
from weathermixer.mixer.layout import Layout


def serial_layout(cfg: Config) -> Layout:
    return Layout(cfg, ProcessGrid.serial())


def _prepare(params, x, cfg, layout):
    """(layout, xp, x): the layout (serial by default), the parameters' array module, and x
    moved there in the parameters' dtype, after checking its shape against this rank's tile."""
    layout = serial_layout(cfg) if layout is None else layout
    w = params["encoder/weight"]
    xp = get_array_module(w)
    x = to_module(x, xp).astype(w.dtype, copy=False)
    want = (len(layout.input_channels), layout.n_lat_local, cfg.n_lon)
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
        raise ValueError(f"input has shape {tuple(x.shape)}, expected [B, {want[0]}, {want[1]}, "
                         f"{want[2]}] (batch, variables, lat, lon) for this config and layout")
    return layout, xp, x


def predict(params: dict, x, cfg: Config, rollout: int = 1, layout: Layout | None = None):
    """x [B, P+S, H, W] -> y [B, P, H, W] (this rank's tiles under a layout)."""
    layout, _, x = _prepare(params, x, cfg, layout)
    y, _ = model.forward(params, x, layout, rollout)
    return y


def loss_and_grads(params: dict, x, target, cfg: Config, rollout: int = 1,
                   lat_weights=None, var_weights=None, layout: Layout | None = None):
    """(L, grads): the weighted MSE of SPEC.md over the global batch and its gradient."""
    loss, grads = loss_array_and_grads(params, x, target, cfg, rollout, lat_weights,
                                       var_weights, layout)
    return float(to_host(loss)[0]), grads


def loss_array_and_grads(params: dict, x, target, cfg: Config, rollout: int = 1,
                         lat_weights=None, var_weights=None, layout: Layout | None = None,
                         cut_over_data: bool = False):
    """`loss_and_grads` with the loss left as a [1] array of the parameters' module: nothing
    waits for the device, so a training step reads the loss back with its other statistics
    once the whole step is queued. With `cut_over_data`, each gradient comes back as only
    this replica's part of the flattened block (`Layout.data_part`), as `mixer.optim.AdamW`
    updates it: the data-parallel sum is then a reduce-scatter instead of an allreduce."""
    layout, xp, x = _prepare(params, x, cfg, layout)
    target = to_module(target, xp).astype(x.dtype, copy=False)
    nv = len(layout.prognostic_channels)
    if target.shape != (x.shape[0], nv) + x.shape[2:]:
        raise ValueError(f"target has shape {tuple(target.shape)}, expected "
                         f"{(x.shape[0], nv) + x.shape[2:]}")
    lat_w = _weights(lat_weights, cfg.n_lat, xp, x.dtype)[layout.lat_rows]
    var_w = _weights(var_weights, cfg.n_prognostic, xp, x.dtype)[layout.prognostic_channels]
    grid = layout.grid
    normaliser = x.shape[0] * grid.n_dp * cfg.n_prognostic * cfg.n_lat * cfg.n_lon
    y, cache = model.forward(params, x, layout, rollout)
    part, dy = weighted_sse_and_grad(y, target, lat_w, var_w, normaliser)
    del y  # not needed by the backward, which releases each layer's cache as it goes
    sync = model.GradientSync(layout, cut_over_data)  # data-parallel sums overlap the backward
    grads, _ = model.backward(dy, cache, need_dx=False, release=True, on_ready=sync.ready)
    sync.finish(grads)
    loss = ops.allreduce_sum(ops.allreduce_sum(xp.reshape(part, (1,)), grid.model, tag="loss"),
                             grid.data, tag="loss")
    return loss, {name: grads[name] for name in params}  # params' key order


def _weights(w, n: int, xp, dtype):
    if w is None:
        return xp.ones(n, dtype=dtype)
    w = to_module(w, xp).astype(dtype, copy=False)
    if w.shape != (n,):
        raise ValueError(f"weights have shape {tuple(w.shape)}, expected ({n},)")
    return w
