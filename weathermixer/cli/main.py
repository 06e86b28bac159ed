"""`weathermixer` command line: train, evaluate, gradcheck, bench.

Under MPI an uncaught exception on any rank must not leave the others waiting in a
collective: `main` prints the traceback with the rank and calls MPI_Abort on COMM_WORLD, as
`python -m mpi4py` does, so the whole job stops with a non-zero exit.
"""
from __future__ import annotations

import os
import sys
import traceback

import click

from weathermixer.autograd.xp import tune_host_allocator

from weathermixer.cli.bench import bench
from weathermixer.cli.evaluate import evaluate
from weathermixer.cli.gradcheck import gradcheck
from weathermixer.cli.train import train

_MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "SLURM_NTASKS",
            "HYDRA_CONTROL_FD")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="weathermixer")
def cli():
    """Framework-free WeatherMixer with exact Jigsaw model parallelism."""


cli.add_command(train)
cli.add_command(gradcheck)
cli.add_command(bench)
cli.add_command(evaluate)


def under_mpi() -> bool:
    """True when a launcher (mpiexec, srun) started this process."""
    return any(k in os.environ for k in _MPI_ENV)


def _world_rank() -> int:
    if not under_mpi():
        return 0
    from mpi4py import MPI
    return MPI.COMM_WORLD.Get_rank()


def main(argv=None):
    """Console-script entry point: run the click group, aborting the MPI job on any error."""
    tune_host_allocator()
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.UsageError as e:
        # a bad request depends only on argv and the data's metadata, so every rank raised
        # the same error before any collective: rank 0 speaks and every rank exits
        if _world_rank() == 0:
            e.show()
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        _abort_or_exit(e.exit_code)
    except SystemExit as e:
        if e.code not in (0, None):
            _abort_or_exit(e.code if isinstance(e.code, int) else 1)
        raise
    except BaseException:
        traceback.print_exc()
        _abort_or_exit(1)


def _abort_or_exit(code: int):
    """Exit; under MPI with several ranks, abort every rank of the job."""
    sys.stderr.flush()
    sys.stdout.flush()
    if under_mpi():
        from mpi4py import MPI
        if MPI.Is_initialized() and not MPI.Is_finalized() and MPI.COMM_WORLD.Get_size() > 1:
            MPI.COMM_WORLD.Abort(code)
    sys.exit(code)
