"""`weathermixer bench` (being written)."""
import click


@click.command()
def bench():
    """Not yet implemented."""
    raise click.ClickException("bench is not implemented yet")
