"""`weathermixer train` (being written)."""
import click


@click.command()
def train():
    """Not yet implemented."""
    raise click.ClickException("train is not implemented yet")
