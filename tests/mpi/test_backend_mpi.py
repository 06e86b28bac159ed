"""`MPIGroup` on COMM_WORLD: whether it is CUDA-aware follows what this MPI reports, and
every collective gives the right numbers on both of its paths. Each rank rebuilds every
rank's input from the rank's seed, so the expected results never go through the backend.

The direct path (device arrays handed to a CUDA-aware MPI) cannot run on a CPU-only MPI, so
numpy stands in for CuPy there: `is_device_array` says yes, `_synchronize` records its calls
and a host copy (`to_host`) fails the test."""
import numpy as np
import pytest

from tests.mpi.harness import WORLD, assert_all, relative_error
from weathermixer.jigsaw import backend
from weathermixer.jigsaw.backend import MPIGroup, mpi_cuda_aware

N, RANK = WORLD.size, WORLD.rank
SIZES = [2 + r % 2 for r in range(N)]  # uneven parts of the gathered or scattered axis
ROOT = N - 1


def inputs(r: int) -> dict:
    """Rank r's inputs to every collective."""
    rng = np.random.default_rng(2000 + r)
    return {"x": rng.normal(size=(3, 4)),
            "block": rng.normal(size=(3, SIZES[r], 2)),
            "full": rng.normal(size=(2, 3, sum(SIZES))),
            "parts": rng.normal(size=(N, 2, 3)),
            "ragged": rng.normal(size=(r + 1, 2)),
            "flat": rng.normal(size=sum(SIZES)),  # only part r is rank r's to give
            "flat_even": rng.normal(size=2 * N)}


def expected() -> dict:
    every = [inputs(r) for r in range(N)]
    own = slice(sum(SIZES[:RANK]), sum(SIZES[:RANK + 1]))
    return {"allreduce_sum": sum(a["x"] for a in every),
            "allreduce_max": np.max([a["x"] for a in every], axis=0),
            "allgather": np.concatenate([a["block"] for a in every], axis=1),
            "reduce_scatter": sum(a["full"] for a in every)[..., own],
            "reduce_scatter_parts": sum(a["parts"][RANK] for a in every),
            "allgather_parts": np.stack([a["x"] for a in every]),
            "start_allgather": np.concatenate([a["block"] for a in every], axis=1),
            "start_reduce_scatter": sum(a["full"] for a in every)[..., own],
            "parts_exchange": sum(a["parts"][RANK] for a in every),
            "parts_gather": np.stack([a["x"] for a in every]),
            "allgather_in_place": np.concatenate(
                [a["flat"][sum(SIZES[:r]):sum(SIZES[:r + 1])] for r, a in enumerate(every)]),
            "allgather_in_place_even": np.concatenate(
                [a["flat_even"][2 * r:2 * r + 2] for r, a in enumerate(every)]),
            "bcast": every[ROOT]["x"],
            "gather": [a["ragged"] for a in every] if RANK == 0 else None}


def collectives(group: MPIGroup) -> dict:
    """name -> a call of that collective on this rank's inputs (fresh copies each call)."""
    mine = inputs(RANK)
    return {"allreduce_sum": lambda: group.allreduce(mine["x"], "sum"),
            "allreduce_max": lambda: group.allreduce(mine["x"], "max"),
            "allgather": lambda: group.allgather(mine["block"], 1, SIZES),
            "reduce_scatter": lambda: group.reduce_scatter(mine["full"], -1, SIZES),
            "reduce_scatter_parts": lambda: group.reduce_scatter_parts(mine["parts"]),
            "allgather_parts": lambda: group.allgather_parts(mine["x"]),
            "start_allgather": lambda: group.start_allgather(mine["block"], 1, SIZES).get(),
            "start_reduce_scatter": lambda: group.start_reduce_scatter(mine["full"], -1,
                                                                       SIZES).get(),
            "parts_exchange": lambda: exchange_parts(group, mine["parts"]),
            "parts_gather": lambda: gather_parts(group, mine["x"]),
            "allgather_in_place": lambda: gather_in_place(group, mine["flat"], SIZES),
            "allgather_in_place_even": lambda: gather_in_place(group, mine["flat_even"],
                                                               [2] * N),
            "bcast": lambda: group.bcast(mine["x"].copy(), root=ROOT),
            "gather": lambda: group.gather(mine["ragged"], root=0)}


def exchange_parts(group, parts):
    """A `PartsExchange` fed as `xwt_forward` feeds it: each block written, then `ready`."""
    store = np.empty_like(parts)
    ex = group.parts_exchange(store)
    assert sorted(ex.order) == list(range(N)), ex.order
    for p in ex.order:
        store[p] = parts[p]
        ex.ready(p)
    return ex.result()


def gather_parts(group, x):
    """A `PartsGather` read as `xwt_backward` reads it; the own block comes first."""
    g = group.parts_gather(x)
    assert g.order[0] == RANK and sorted(g.order) == list(range(N)), g.order
    return np.stack([g.block(p) for p in range(N)])


def gather_in_place(group, flat, sizes):
    """`allgather_in_place` on a copy of `flat`, overlapped where the group can."""
    flat = flat.copy()
    group.allgather_in_place(flat, sizes, overlap=True)
    group.wait()
    return flat


def error(out, want) -> float:
    if want is None:
        return 0.0 if out is None else np.inf
    if isinstance(want, list):
        if not isinstance(out, list) or [o.shape for o in out] != [w.shape for w in want]:
            return np.inf
        return max(relative_error(o, w) for o, w in zip(out, want))
    return relative_error(out, want) if np.shape(out) == want.shape else np.inf


def test_cuda_aware_follows_the_memory_alloc_kinds_this_mpi_reports():
    info = WORLD.Get_info()
    kinds = info.Get("mpi_memory_alloc_kinds")
    info.Free()
    reported = kinds is not None and bool({"cuda", "cuda:device"} & set(kinds.split(",")))
    answer = mpi_cuda_aware()
    assert_all(type(answer) is bool and answer == reported,
               f"mpi_cuda_aware() = {answer!r} but MPI reports memory kinds {kinds!r}")
    assert_all(MPIGroup(WORLD, "world").cuda_aware == reported, "the group disagrees")


@pytest.fixture
def direct_path(monkeypatch):
    """numpy arrays take the device path of a CUDA-aware group; returns the list of arrays
    whose stream was synchronised."""
    synced = []

    def no_host_copy(x):
        raise AssertionError("the device path made a host copy")
    monkeypatch.setattr(backend, "is_device_array", lambda x: True)
    monkeypatch.setattr(backend, "to_host", no_host_copy)
    monkeypatch.setattr(backend, "_synchronize", synced.append)
    return synced


def check_every_collective(group: MPIGroup, synced=None):
    want = expected()
    for name, call in collectives(group).items():
        before = len(synced) if synced is not None else 0
        out = call()
        err = error(out, want[name])
        assert_all(err < 1e-12, f"{name} on {N} ranks: relative error {err}")
        if synced is not None and (N > 1 or name == "gather"):  # size 1 skips the wire
            assert_all(len(synced) > before, f"{name}: no stream synchronised before MPI")


def test_host_path_of_every_collective():
    group = MPIGroup(WORLD, "world")
    group.cuda_aware = False
    check_every_collective(group)


def test_direct_path_of_every_collective_makes_no_host_copy(direct_path):
    group = MPIGroup(WORLD, "world")
    group.cuda_aware = True
    check_every_collective(group, direct_path)
