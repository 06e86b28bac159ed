"""Test-suite settings. The files under tests/mpi/ run only under mpiexec, started by
tests/test_mpi.py (which is collected everywhere): a plain `pytest` runs them through it."""
import os

collect_ignore_glob = [] if os.environ.get("WEATHERMIXER_UNDER_MPI") else ["mpi/*"]
