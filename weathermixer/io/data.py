"""ERA5 data in HDF5 (SPEC.md "Data file"), read tile by tile (JIGSAW.md section 7).

File layout (FourCastNet/Makani), one time series per file:

    fields     float [time, channel, lat, lon]   physical units
    channel    names (bytes or str)  [channel]
    lat, lon   degrees               [lat], [lon]   (lat north to south as in ERA5)
    attribute  dhours                hours between steps (optional)

Model channel order (C = P + S): the P prognostic channels in file order, then the S static
(input-only) channels in the order the caller gives. A sample is (file index f, time t); it
never crosses a file, so t + max_lead < n_time[f].

Normalisation, per model channel c:   x_norm = (x - mean[c]) / std[c]
Latitude weights:                     lat_w[h] = cos(lat_h) / mean_h cos(lat_h)
Statistics (compute_stats), over all times n of all files and all pixels (h, w):
    mean[c] = sum x / N,   std[c] = sqrt(sum (x - mean[c])^2 / N)     (population std)
accumulated one time step at a time with Chan's pairwise update, in float64.

Read contract: a rank reads only its tile, `fields[t, c0:c1, r0:r1, :]`, one h5py hyperslab per
contiguous run of *file* channel indices, never the whole field. Every input problem raises
DataError naming the file, the dataset or attribute, and the index. No MPI here: the trainer
runs the collectives; this module only reads.
"""
from __future__ import annotations

import os

import h5py
import numpy as np

from weathermixer.io.atomic import atomic_h5

REQUIRED = ("fields", "channel", "lat", "lon")
COORD_ATOL = 1e-4  # degrees: lat/lon of two files agree when closer than this


class DataError(ValueError):
    """Bad input data. The message always names the file, the dataset/attribute (variable) and the index."""


# ---- shared source logic (Era5Source and SyntheticSource) ----------------------------------------

class SourceBase:
    """Channel bookkeeping, normalisation, sampling and tile reads shared by all sources.

    Subclasses set `paths`, `lat`, `lon`, `dhours`, `n_time`, `prognostic`, `static` and then call
    `_init_channels()`; they implement `_read_raw(f, t, model_channels, r0, r1)` (float32
    [len(model_channels), r1 - r0, n_lon], physical units) and `raw_steps()`.
    """

    def _init_channels(self, stats=None):
        """Set the model channel list and the stats (identity until given)."""
        self.channels = list(self.prognostic) + list(self.static)
        n = len(self.channels)
        self._mean = np.zeros(n, dtype=np.float64)  # [C]
        self._std = np.ones(n, dtype=np.float64)  # [C]
        if stats is not None:
            self.set_stats(*stats)

    # ---- sizes --------------------------------------------------------------------------------
    @property
    def n_prognostic(self) -> int:
        return len(self.prognostic)

    @property
    def n_static(self) -> int:
        return len(self.static)

    @property
    def n_channels(self) -> int:
        return len(self.channels)

    @property
    def n_lat(self) -> int:
        return int(self.lat.shape[0])

    @property
    def n_lon(self) -> int:
        return int(self.lon.shape[0])

    @property
    def mean(self) -> np.ndarray:
        return self._mean.copy()

    @property
    def std(self) -> np.ndarray:
        return self._std.copy()

    def _name(self, f: int) -> str:
        """The file name used in messages."""
        return self.paths[f] if f < len(self.paths) else "<synthetic>"

    # ---- weights, samples, stats -----------------------------------------------------------------
    def lat_weights(self) -> np.ndarray:
        """[n_lat] float64: cos(lat) / mean(cos(lat)) (SPEC.md Loss)."""
        c = np.clip(np.cos(np.deg2rad(self.lat.astype(np.float64))), 0.0, None)  # [H]
        return c / c.mean()

    def samples(self, max_lead: int) -> np.ndarray:
        """[n_samples, 2] int64 rows (file index, t) with t + max_lead < n_time of that file."""
        max_lead = int(max_lead)
        if max_lead < 0:
            raise ValueError(f"max_lead must be >= 0, got {max_lead}")
        parts = [np.stack([np.full(max(n - max_lead, 0), f), np.arange(max(n - max_lead, 0))], axis=1)
                 for f, n in enumerate(self.n_time)]  # each [n_f - max_lead, 2]
        out = np.concatenate(parts, axis=0).astype(np.int64)  # [n_samples, 2]
        if out.shape[0] == 0:
            names = ", ".join(self._name(f) for f in range(len(self.n_time)))
            raise DataError(f"{names}: dataset 'fields' axis 0 (time index): no sample with "
                            f"t + {max_lead} < n_time in any file (n_time = {self.n_time})")
        return out

    def set_stats(self, mean, std) -> None:
        """Normalise with mean/std ([n_channels], model channel order); std must be finite and > 0."""
        mean = np.asarray(mean, dtype=np.float64)
        std = np.asarray(std, dtype=np.float64)
        for key, a in (("mean", mean), ("std", std)):
            if a.shape != (self.n_channels,):
                raise DataError(f"stats: '{key}' has shape {a.shape}, expected ({self.n_channels},) "
                                f"for channels {self.channels}")
        for c, name in enumerate(self.channels):
            if not np.isfinite(mean[c]):
                raise DataError(f"stats: 'mean' index {c} (channel {name!r}) is {mean[c]}; must be finite")
            if not (np.isfinite(std[c]) and std[c] > 0):
                raise DataError(f"stats: 'std' index {c} (channel {name!r}) is {std[c]}; must be > 0")
        self._mean, self._std = mean.copy(), std.copy()

    # ---- tile reads --------------------------------------------------------------------------------
    def read_input(self, sample, channels, rows) -> np.ndarray:
        """float32 [len(channels), r1 - r0, n_lon]: normalised input tile at time t.

        `channels` are model-input channel indices (0..C-1) in the order wanted; `rows` a slice of rows.
        """
        f, t = self._check_sample(sample, 0)
        chans = self._check_channels(channels, self.n_channels, "input")
        r0, r1 = self._check_rows(rows)
        return self._normalised(f, t, chans, r0, r1)

    def read_target(self, sample, lead, channels, rows) -> np.ndarray:
        """float32 [len(channels), r1 - r0, n_lon]: normalised target tile at time t + lead.

        `channels` index the prognostic channels (0..P-1), which are the first P model channels.
        """
        lead = int(lead)
        if lead < 0:
            raise ValueError(f"lead must be >= 0, got {lead}")
        f, t = self._check_sample(sample, lead)
        chans = self._check_channels(channels, self.n_prognostic, "target")
        r0, r1 = self._check_rows(rows)
        return self._normalised(f, t + lead, chans, r0, r1)

    def _normalised(self, f, t, chans, r0, r1) -> np.ndarray:
        """(raw - mean) / std in place, float32 [len(chans), r1 - r0, W]."""
        x = self._read_raw(f, t, chans, r0, r1)  # [c, r, W] float32
        x -= self._mean[chans].astype(np.float32)[:, None, None]
        x /= self._std[chans].astype(np.float32)[:, None, None]
        return x

    def _check_sample(self, sample, lead):
        """(f, t) as ints, with 0 <= t and t + lead < n_time[f]."""
        f, t = int(sample[0]), int(sample[1])
        if not 0 <= f < len(self.n_time):
            raise IndexError(f"sample file index {f} out of range (0..{len(self.n_time) - 1})")
        if not (0 <= t and t + lead < self.n_time[f]):
            raise IndexError(f"{self._name(f)}: time index {t} + lead {lead} out of range "
                             f"(n_time = {self.n_time[f]})")
        return f, t

    @staticmethod
    def _check_channels(channels, n, what) -> np.ndarray:
        """int64 [k] channel indices, each in 0..n-1, order kept."""
        chans = np.asarray(channels, dtype=np.int64).reshape(-1)  # [k]
        bad = chans[(chans < 0) | (chans >= n)]
        if bad.size:
            raise IndexError(f"{what} channel index {int(bad[0])} out of range (0..{n - 1})")
        return chans

    def _check_rows(self, rows):
        """(r0, r1) of a unit-step, non-empty row slice (None means all rows)."""
        if rows is None:
            rows = slice(None)
        if not isinstance(rows, slice):
            raise TypeError(f"rows must be a slice, got {type(rows).__name__}")
        r0, r1, step = rows.indices(self.n_lat)
        if step != 1 or r1 <= r0:
            raise ValueError(f"rows must be a non-empty slice with step 1, got {rows} for n_lat={self.n_lat}")
        return r0, r1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---- HDF5 source -------------------------------------------------------------------------------------

def _as_paths(paths) -> list[str]:
    """A str/PathLike or a list of them, as a list of str."""
    if isinstance(paths, (str, os.PathLike)):
        return [os.fspath(paths)]
    out = [os.fspath(p) for p in paths]
    if not out:
        raise DataError("no data file given (paths is empty)")
    return out


def _decode(names) -> list[str]:
    """Channel names (bytes or str) as a list of str."""
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def _first_difference(a, b, close=False) -> int:
    """The first index where sequences a and b differ (min length if one is a prefix), else -1."""
    n = min(len(a), len(b))
    for i in range(n):
        same = abs(float(a[i]) - float(b[i])) <= COORD_ATOL if close else a[i] == b[i]
        if not same:
            return i
    return -1 if len(a) == len(b) else n


def _item(seq, i):
    """seq[i] as a plain str/float for messages, or '(missing)' past the end."""
    if i >= len(seq):
        return "(missing)"
    return seq[i] if isinstance(seq[i], str) else float(seq[i])


def _open_meta(path: str, index: int) -> tuple[h5py.File, dict]:
    """Open one file and check its own layout; returns the handle and its metadata."""
    try:
        fh = h5py.File(path, "r")
    except OSError as e:  # missing, unreadable, or not HDF5
        raise DataError(f"{path}: cannot open as HDF5 (file index {index}): {e}") from None
    try:
        for key in REQUIRED:
            if key not in fh:
                raise DataError(f"{path}: dataset '{key}' is missing (file index {index}); "
                                f"a data file needs datasets {', '.join(REQUIRED)}")
        fields = fh["fields"]
        if fields.ndim != 4:
            raise DataError(f"{path}: dataset 'fields' has shape {fields.shape} (index: all axes); "
                            f"expected 4-D [time, channel, lat, lon]")
        meta = {"channel": _decode(fh["channel"][()].reshape(-1)),
                "lat": np.asarray(fh["lat"][()], dtype=np.float64).reshape(-1),  # [H]
                "lon": np.asarray(fh["lon"][()], dtype=np.float64).reshape(-1),  # [W]
                "n_time": int(fields.shape[0]),
                "dhours": float(fh.attrs["dhours"]) if "dhours" in fh.attrs else None}
        for axis, key in ((1, "channel"), (2, "lat"), (3, "lon")):
            if fields.shape[axis] != len(meta[key]):
                raise DataError(f"{path}: dataset 'fields' axis {axis} (index {axis}) has length "
                                f"{fields.shape[axis]} but dataset '{key}' has {len(meta[key])} entries")
        return fh, meta
    except BaseException:
        fh.close()
        raise


def _check_same(first: str, meta0: dict, path: str, meta: dict) -> None:
    """Channel names, lat and lon of `path` must equal those of the first file."""
    for key in ("channel", "lat", "lon"):
        i = _first_difference(meta0[key], meta[key], close=key != "channel")
        if i >= 0:
            mine = _item(meta[key], i)
            theirs = _item(meta0[key], i)
            raise DataError(f"{path}: dataset '{key}' index {i} is {mine!r}, but {first} has {theirs!r} "
                            f"(all files must share channels and grid)")
    if meta["dhours"] != meta0["dhours"]:
        raise DataError(f"{path}: attribute 'dhours' (index -) is {meta['dhours']}, "
                        f"but {first} has {meta0['dhours']}")


def _split_channels(path: str, names: list[str], static) -> tuple[list[str], list[str]]:
    """(prognostic in file order, static in the given order), validated against `names`."""
    static = [str(s) for s in static]
    dup = [i for i, n in enumerate(names) if n in names[:i]]
    if dup:
        raise DataError(f"{path}: dataset 'channel' index {dup[0]} repeats the name {names[dup[0]]!r}")
    for k, s in enumerate(static):
        if s not in names:
            raise DataError(f"{path}: dataset 'channel' has no channel {s!r} (static index {k}); "
                            f"available: {', '.join(names)}")
        if s in static[:k]:
            raise DataError(f"{path}: dataset 'channel': static channel {s!r} is given twice "
                            f"(static index {static.index(s)} and {k})")
    prognostic = [n for n in names if n not in static]
    if not prognostic:
        raise DataError(f"{path}: dataset 'channel' indices 0..{len(names) - 1} are all static "
                        f"({', '.join(names)}); at least one prognostic channel is needed")
    return prognostic, static


def _runs(file_ch: np.ndarray) -> list[tuple[int, int]]:
    """[(start, stop)] positions of maximal runs where file_ch steps by +1 (order kept)."""
    cuts = np.flatnonzero(np.diff(file_ch) != 1) + 1
    bounds = np.concatenate([[0], cuts, [file_ch.size]]).astype(int)
    return list(zip(bounds[:-1], bounds[1:]))


class Era5Source(SourceBase):
    """One or more HDF5 files in the FourCastNet/Makani layout of SPEC.md, one time series per file
    (samples never cross a file boundary)."""

    def __init__(self, paths, static=(), stats=None):
        """Open and validate every file before any compute (see the module docstring)."""
        if isinstance(static, str):
            static = [static]
        self.paths = _as_paths(paths)
        self._files: list[h5py.File] = []
        try:
            metas = []
            for i, p in enumerate(self.paths):
                fh, meta = _open_meta(p, i)
                self._files.append(fh)
                if metas:
                    _check_same(self.paths[0], metas[0], p, meta)
                metas.append(meta)
            self._init_meta(metas, static, stats)
        except BaseException:
            self.close()
            raise

    def _init_meta(self, metas, static, stats) -> None:
        """Set the public metadata and the model->file channel map."""
        m0 = metas[0]
        self.n_time = [m["n_time"] for m in metas]
        if max(self.n_time) < 2:
            raise DataError(f"{', '.join(self.paths)}: dataset 'fields' axis 0 (time index): every file "
                            f"has fewer than 2 time steps (n_time = {self.n_time})")
        self.prognostic, self.static = _split_channels(self.paths[0], m0["channel"], static)
        self.file_channels = list(m0["channel"])
        self.lat, self.lon, self.dhours = m0["lat"], m0["lon"], m0["dhours"]
        self._fields = [fh["fields"] for fh in self._files]
        self._init_channels(stats)
        # model channel index -> file channel index, [C]
        self._file_ch = np.array([self.file_channels.index(n) for n in self.channels], dtype=np.int64)

    def _read_raw(self, f, t, chans, r0, r1) -> np.ndarray:
        """float32 [len(chans), r1 - r0, W]: one hyperslab per contiguous run of file channels."""
        fc = self._file_ch[chans]  # [k] file channel indices, caller's order
        out = np.empty((fc.size, r1 - r0, self.n_lon), dtype=np.float32)  # [k, r, W]
        for a, b in _runs(fc):
            c0, c1 = int(fc[a]), int(fc[b - 1]) + 1
            out[a:b] = self._fields[f][t, c0:c1, r0:r1, :]
        self._check_finite(out, f, t, fc, f"rows {r0}:{r1}")
        return out

    def _check_finite(self, x, f, t, fc, where) -> None:
        """DataError naming file, 'fields', t and the channel if x [k, ...] holds NaN or inf."""
        ok = np.isfinite(x).reshape(x.shape[0], -1).all(axis=1)  # [k]
        if not ok.all():
            k = int(np.flatnonzero(~ok)[0])
            c = int(fc[k])
            raise DataError(f"{self.paths[f]}: dataset 'fields' has NaN or inf at time index {t}, "
                            f"channel {self.file_channels[c]!r} (channel index {c}), {where}")

    def raw_steps(self, part: int = 0, parts: int = 1):
        """Yield (file index, t, float32 [C, H, W]) physical fields in model order, one step at
        a time: the steps whose running index over all files is `part` modulo `parts`."""
        index = -1
        for f, ds in enumerate(self._fields):
            for t in range(self.n_time[f]):
                index += 1
                if index % parts != part:
                    continue
                x = np.asarray(ds[t], dtype=np.float32)[self._file_ch]  # [C, H, W]
                self._check_finite(x, f, t, self._file_ch, "all rows")
                yield f, t, x

    def close(self) -> None:
        """Close every file (idempotent)."""
        for fh in getattr(self, "_files", []):
            try:
                fh.close()
            except Exception:
                pass
        self._files = []
        self._fields = []


# ---- statistics ---------------------------------------------------------------------------------------

def compute_stats(source) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) float64 [C] in model channel order, over all times, files and pixels."""
    return merge_stats(*partial_stats(source))


def partial_stats(source, part: int = 0, parts: int = 1):
    """(n, mean [C], m2 [C]) over the time steps `part` mod `parts` of `source`: the count of
    values per channel, their mean and sum of squared deviations (population), float64.

    Streams `source.raw_steps()` one time step at a time; Chan's update merges each step's
    per-channel mean and sum of squared deviations into the running totals.
    """
    n, c = 0, len(source.channels)
    mean, m2 = np.zeros(c), np.zeros(c)
    for _, _, x in source.raw_steps(part, parts):
        x = x.astype(np.float64).reshape(x.shape[0], -1)  # [C, H*W]
        nb = x.shape[1]
        mb = x.mean(axis=1)  # [C]
        m2b = ((x - mb[:, None]) ** 2).sum(axis=1)  # [C]
        delta = mb - mean  # [C]
        tot = n + nb
        mean = mean + delta * (nb / tot)
        m2 = m2 + m2b + delta ** 2 * (n * nb / tot)
        n = tot
    return n, mean, m2


def merge_stats(n, mean, m2, allreduce=lambda a: a):
    """(mean, std) of the union of partial statistics held by several processes: `allreduce`
    sums an array over them (the identity for one process). Population std.

        N = sum n_i,  mean = sum n_i mean_i / N,  M2 = sum (m2_i + n_i (mean_i - mean)^2)
    """
    total = float(allreduce(np.array([n], dtype=np.float64))[0])
    if total == 0:
        raise DataError("compute_stats: the source has no time steps (dataset 'fields', index 0)")
    grand = allreduce(n * mean) / total  # [C]
    m2_all = allreduce(m2 + n * (mean - grand) ** 2)  # [C]
    return grand, np.sqrt(m2_all / total)


def stats_path_for(data_path) -> str:
    """'<data_path>.stats.h5', beside the data (for a list of files, beside the first one)."""
    if not isinstance(data_path, (str, os.PathLike)):
        data_path = list(data_path)[0]
    return f"{os.fspath(data_path)}.stats.h5"


def save_stats(path, channels, mean, std) -> None:
    """Write datasets `channel` (bytes), `mean`, `std` to HDF5 `path`, atomically (tmp + os.replace)."""
    path = os.fspath(path)
    mean = np.asarray(mean, dtype=np.float64)  # [C]
    std = np.asarray(std, dtype=np.float64)  # [C]
    names = np.array([str(c).encode("utf-8") for c in channels], dtype=np.bytes_)  # [C]
    if mean.shape != names.shape or std.shape != names.shape:
        raise ValueError(f"save_stats: mean {mean.shape} and std {std.shape} must match "
                         f"{len(names)} channels")
    with atomic_h5(path) as fh:
        fh.create_dataset("channel", data=names)
        fh.create_dataset("mean", data=mean)
        fh.create_dataset("std", data=std)


def load_stats(path, channels) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) float64 [C] from `path`; DataError unless its channel names equal `channels`."""
    path = os.fspath(path)
    channels = [str(c) for c in channels]
    with h5py.File(path, "r") as fh:
        for key in ("channel", "mean", "std"):
            if key not in fh:
                raise DataError(f"{path}: dataset '{key}' is missing (index -); a stats file needs "
                                f"channel, mean, std")
        names = _decode(fh["channel"][()].reshape(-1))
        mean = np.asarray(fh["mean"][()], dtype=np.float64)  # [C]
        std = np.asarray(fh["std"][()], dtype=np.float64)  # [C]
    i = _first_difference(names, channels)
    if i >= 0:
        have, want = _item(names, i), _item(channels, i)
        raise DataError(f"{path}: dataset 'channel' index {i} is {have!r}, expected {want!r} "
                        f"(stats channels {names} vs data channels {channels})")
    for key, a in (("mean", mean), ("std", std)):
        if a.shape != (len(names),):
            raise DataError(f"{path}: dataset '{key}' has shape {a.shape} (index 0), "
                            f"expected ({len(names)},)")
    return mean, std
