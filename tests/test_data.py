"""Tests of weathermixer.io.data, .synthetic and .metrics (real ERA5 samples plus small tmp files)."""
from __future__ import annotations

import pathlib
import zlib

import h5py
import numpy as np
import pytest

from weathermixer.io.data import (DataError, Era5Source, compute_stats, load_stats, save_stats,
                                  stats_path_for)
from weathermixer.io.metrics import denormalise, weighted_rmse
from weathermixer.io.synthetic import SyntheticSource

SAMPLES = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data" / "era5_samples"
GLOBAL = SAMPLES / "era5_eda_global_z_t_500_850_2017-01-01_12h_3p0.h5"
UK = SAMPLES / "era5_uk_t2m_2019-03_1h_0p25.h5"
needs_samples = pytest.mark.skipif(not (GLOBAL.exists() and UK.exists()),
                                   reason=f"ERA5 sample files not found in {SAMPLES}")


def write_file(path, fields=None, channel=None, lat=None, lon=None, dhours=6, skip=()):
    """A small data file; `skip` leaves datasets out. Default fields [5, 4, 6, 8] random."""
    rng = np.random.default_rng(zlib.crc32(pathlib.Path(path).name.encode()))
    if fields is None:
        fields = rng.normal(10.0, 3.0, size=(5, 4, 6, 8)).astype(np.float32)  # [T, C, H, W]
    nc, nh, nw = fields.shape[1:] if fields.ndim == 4 else (4, 6, 8)
    items = {"fields": fields,
             "channel": np.array(channel or [f"c{i}".encode() for i in range(nc)]),
             "lat": lat if lat is not None else np.linspace(80, -80, nh).astype(np.float32),
             "lon": lon if lon is not None else np.linspace(0, 315, nw).astype(np.float32)}
    with h5py.File(path, "w") as fh:
        for key, value in items.items():
            if key not in skip:
                fh.create_dataset(key, data=value)
        if dhours is not None:
            fh.attrs["dhours"] = dhours
    return str(path)


def full_model_order(path, order):
    """float64 [T, C, H, W] of the whole file with channels in `order` (file indices)."""
    with h5py.File(path, "r") as fh:
        return fh["fields"][()].astype(np.float64)[:, order]


def assemble(src, read, n_chan, bands, groups):
    """Re-assemble a [n_chan, H, W] field from tiles read over row bands and channel groups."""
    out = np.full((n_chan, src.n_lat, src.n_lon), np.nan, dtype=np.float32)  # [C, H, W]
    for rows in bands:
        for g in groups:
            out[np.asarray(g)[:, None], np.arange(src.n_lat)[rows][None, :]] = read(g, rows)
    return out


# ---- real files -------------------------------------------------------------------------------------

@needs_samples
def test_metadata_real_files():
    with Era5Source(str(GLOBAL)) as g:
        assert g.channels == ["z500", "z850", "t500", "t850"] and g.static == []
        assert (g.n_lat, g.n_lon, g.dhours, g.n_time) == (61, 120, 12, [4])
        assert g.lat[0] == 90 and g.lat[-1] == -90 and g.lon[1] == 3
        w = g.lat_weights()
        assert w.shape == (61,) and w.dtype == np.float64 and abs(w.mean() - 1) < 1e-12
    with Era5Source([UK], static=()) as u:
        assert u.channels == ["t2m"] and (u.n_prognostic, u.n_static) == (1, 0)
        assert (u.n_lat, u.n_lon, u.dhours, u.n_time) == (33, 49, 1, [744])
        assert u.lat[0] == 58 and u.lon[0] == -10
        assert u.samples(1).shape == (743, 2)


@needs_samples
def test_real_tiles_assemble_with_noncontiguous_static():
    src = Era5Source(GLOBAL, static=["z850"])
    assert src.channels == ["z500", "t500", "t850", "z850"] and src.prognostic == ["z500", "t500", "t850"]
    order = [0, 2, 3, 1]  # model channel -> file channel
    truth = full_model_order(GLOBAL, order)  # [T, C, H, W]
    bands = [slice(0, 20), slice(20, 41), slice(41, 61)]
    for t in range(3):
        full = src.read_input((0, t), np.arange(4), slice(None))
        assert full.dtype == np.float32 and full.shape == (4, 61, 120)
        np.testing.assert_array_equal(full, truth[t].astype(np.float32))
        for groups in ([[0, 1], [2, 3]], [[3, 0], [2], [1]], [[1, 3, 0, 2]]):
            got = assemble(src, lambda g, r: src.read_input((0, t), g, r), 4, bands, groups)
            np.testing.assert_array_equal(got, full)
        tgt = assemble(src, lambda g, r: src.read_target((0, t), 1, g, r), 3, bands, [[2, 0], [1]])
        np.testing.assert_array_equal(tgt, truth[t + 1, :3].astype(np.float32))
    src.close()


@needs_samples
def test_real_compute_stats_and_normalisation():
    src = Era5Source(GLOBAL, static=["z850"])
    truth = full_model_order(GLOBAL, [0, 2, 3, 1])  # [T, C, H, W]
    mean, std = compute_stats(src)
    np.testing.assert_allclose(mean, truth.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std, truth.std(axis=(0, 2, 3)), rtol=1e-9)
    src.set_stats(mean, std)
    x = src.read_input((0, 2), [3, 1], slice(10, 30))
    want = (truth[2, [3, 1], 10:30] - mean[[3, 1], None, None]) / std[[3, 1], None, None]
    np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-5)
    assert abs(float(src.read_input((0, 1), [0], None).mean())) < 3
    src.close()


# ---- tile-only reads -----------------------------------------------------------------------------------

def test_reads_are_one_hyperslab_per_contiguous_run(tmp_path, monkeypatch):
    fields = np.random.default_rng(1).normal(size=(4, 5, 6, 8)).astype(np.float32)
    path = write_file(tmp_path / "a.h5", fields=fields)
    src = Era5Source(path, static=["c1"])  # model order c0 c2 c3 c4 c1
    keys = []
    original = h5py.Dataset.__getitem__

    def spy(self, key):
        if self.name == "/fields":
            keys.append(key)
        return original(self, key)

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    x = src.read_input((0, 2), [0, 1, 2, 4], slice(1, 4))  # file channels 0 | 2 3 | 1
    assert keys == [(2, slice(0, 1), slice(1, 4), slice(None)), (2, slice(2, 4), slice(1, 4), slice(None)),
                    (2, slice(1, 2), slice(1, 4), slice(None))]
    np.testing.assert_array_equal(x, fields[2][[0, 2, 3, 1], 1:4])
    keys.clear()
    src.read_target((0, 1), 2, [3, 1, 2], slice(0, 2))  # file channels 4 | 2 3
    assert keys == [(3, slice(4, 5), slice(0, 2), slice(None)), (3, slice(2, 4), slice(0, 2), slice(None))]
    src.close()


def test_nan_outside_the_tile_is_not_read(tmp_path):
    fields = np.ones((3, 2, 10, 4), dtype=np.float32)
    fields[1, 1, 6:] = np.nan
    path = write_file(tmp_path / "nan.h5", fields=fields, channel=[b"u", b"v"])
    src = Era5Source(path)
    assert np.isfinite(src.read_input((0, 1), [0, 1], slice(0, 6))).all()
    assert np.isfinite(src.read_input((0, 1), [0], slice(None))).all()
    with pytest.raises(DataError) as e:
        src.read_input((0, 1), [0, 1], slice(4, 8))
    assert all(s in str(e.value) for s in (path, "'fields'", "time index 1", "'v'"))
    with pytest.raises(DataError, match="time index 1"):
        src.read_target((0, 0), 1, [1], slice(5, 7))
    with pytest.raises(DataError, match="'v'"):
        compute_stats(src)
    src.close()


# ---- stats -----------------------------------------------------------------------------------------------

def test_compute_stats_two_files_and_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    a = rng.normal(100.0, 5.0, size=(5, 3, 4, 6)).astype(np.float32)
    b = rng.normal(90.0, 2.0, size=(2, 3, 4, 6)).astype(np.float32)
    pa, pb = write_file(tmp_path / "a.h5", fields=a), write_file(tmp_path / "b.h5", fields=b)
    src = Era5Source([pa, pb], static=["c0"])  # model order c1 c2 c0
    every = np.concatenate([a, b]).astype(np.float64)[:, [1, 2, 0]]  # [T, C, H, W]
    mean, std = compute_stats(src)
    assert mean.dtype == std.dtype == np.float64
    np.testing.assert_allclose(mean, every.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(std, every.std(axis=(0, 2, 3)), rtol=1e-10)

    spath = stats_path_for(pa)
    assert spath == pa + ".stats.h5" and stats_path_for([pa, pb]) == spath
    save_stats(spath, src.channels, mean, std)
    m2, s2 = load_stats(spath, src.channels)
    np.testing.assert_array_equal(m2, mean)
    np.testing.assert_array_equal(s2, std)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5", "a.h5.stats.h5", "b.h5"]  # no tmp left
    with pytest.raises(DataError) as e:
        load_stats(spath, ["c1", "c0", "c2"])
    assert all(s in str(e.value) for s in (spath, "'channel'", "index 1"))
    with pytest.raises(DataError, match="index 3"):
        load_stats(spath, ["c1", "c2", "c0", "c3"])

    src2 = Era5Source([pa, pb], static=["c0"], stats=(m2, s2))
    x = src2.read_input((1, 0), [2, 0], slice(1, 3))
    want = (b[0][[0, 1], 1:3] - mean[[2, 0], None, None]) / std[[2, 0], None, None]
    np.testing.assert_allclose(x, want, rtol=1e-5, atol=1e-5)
    src.close()
    src2.close()


def test_set_stats_rejects_bad_std(tmp_path):
    src = Era5Source(write_file(tmp_path / "a.h5"))
    with pytest.raises(DataError) as e:
        src.set_stats(np.zeros(4), np.array([1.0, 1.0, 0.0, 1.0]))
    assert "'std'" in str(e.value) and "index 2" in str(e.value) and "'c2'" in str(e.value)
    with pytest.raises(DataError, match="shape"):
        src.set_stats(np.zeros(3), np.ones(3))
    src.close()


# ---- validation --------------------------------------------------------------------------------------

def _bad_files(tmp_path):
    """(name, paths, static, substrings the message must hold)."""
    p = lambda n: tmp_path / n  # noqa: E731
    good = write_file(p("good.h5"))
    cases = []
    for key in ("fields", "channel", "lat", "lon"):
        path = write_file(p(f"no_{key}.h5"), skip=(key,))
        cases.append((f"missing {key}", [path], (), [path, f"'{key}'", "is missing", "index 0"]))
    path = write_file(p("3d.h5"), fields=np.zeros((5, 6, 8), np.float32))
    cases.append(("3-D", [path], (), [path, "'fields'", "4-D", "index"]))
    for axis, key, shape in ((1, "channel", (5, 3, 6, 8)), (2, "lat", (5, 4, 5, 8)), (3, "lon", (5, 4, 6, 9))):
        fields = np.zeros(shape, np.float32)
        kw = {"channel": [b"a", b"b", b"c", b"d"], "lat": np.zeros(6), "lon": np.zeros(8)}
        path = write_file(p(f"axis{axis}.h5"), fields=fields, **{key: kw[key]})
        cases.append((f"axis {axis}", [path], (), [path, "'fields'", f"axis {axis}", f"'{key}'"]))
    path = write_file(p("chan.h5"), channel=[b"c0", b"c1", b"x", b"c3"])
    cases.append(("channels differ", [good, path], (), [path, "'channel'", "index 2", "'x'", good]))
    lat = np.linspace(80, -80, 6).astype(np.float32)
    lat[5] = 0
    path = write_file(p("lat.h5"), lat=lat)
    cases.append(("lat differs", [good, path], (), [path, "'lat'", "index 5"]))
    lon = np.linspace(0, 315, 8).astype(np.float32)
    lon[7] = 1
    path = write_file(p("lon.h5"), lon=lon)
    cases.append(("lon differs", [good, path], (), [path, "'lon'", "index 7"]))
    path = write_file(p("lonlen.h5"), fields=np.zeros((5, 4, 6, 7), np.float32),
                      lon=np.linspace(0, 315, 8).astype(np.float32)[:7])
    cases.append(("grid size differs", [good, path], (), [path, "'lon'", "index 7"]))
    cases.append(("unknown static", [good], ["c1", "zz"], [good, "'channel'", "'zz'", "static index 1",
                                                            "c0, c1, c2, c3"]))
    cases.append(("all static", [good], ["c0", "c1", "c2", "c3"], [good, "'channel'", "prognostic", "0..3"]))
    one = [write_file(p(f"one{i}.h5"), fields=np.zeros((1, 4, 6, 8), np.float32)) for i in range(2)]
    cases.append(("short", one, (), one + ["'fields'", "time index", "fewer than 2"]))
    return cases


def test_every_data_error_names_file_dataset_index(tmp_path):
    cases = _bad_files(tmp_path)
    assert len(cases) == 15
    for name, paths, static, needles in cases:
        with pytest.raises(DataError) as e:
            Era5Source(paths, static=static)
        for s in needles:
            assert s in str(e.value), f"{name}: {s!r} not in {e.value}"


def test_file_handles_closed_after_error(tmp_path):
    good = write_file(tmp_path / "g.h5")
    with pytest.raises(DataError):
        Era5Source([good, write_file(tmp_path / "bad.h5", skip=("lat",))])
    with h5py.File(good, "a"):  # opening for writing fails if a handle were left open
        pass


# ---- sampling --------------------------------------------------------------------------------------------

def test_samples_never_cross_files(tmp_path):
    a = write_file(tmp_path / "a.h5", fields=np.zeros((5, 4, 6, 8), np.float32))
    b = write_file(tmp_path / "b.h5", fields=np.ones((3, 4, 6, 8), np.float32))
    c = write_file(tmp_path / "c.h5", fields=np.ones((1, 4, 6, 8), np.float32))
    src = Era5Source([a, b, c])
    assert src.n_time == [5, 3, 1]
    s = src.samples(2)
    assert s.dtype == np.int64 and s.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0]]
    for f, t in s:
        assert t + 2 < src.n_time[f]
        assert (src.read_target((f, t), 2, [0], slice(0, 1)) == float(f)).all()
    assert src.samples(0).shape == (9, 2)
    with pytest.raises(IndexError):
        src.read_target((0, 3), 2, [0], slice(0, 1))
    with pytest.raises(DataError) as e:
        src.samples(5)
    assert a in str(e.value) and "'fields'" in str(e.value)
    src.close()


# ---- synthetic source ------------------------------------------------------------------------------------

def test_synthetic_interface_determinism_and_tiles():
    a = SyntheticSource(8, 12, 3, 2, n_time=10, seed=3)
    b = SyntheticSource(8, 12, 3, 2, n_time=10, seed=3)
    c = SyntheticSource(8, 12, 3, 2, n_time=10, seed=4)
    assert a.channels == a.prognostic + a.static and (a.n_prognostic, a.n_static, a.n_lat, a.n_lon) == (3, 2, 8, 12)
    assert a.lat[0] == -a.lat[-1] == 78.75 and np.all(np.diff(a.lat) < 0)
    assert abs(a.lat_weights().mean() - 1) < 1e-12
    assert a.samples(3).tolist() == [[0, t] for t in range(7)]
    full = a.read_input((0, 4), np.arange(5), slice(None))  # [C, H, W]
    assert full.dtype == np.float32 and full.shape == (5, 8, 12) and 0.05 < np.abs(full).max() < 5
    np.testing.assert_array_equal(full, b.read_input((0, 4), np.arange(5), slice(None)))
    assert not np.array_equal(full, c.read_input((0, 4), np.arange(5), slice(None)))
    bands = [slice(0, 3), slice(3, 4), slice(4, 8)]
    got = assemble(a, lambda g, r: a.read_input((0, 4), g, r), 5, bands, [[4, 0], [2], [1, 3]])
    np.testing.assert_array_equal(got, full)
    tgt = a.read_target((0, 4), 1, [0, 1, 2], slice(None))
    np.testing.assert_array_equal(tgt, a.read_input((0, 5), [0, 1, 2], slice(None)))
    assert np.abs(tgt - full[:3]).mean() > 0.05  # the target is not the input
    np.testing.assert_array_equal(a.read_input((0, 0), [3, 4], None), full[3:])  # static is constant
    assert set(np.unique(full[3])) == {0.0, 1.0}  # land-sea-like mask


def test_synthetic_advects_east_and_stats():
    src = SyntheticSource(6, 16, 2, 0, n_time=8, seed=0)
    x0 = src.read_input((0, 2), [0, 1], None)
    x1 = src.read_input((0, 3), [0, 1], None)
    rolled = np.roll(x0, 1, axis=-1)  # one column east
    assert np.abs(x1 - rolled).mean() < 0.5 * np.abs(x1 - x0).mean()
    mean, std = compute_stats(src)
    every = np.stack([s[2] for s in src.raw_steps()]).astype(np.float64)  # [T, C, H, W]
    np.testing.assert_allclose(mean, every.mean(axis=(0, 2, 3)), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(std, every.std(axis=(0, 2, 3)), rtol=1e-10)
    src.set_stats(mean, std)
    z = np.stack([src.read_input((0, t), [0, 1], None) for t in range(8)])
    np.testing.assert_allclose(z.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=(0, 2, 3)), 1, atol=1e-5)


# ---- metrics ---------------------------------------------------------------------------------------------

def test_weighted_rmse_and_denormalise():
    rng = np.random.default_rng(5)
    y = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    t = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    w = np.array([0.5, 1.5, 1.5, 0.5])
    want = np.sqrt([(w[:, None] * (y[:, v] - t[:, v]).astype(np.float64) ** 2).mean() * 1.0 for v in range(3)])
    got = weighted_rmse(y, t, w)
    assert got.shape == (3,) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_array_equal(weighted_rmse(y, y, w), 0)
    mean, std = np.array([1.0, -2.0, 3.0]), np.array([2.0, 0.5, 4.0])
    back = denormalise((y - mean[:, None, None]) / std[:, None, None], mean, std)
    np.testing.assert_allclose(back, y, rtol=1e-5, atol=1e-5)
