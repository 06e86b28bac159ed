"""Normalisation statistics computed by all ranks together (each rank streams every
world-size-th time step, Chan's merge over an allreduce) equal the one-process statistics."""
import h5py
import numpy as np

from tests.mpi.harness import WORLD, assert_all, relative_error
from weathermixer.io.data import Era5Source, compute_stats, merge_stats, partial_stats
from weathermixer.jigsaw import ops
from weathermixer.jigsaw.grid import ProcessGrid


def test_merged_statistics_equal_serial(tmp_path_factory):
    grid = ProcessGrid.from_mpi(1, 1, WORLD)
    path = None
    if WORLD.rank == 0:
        path = str(tmp_path_factory.mktemp("stats") / "two-years.h5")
        rng = np.random.default_rng(0)
        with h5py.File(path, "w") as f:
            f["fields"] = (rng.standard_normal((7, 3, 5, 8)) * [[[[1.0]], [[50.0]], [[0.01]]]]
                           + [[[[0.0]], [[1e4]], [[300.0]]]]).astype(np.float32)
            f["channel"] = np.array([b"a", b"b", b"c"])
            f["lat"] = np.linspace(60, -60, 5).astype(np.float32)
            f["lon"] = np.arange(8, dtype=np.float32) * 45
    path = grid.world.bcast_json(path)
    source = Era5Source([path, path], static=["c"])  # two files: 14 steps over the ranks
    mean, std = merge_stats(*partial_stats(source, WORLD.rank, WORLD.size),
                            allreduce=lambda a: ops.allreduce_sum(a, grid.world))
    ref_mean, ref_std = compute_stats(source)
    err = max(relative_error(mean, ref_mean), relative_error(std, ref_std))
    assert_all(err < 1e-12, f"merged statistics differ from serial: {err:.3e}")
    source.close()
