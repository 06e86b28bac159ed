"""Adjoint tests of the communication operators: <F x, y> = <x, F* y>, inner products summed
over ranks, float64, odd and uneven part sizes, on the groups of every grid of this world."""
import numpy as np
import pytest

from tests.mpi.harness import WORLD, assert_all, grids_for_world, make_grid, sum_over_ranks
from weathermixer.jigsaw import ops
from weathermixer.jigsaw.shard import Partition

GRIDS = grids_for_world()


def _inner(a, b) -> float:
    return sum_over_ranks(float(np.vdot(a, b)))


def _rng():
    return np.random.default_rng(1000 + WORLD.rank)  # different data on every rank


def _check_pair(forward, adjoint, x, y, what):
    lhs, rhs = _inner(forward(x), y), _inner(x, adjoint(y))
    err = abs(lhs - rhs) / max(abs(lhs), abs(rhs), 1e-300)
    assert_all(err < 1e-13, f"{what}: <Fx, y> = {lhs} but <x, F*y> = {rhs}")


@pytest.mark.parametrize("pd,pc", GRIDS)
@pytest.mark.parametrize("group_name", ["channel", "domain", "model", "data"])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_gather_and_scatter_sum_are_adjoint_pairs(pd, pc, group_name, axis):
    grid = make_grid(pd, pc)
    group = grid.group(group_name)
    part = Partition.even(7 + 2 * group.size, group.size)  # uneven parts
    rng = _rng()
    shape = [3, 5, 4]
    block_shape = list(shape)
    block_shape[axis] = part.size(group.rank)
    full_shape = list(shape)
    full_shape[axis] = part.n
    x = rng.normal(size=block_shape)  # a block
    y = rng.normal(size=full_shape)  # a full-length array, different on each rank
    _check_pair(lambda a: ops.gather(a, group, axis, part),
                lambda b: ops.gather_adjoint(b, group, axis, part), x, y, "gather")
    _check_pair(lambda a: ops.scatter_sum(a, group, axis, part),
                lambda b: ops.scatter_sum_adjoint(b, group, axis, part), y, x, "scatter_sum")


@pytest.mark.parametrize("pd,pc", GRIDS)
@pytest.mark.parametrize("group_name", ["channel", "domain", "model", "data"])
def test_scatter_parts_and_its_adjoint(pd, pc, group_name):
    group = make_grid(pd, pc).group(group_name)
    rng = _rng()
    parts, block = rng.normal(size=(group.size, 3, 5)), rng.normal(size=(3, 5))
    _check_pair(lambda a: ops.scatter_parts(a, group), lambda b: ops.scatter_parts_adjoint(b, group),
                parts, block, "scatter_parts")


@pytest.mark.parametrize("pd,pc", GRIDS)
@pytest.mark.parametrize("group_name", ["channel", "domain", "model", "data"])
def test_allreduce_is_self_adjoint(pd, pc, group_name):
    group = make_grid(pd, pc).group(group_name)
    rng = _rng()
    x, y = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    _check_pair(lambda a: ops.allreduce_sum(a, group), lambda b: ops.allreduce_sum(b, group),
                x, y, "allreduce")


@pytest.mark.parametrize("pd,pc", GRIDS)
def test_gather_concatenates_in_group_order(pd, pc):
    grid = make_grid(pd, pc)
    for name in ("channel", "domain"):
        group = grid.group(name)
        part = Partition.even(5 + group.size, group.size)
        mine = np.arange(part.n, dtype=np.float64)[part.index(group.rank)]
        full = ops.gather(mine, group, 0, part)
        assert_all(np.array_equal(full, np.arange(part.n)), f"gather over {name}: {full}")


def test_groups_match_the_rank_map():
    n = WORLD.size
    for pd, pc in GRIDS:
        grid = make_grid(pd, pc)
        q = WORLD.rank % (pd * pc)
        ok = (grid.q == q and grid.replica == WORLD.rank // (pd * pc) and grid.n_dp == n // (pd * pc)
              and grid.channel.size == pc and grid.domain.size == pd and grid.data.size == grid.n_dp
              and grid.channel.rank == grid.j and grid.domain.rank == grid.i)
        assert_all(ok, f"grid {pd}x{pc}: rank {WORLD.rank} has q={grid.q}, (i,j)=({grid.i},{grid.j})")
