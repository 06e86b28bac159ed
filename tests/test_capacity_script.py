"""benchmarks/capacity.py: its parameters have init_params' blocks on every grid, its search
finds the boundary, phase one finds the largest tiny model under a fake byte cap, and phase two
trains twice that model on 2 ranks (numpy, 2x1, under mpiexec)."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import weathermixer as wm
from tests.test_mpi import run_under_mpi
from weathermixer.config import param_shapes
from weathermixer.jigsaw.backend import LocalGroup
from weathermixer.jigsaw.grid import ProcessGrid
from weathermixer.mixer.layout import Layout

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("capacity", ROOT / "benchmarks" / "capacity.py")
capacity = importlib.util.module_from_spec(spec)
spec.loader.exec_module(capacity)


def test_search_ends_at_the_boundary_from_any_guess():
    for largest in range(0, 9):
        for guess in range(0, 12):
            seen = []

            def fits(n):
                seen.append(n)
                return n <= largest

            found = capacity.largest_fitting(fits, guess, most=8)
            assert found == min(largest, 8), (largest, guess)
            if 0 < found < 8:
                assert found in seen and found + 1 in seen  # measured to fit, and one more not
            assert len(seen) == len(set(seen)) <= abs(guess - largest) + 2


@pytest.mark.parametrize("pd,pc", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_device_params_have_the_blocks_of_init_params(pd, pc):
    cfg = wm.Config(**capacity.FAMILIES["tiny"], n_blocks=2)
    for i, j in [(i, j) for i in range(pd) for j in range(pc)]:
        g = LocalGroup
        grid = ProcessGrid(pd, pc, 1, i, j, 0, g("world"), g("model"), g("channel"),
                           g("domain"), g("data"))
        layout = Layout(cfg, grid)
        ours = capacity.device_params(cfg, layout, np)
        ref = wm.init_params(cfg, dtype="float32", layout=layout)
        assert list(ours) == list(ref)
        for name, p in ref.items():
            assert ours[name].shape == p.shape and ours[name].dtype == np.float32, name
            bound = 1 / np.sqrt(param_shapes(cfg)[name][-1])
            assert np.abs(ours[name]).max() <= (bound if name.endswith("/weight") else 1), name


def run_phase_one(tmp_path, cap_gib):
    out = tmp_path / "cap1.json"
    capacity.main(["one", "--device", "cpu", "--tiny", "--memory-gib", str(cap_gib),
                   "--json", str(out)])
    return out, json.loads(out.read_text())


def test_phase_one_finds_the_largest_tiny_model_under_a_fake_cap(tmp_path):
    cap_gib = 2.0 / 1024  # 2 MiB: about 8 tiny blocks with their gradients and moments
    _, one = run_phase_one(tmp_path, cap_gib)

    def held(n):  # parameters, gradients, m, v in float32, plus input and target
        cfg = wm.Config(**capacity.FAMILIES["tiny"], n_blocks=n)
        return 16 * cfg.n_params() + 4 * (cfg.n_vars + cfg.n_prognostic) * cfg.n_lat * cfg.n_lon

    n_max = max(n for n in range(1, 40) if held(n) <= cap_gib * 2 ** 30)
    assert one["n_max"] == n_max >= 4
    fits = {t["n_blocks"]: t["fits"] for t in one["trials"]}
    assert fits[n_max] and not fits[n_max + 1]
    assert all(t["loss_finite"] for t in one["trials"])


def test_phase_two_trains_twice_the_largest_model_on_two_ranks(tmp_path):
    path, one = run_phase_one(tmp_path, 2.0 / 1024)
    out = tmp_path / "cap2.json"
    proc = run_under_mpi(2, ["benchmarks/capacity.py", "two", "--device", "cpu", "--from",
                             str(path), "--json", str(out)], limit=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    two = json.loads(out.read_text())
    assert two["n_blocks"] == 2 * one["n_max"] and two["grid"] == "2x1"
    assert [r["rank"] for r in two["rows"]] == [0, 1]
    assert two["loss_finite"] and two["within_cap"] and len(two["losses"]) == 3
    assert 1.9 < two["params_ratio"] < 2.0
    assert "trains" in proc.stdout
