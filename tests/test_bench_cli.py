"""`weathermixer bench` reports per-rank memory, traffic and time; 4-way holds <= 0.27 of
the 1-way parameter bytes per rank; with replicas it times each replica alone too."""
import json

import pytest

from tests.test_mpi import run_under_mpi

SMALL = ["--n-lat", "8", "--n-lon", "16", "--n-prognostic", "5", "--n-static", "1",
         "--patch-lat", "1", "--patch-lon", "4", "--embed-dim", "64", "--token-hidden-dim",
         "48", "--channel-hidden-dim", "96", "--blocks", "2", "--steps", "2", "--warmup", "1"]


def test_four_way_bench_reports_every_rank(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_under_mpi(4, ["-m", "weathermixer", "bench", "--jigsaw", "4", "--json", str(out)]
                         + SMALL, limit=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["rank"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        assert r["param_fraction"] <= 0.27, r
        assert r["bytes_sent_per_step"]["xwt.scatter_y"] > 0
        assert r["bytes_sent_per_step"]["layernorm"] > 0
        assert 0 < r["comm_seconds_per_step"] < r["seconds_per_step"]
        assert r["dp_efficiency"] is None  # one replica
        assert r["transport"] == {"domain": "MPI (device arrays via host memory)",
                                  "channel": "MPI (device arrays via host memory)",
                                  "data": "none (one rank)"}, r["transport"]
    assert "bytes sent per step" in proc.stdout


def test_two_replicas_bench_times_each_replica_alone(tmp_path):
    """Each rank reports the step of its replica alone and the ratio of the two; the bytes per
    step stay those of the data-parallel step: the gradient sums are a reduce-scatter (half
    of every parameter's bytes), and each replica sends its updated part of the parameters
    to the other (the two parts together: every parameter once)."""
    out = tmp_path / "bench.json"
    proc = run_under_mpi(2, ["-m", "weathermixer", "bench", "--jigsaw", "1", "--batch", "2",
                             "--json", str(out)] + SMALL, limit=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert sorted(r["replica"] for r in rows) == [0, 1]
    for r in rows:
        assert r["replicas"] == 2 and r["solo_step_ms"] > 0
        assert abs(r["dp_efficiency"] - r["solo_step_ms"] / r["step_ms"]) < 1e-12
        assert r["bytes_sent_per_step"]["sync.data"] == pytest.approx(r["param_bytes"] / 2,
                                                                      rel=1e-3)
    assert sum(r["bytes_sent_per_step"]["optimizer.gather"] for r in rows) == rows[0]["param_bytes"]
    together = 2 / max(r["step_ms"] for r in rows)  # steps per ms of both replicas
    alone = sum(1 / r["solo_step_ms"] for r in rows)  # one rank per replica here
    assert abs(result["dp_efficiency"] - together / alone) < 1e-12
    assert "data-parallel efficiency of the 2 replicas together" in proc.stdout


def test_one_rank_bench_sends_nothing(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_under_mpi(1, ["-m", "weathermixer", "bench", "--json", str(out)] + SMALL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert row["param_fraction"] == 1.0 and not any(row["bytes_sent_per_step"].values())


def test_data_parallel_efficiency_counts_each_replica_at_its_slowest_rank():
    """Two replicas of two ranks: a replica alone steps as fast as its slowest rank, the
    replicas together as fast as the slowest rank of all."""
    from weathermixer.mixer.bench import data_parallel_efficiency
    rows = [dict(replica=0, solo_step_ms=100.0, step_ms=120.0),
            dict(replica=0, solo_step_ms=110.0, step_ms=121.0),
            dict(replica=1, solo_step_ms=90.0, step_ms=120.5),
            dict(replica=1, solo_step_ms=95.0, step_ms=120.0)]
    want = (2 / 121.0) / (1 / 110.0 + 1 / 95.0)
    assert abs(data_parallel_efficiency(rows) - want) < 1e-15
    assert data_parallel_efficiency([dict(replica=0, solo_step_ms=None, step_ms=1.0)]) is None
