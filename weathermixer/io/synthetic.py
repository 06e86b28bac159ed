"""A deterministic, learnable stand-in for ERA5 with the interface of `Era5Source`.

Grid: H x W, lat_h = 90 - (h + 1/2) 180 / H (north to south, cell centres), lon_w = w 360 / W.
Static channel s (constant in time), from smooth random fields g_s(h, w):
    s = 0: land-sea-like mask   1[g_0 > 0]
    s = 1: orography-like       max(g_1, 0)
    s > 1: g_s
Prognostic channel c at time t, with K modes of zonal wavenumber m_k and meridional number n_k:
    x_c(t, h, w) = o_c + a_c * sum_k A_k cos(n_k phi_h + psi_k) cos(2 pi m_k (w - t) / W + theta_k + omega_k t)
                   + 0.3 * (mask(h, w) - 1/2)                     (only when S > 0)
i.e. the pattern moves east by exactly one grid column per step (np.roll along lon) while each mode's
phase drifts slowly (|omega_k| <= 0.1 rad per step); the static mask does not move, so the model must
use it. Every parameter comes from numpy's default_rng(seed). Values are O(1).

Tile reads are exact slices of the full field: a tile is built from per-row and per-column factors
(h and w enter only through precomputed vectors) with the same elementwise operations in the same
order, so no result depends on which rows are asked for.
"""
from __future__ import annotations

import numpy as np

from weathermixer.io.data import SourceBase

N_MODES = 3
MAX_DRIFT = 0.1  # rad per step: the slow phase change of each mode
MASK_COUPLING = 0.3


def _smooth_field(rng, phi, n_lon, n_modes=N_MODES) -> np.ndarray:
    """float64 [H, W]: a sum of low-order sin/cos modes, amplitude O(1)."""
    col = np.arange(n_lon, dtype=np.float64)  # [W]
    out = np.zeros((phi.size, n_lon), dtype=np.float64)  # [H, W]
    amps = rng.normal(size=n_modes)
    amps /= np.abs(amps).sum()
    for k in range(n_modes):
        n, m = rng.integers(0, 4), rng.integers(1, max(2, min(4, n_lon // 2 + 1)))
        rows = np.cos(n * phi + rng.uniform(0, 2 * np.pi))  # [H]
        cols = np.cos(2 * np.pi * m * col / n_lon + rng.uniform(0, 2 * np.pi))  # [W]
        out += amps[k] * rows[:, None] * cols[None, :]
    return out


class SyntheticSource(SourceBase):
    """Smooth fields advected east by one column per step, plus static fields; same interface as Era5Source."""

    def __init__(self, n_lat, n_lon, n_prognostic, n_static, n_time=64, seed=0):
        if min(n_lat, n_lon, n_prognostic, n_time) < 1 or n_static < 0 or n_lon < 2:
            raise ValueError(f"bad synthetic sizes: n_lat={n_lat}, n_lon={n_lon}, n_prognostic="
                             f"{n_prognostic}, n_static={n_static}, n_time={n_time}")
        self.paths = []
        self.dhours = 6.0
        self.n_time = [int(n_time)]
        self.lat = 90.0 - (np.arange(n_lat) + 0.5) * 180.0 / n_lat  # [H] degrees, north to south
        self.lon = np.arange(n_lon) * 360.0 / n_lon  # [W] degrees
        self.prognostic = [f"prog{c}" for c in range(n_prognostic)]
        self.static = [f"static{s}" for s in range(n_static)]
        rng = np.random.default_rng(seed)
        self._make_static(rng, n_static)
        self._make_modes(rng, n_prognostic)
        self._init_channels()

    def _make_static(self, rng, n_static) -> None:
        """Static fields float32 [S, H, W]: mask, orography, then smooth fields."""
        phi = np.deg2rad(self.lat)  # [H]
        fields = []
        for s in range(n_static):
            g = _smooth_field(rng, phi, self.n_lon)  # [H, W]
            if s == 0:
                g = (g > 0).astype(np.float64)
            elif s == 1:
                g = 2.0 * np.maximum(g, 0.0)
            fields.append(g)
        self._static = np.array(fields, dtype=np.float32).reshape(n_static, self.n_lat, self.n_lon)  # [S, H, W]
        # the time-constant part every prognostic channel carries, [H, W]
        self._coupling = (MASK_COUPLING * (self._static[0].astype(np.float64) - 0.5) if n_static
                          else np.zeros((self.n_lat, self.n_lon)))

    def _make_modes(self, rng, n_prognostic) -> None:
        """Per channel and mode: row factor A_k cos(n phi + psi), column factors cos/sin, drift omega."""
        phi = np.deg2rad(self.lat)  # [H]
        col = np.arange(self.n_lon, dtype=np.float64)  # [W]
        m_max = max(2, min(4, self.n_lon // 2 + 1))
        self._offset = rng.normal(0.0, 0.5, size=n_prognostic)  # [P]
        self._scale = rng.uniform(0.5, 1.5, size=n_prognostic)  # [P]
        self._rows = np.empty((n_prognostic, N_MODES, self.n_lat))  # [P, K, H]
        self._cos = np.empty((n_prognostic, N_MODES, self.n_lon))  # [P, K, W]
        self._sin = np.empty((n_prognostic, N_MODES, self.n_lon))  # [P, K, W]
        self._omega = rng.uniform(-MAX_DRIFT, MAX_DRIFT, size=(n_prognostic, N_MODES))  # [P, K]
        for c in range(n_prognostic):
            amps = rng.normal(size=N_MODES)
            amps /= np.abs(amps).sum()
            for k in range(N_MODES):
                n, m = rng.integers(0, 4), rng.integers(1, m_max)
                self._rows[c, k] = amps[k] * np.cos(n * phi + rng.uniform(0, 2 * np.pi))
                angle = 2 * np.pi * m * col / self.n_lon + rng.uniform(0, 2 * np.pi)  # [W]
                self._cos[c, k], self._sin[c, k] = np.cos(angle), np.sin(angle)

    def _prognostic(self, c, t, r0, r1) -> np.ndarray:
        """float64 [r1 - r0, W]: prognostic channel c at time t, rows r0:r1."""
        out = np.zeros((r1 - r0, self.n_lon), dtype=np.float64)  # [r, W]
        for k in range(N_MODES):
            w = self._omega[c, k] * t
            # cos(alpha_{w-t} + omega t): the pattern at column w-t, i.e. moved east by t columns
            cols = np.cos(w) * np.roll(self._cos[c, k], t) - np.sin(w) * np.roll(self._sin[c, k], t)  # [W]
            out += self._rows[c, k, r0:r1, None] * cols[None, :]
        return self._offset[c] + self._scale[c] * out + self._coupling[r0:r1]

    def _read_raw(self, f, t, chans, r0, r1) -> np.ndarray:
        """float32 [len(chans), r1 - r0, W] in physical (un-normalised) units."""
        out = np.empty((len(chans), r1 - r0, self.n_lon), dtype=np.float32)  # [k, r, W]
        for i, c in enumerate(chans):
            c = int(c)
            if c < self.n_prognostic:
                out[i] = self._prognostic(c, t, r0, r1)
            else:
                out[i] = self._static[c - self.n_prognostic, r0:r1]
        return out

    def raw_steps(self, part: int = 0, parts: int = 1):
        """Yield (0, t, float32 [C, H, W]) for the time steps t = part mod parts."""
        chans = np.arange(self.n_channels)
        for t in range(part, self.n_time[0], parts):
            yield 0, t, self._read_raw(0, t, chans, 0, self.n_lat)

    def close(self) -> None:
        """Nothing to close (kept for the Era5Source interface)."""
