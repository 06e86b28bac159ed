"""Runs the multi-rank tests of tests/mpi/ under mpiexec with 1 to 8 ranks.

Each run is `mpiexec -n N python -m mpi4py -m pytest -x tests/mpi/<file>` inside a wall-clock
limit: a failing rank fails the whole run (collective verdicts, MPI_Abort on exit), and a run
that hangs is killed and reported. Where no `mpiexec` is on PATH this test fails: CI installs
one (the `mpich` extra).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CASES = [("test_ops_mpi.py", n) for n in (1, 2, 4)] + \
        [("test_kernels_mpi.py", n) for n in (1, 2, 4)] + \
        [("test_model_mpi.py", n) for n in (1, 2, 4, 8)] + \
        [("test_data_mpi.py", n) for n in (1, 2, 4)] + \
        [("test_backend_mpi.py", n) for n in (1, 2, 3)] + \
        [("test_nccl_paths_mpi.py", n) for n in (1, 2, 3)]
LIMIT_S = 300


def mpiexec_command(n: int) -> list[str]:
    exe = shutil.which("mpiexec") or shutil.which("mpirun")
    if exe is None:
        pytest.fail("no mpiexec on PATH: install MPI (pip install '.[mpich]')")
    cmd = [exe, "-n", str(n)]
    version = subprocess.run([exe, "--version"], capture_output=True, text=True)
    if any(s in version.stdout + version.stderr for s in ("Open MPI", "OpenRTE", "open-mpi")):
        cmd += ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    return cmd


def run_under_mpi(n: int, args: list[str], limit: int = LIMIT_S, env=None):
    """Run `python -m mpi4py <args>` on n ranks; returns the CompletedProcess."""
    env = dict(os.environ if env is None else env, WEATHERMIXER_UNDER_MPI="1",
               OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    cmd = mpiexec_command(n) + [sys.executable, "-m", "mpi4py"] + args
    try:
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=limit)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"{' '.join(cmd)} did not finish within {limit} s (hang?)\n{out[-4000:]}")


def pytest_mpi_flags() -> list[str]:
    """pytest-mpi (the `dev` extra) runs its marked tests only with --with-mpi."""
    import importlib.util
    return ["--with-mpi"] if importlib.util.find_spec("pytest_mpi") else []


@pytest.mark.parametrize("path,n", CASES, ids=[f"{p[:-3]}-n{n}" for p, n in CASES])
def test_under_mpi(path, n):
    proc = run_under_mpi(n, ["-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"]
                         + pytest_mpi_flags() + [f"tests/mpi/{path}"])
    assert proc.returncode == 0, (f"{path} on {n} ranks failed (exit {proc.returncode})\n"
                                  f"{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}")
