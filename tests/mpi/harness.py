"""Helpers for tests that run on several MPI ranks.

Every verdict is collective: `assert_all` takes the MIN of a flag over COMM_WORLD, so either
every rank passes a check or every rank fails it, and no rank is left waiting in a collective.
The launcher runs pytest with -x under `python -m mpi4py`, so a rank that dies some other way
aborts the whole job, and an outer wall-clock limit catches anything else.
"""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from weathermixer.jigsaw.grid import ProcessGrid

WORLD = MPI.COMM_WORLD


def assert_all(ok: bool, message: str = ""):
    """Collective assertion: fails on every rank if it fails on any."""
    flags = np.array([1 if ok else 0], dtype=np.int32)
    WORLD.Allreduce(MPI.IN_PLACE, flags, op=MPI.MIN)
    where = "" if ok else f" (failed on rank {WORLD.rank})"
    assert flags[0] == 1, message + where


def max_over_ranks(value: float) -> float:
    buf = np.array([value], dtype=np.float64)
    WORLD.Allreduce(MPI.IN_PLACE, buf, op=MPI.MAX)
    return float(buf[0])


def sum_over_ranks(value: float) -> float:
    buf = np.array([value], dtype=np.float64)
    WORLD.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    return float(buf[0])


def relative_error(a, b, floor: float = 1e-300) -> float:
    """max |a - b| / max(max |b|, floor): `floor` is the scale for arrays that are zero in
    exact arithmetic (SPEC's token_mixing/fc2 bias has a zero gradient: every consumer of
    the residual stream is a LayerNorm over E, which removes a per-token constant)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(np.abs(b).max(initial=0.0), floor)
    return float(np.abs(a - b).max(initial=0.0) / scale)


def grids_for_world(max_model: int | None = None):
    """Every (pd, pc) grid whose size divides the world size (data parallel fills the rest)."""
    n = WORLD.size
    shapes = [(pd, pc) for pd in (1, 2, 4) for pc in (1, 2, 4)
              if n % (pd * pc) == 0 and pd * pc <= (max_model or n)]
    return shapes


def make_grid(pd: int, pc: int) -> ProcessGrid:
    return ProcessGrid.from_mpi(pd, pc, WORLD)
