"""`weathermixer gradcheck` (being written)."""
import click


@click.command()
def gradcheck():
    """Not yet implemented."""
    raise click.ClickException("gradcheck is not implemented yet")
