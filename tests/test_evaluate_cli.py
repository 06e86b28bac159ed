"""`weathermixer evaluate`: RMSE per variable in physical units, the same on every layout, and
a persistence baseline equal to an independent computation from the raw file."""
import json

import h5py
import numpy as np
import pytest

from tests.test_train_cli import ok, train_cli
from tests.test_mpi import run_under_mpi

NAMES = ["z500", "t850", "u10", "msl"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small SPEC-layout data file (physical-looking units) and a float64 checkpoint on it."""
    d = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    T, C, H, W = 9, 4, 10, 16
    scale = np.array([5000.0, 10.0, 3.0, 800.0])[None, :, None, None]
    offset = np.array([55000.0, 270.0, 0.0, 101000.0])[None, :, None, None]
    fields = (offset + scale * np.cumsum(rng.standard_normal((T, C, H, W)), axis=0)).astype(np.float32)
    path = d / "data.h5"
    with h5py.File(path, "w") as f:
        f["fields"] = fields
        f["channel"] = np.array([n.encode() for n in NAMES])
        f["lat"] = np.linspace(80, -80, H).astype(np.float32)
        f["lon"] = np.arange(W, dtype=np.float32) * 22.5
        f["timestamp"] = np.arange(T, dtype=np.int64) * 21600
        f.attrs["dhours"] = 6
    out = d / "run"
    ok(train_cli(["--data", str(path), "--patch-lat", "2", "--patch-lon", "4", "--embed-dim", "9",
                  "--token-hidden-dim", "7", "--channel-hidden-dim", "11", "--steps", "4",
                  "--batch", "2", "--dtype", "float64", "--out", str(out)]))
    return path, out / "last.h5", fields


def evaluate(ckpt, out, n=1, *args):
    argv = ["-m", "weathermixer", "evaluate", str(ckpt), "--lead", "2", "--json", str(out)]
    proc = run_under_mpi(n, argv + list(args), limit=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


def test_persistence_matches_the_raw_file(trained, tmp_path):
    path, ckpt, fields = trained
    result = evaluate(ckpt, tmp_path / "e.json")
    lat = np.deg2rad(np.linspace(80, -80, fields.shape[2]))
    w = np.cos(lat) / np.cos(lat).mean()
    x, y = fields[:-2].astype(np.float64), fields[2:].astype(np.float64)  # every (t, t + 2)
    expected = np.sqrt(((y - x) ** 2 * w[None, None, :, None]).mean(axis=(0, 2, 3)))
    assert result["variables"] == NAMES and result["samples"] == len(x)
    np.testing.assert_allclose(result["persistence_rmse"], expected, rtol=1e-5)
    assert all(np.isfinite(result["rmse"])) and min(result["rmse"]) > 0


@pytest.mark.parametrize("n,layout", [(2, ["--jigsaw", "2"]), (4, ["--jigsaw", "4"]),
                                      (4, ["--jigsaw", "2"])])
def test_every_layout_gives_the_same_figures(trained, tmp_path, n, layout):
    _, ckpt, _ = trained
    one = evaluate(ckpt, tmp_path / "one.json")
    many = evaluate(ckpt, tmp_path / "many.json", n, *layout)
    np.testing.assert_allclose(many["rmse"], one["rmse"], rtol=1e-10)
    np.testing.assert_allclose(many["persistence_rmse"], one["persistence_rmse"], rtol=1e-10)
