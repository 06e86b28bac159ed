"""Errors of a job's request (sizes, layout, launch, data metadata)."""
import click


class JobConfigError(click.UsageError):
    """A bad request, found identically on every rank before any collective (it depends only
    on the command line and the data's metadata): rank 0 prints it, every rank exits with
    status 2, and no rank is left waiting."""
