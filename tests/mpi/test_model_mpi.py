"""The whole model on every grid of this world equals the serial model (float64).

Odd sizes on purpose: P = 5, S = 2, E = 13, Mt = 7, Mc = 9, 5 token rows (uneven bands),
T = 15. Every rank computes the serial reference itself, then its layout's blocks, and the
verdicts are collective.
"""
import numpy as np
import pytest

import weathermixer as wm
from tests.mpi.harness import WORLD, assert_all, grids_for_world, make_grid, relative_error
from weathermixer.mixer import state
from weathermixer.mixer.layout import Layout

CFG = wm.Config(n_lat=10, n_lon=9, n_prognostic=5, n_static=2, patch_lat=2, patch_lon=3,
                embed_dim=13, token_hidden_dim=7, channel_hidden_dim=9, n_blocks=2)
GLOBAL_BATCH = 8
GRIDS = grids_for_world()


def data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(GLOBAL_BATCH, CFG.n_vars, CFG.n_lat, CFG.n_lon))
    t = rng.normal(size=(GLOBAL_BATCH, CFG.n_prognostic, CFG.n_lat, CFG.n_lon))
    return x, t, rng.uniform(0.5, 1.5, CFG.n_lat), rng.uniform(0.5, 1.5, CFG.n_prognostic)


def local_tiles(layout, x, t):
    grid = layout.grid
    b = GLOBAL_BATCH // grid.n_dp
    mine = slice(grid.replica * b, (grid.replica + 1) * b)
    rows = layout.lat_rows
    return (x[mine][:, layout.input_channels][:, :, rows],
            t[mine][:, layout.prognostic_channels][:, :, rows])


@pytest.mark.parametrize("pd,pc", GRIDS)
def test_init_params_are_blocks_of_the_global_arrays(pd, pc):
    layout = Layout(CFG, make_grid(pd, pc))
    full, mine = wm.init_params(CFG, seed=3), wm.init_params(CFG, seed=3, layout=layout)
    ok = all(np.array_equal(mine[k], layout.shard(k, full[k])) for k in full)
    assert_all(ok, "init_params(layout) differs from the blocks of init_params()")


@pytest.mark.parametrize("pd,pc", GRIDS)
@pytest.mark.parametrize("rollout", [1, 2])
def test_loss_and_grads_equal_serial(pd, pc, rollout):
    layout = Layout(CFG, make_grid(pd, pc))
    x, t, lat_w, var_w = data()
    params = wm.init_params(CFG, seed=1)
    loss, grads = wm.loss_and_grads(params, x, t, CFG, rollout=rollout, lat_weights=lat_w,
                                    var_weights=var_w)
    mine = {k: layout.shard(k, v) for k, v in params.items()}
    xl, tl = local_tiles(layout, x, t)
    ploss, pgrads = wm.loss_and_grads(mine, xl, tl, CFG, rollout=rollout, lat_weights=lat_w,
                                      var_weights=var_w, layout=layout)
    assert_all(abs(ploss - loss) < 1e-10 * abs(loss), f"loss {ploss} != serial {loss}")
    floor = max(np.abs(g).max() for g in grads.values())
    worst = max((relative_error(pgrads[k], layout.shard(k, grads[k]), floor), k) for k in grads)
    assert_all(worst[0] < 1e-10, f"gradient of {worst[1]}: relative error {worst[0]:.3e}")


@pytest.mark.parametrize("pd,pc", GRIDS)
def test_predict_equals_serial(pd, pc):
    layout = Layout(CFG, make_grid(pd, pc))
    x, t, _, _ = data(1)
    params = wm.init_params(CFG, seed=2)
    y = wm.predict(params, x, CFG, rollout=2)
    mine = {k: layout.shard(k, v) for k, v in params.items()}
    xl, yl = local_tiles(layout, x, y)
    err = relative_error(wm.predict(mine, xl, CFG, rollout=2, layout=layout), yl)
    assert_all(err < 1e-12, f"predict: relative error {err:.3e}")


@pytest.mark.parametrize("pd,pc", GRIDS)
def test_checkpoint_moves_between_layouts(pd, pc, tmp_path_factory):
    """A sharded save gives the global arrays; a sharded load gives this layout's blocks."""
    layout = Layout(CFG, make_grid(pd, pc))
    path = str(tmp_path_factory.getbasetemp() / f"ckpt-{pd}x{pc}-shared.h5")
    path = layout.grid.world.bcast_json(path)  # rank 0's name, the same file for all
    full = wm.init_params(CFG, seed=5)
    state.save(path, {k: layout.shard(k, v) for k, v in full.items()}, CFG, layout, step=7)
    back, cfg = wm.load_checkpoint(path)
    assert_all(cfg == CFG and all(np.array_equal(back[k], full[k]) for k in full),
               "gathered checkpoint differs from the global arrays")
    mine, meta = state.load(path, layout, "float64", np)
    assert_all(meta["step"] == 7 and all(np.array_equal(mine[k], layout.shard(k, full[k]))
                                         for k in full), "sharded load differs")
    WORLD.Barrier()
