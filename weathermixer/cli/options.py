"""Model-size options shared by the commands that build a model (`gradcheck`, `train`).

    @click.command()
    @model_options
    def cmd(rollout, **model):
        cfg = config_from_options(DEFAULTS, **model)

Every size flag defaults to None ("not given"), so each Config field is resolved in order:

    explicit flag  >  key of the --config TOML file  >  the command's defaults dict

The TOML file is flat, its keys are the Config field names (n_lat, n_lon, n_prognostic,
n_static, patch_lat, patch_lon, embed_dim, token_hidden_dim, channel_hidden_dim, n_blocks),
e.g. `n_lat = 720`; an unknown key is an error, so a typo cannot pass silently.
"""
from __future__ import annotations

import dataclasses
import tomllib

import click

from weathermixer.config import Config

# flag -> Config field; `--blocks` is the one flag not spelled like its field
FLAGS = {
    "--n-lat": "n_lat", "--n-lon": "n_lon", "--n-prognostic": "n_prognostic",
    "--n-static": "n_static", "--patch-lat": "patch_lat", "--patch-lon": "patch_lon",
    "--embed-dim": "embed_dim", "--token-hidden-dim": "token_hidden_dim",
    "--channel-hidden-dim": "channel_hidden_dim", "--blocks": "n_blocks",
}
HELP = {
    "n_lat": "latitudes H", "n_lon": "longitudes W", "n_prognostic": "prognostic variables P",
    "n_static": "static input fields S", "patch_lat": "patch height pl",
    "patch_lon": "patch width pw", "embed_dim": "channels per token E",
    "token_hidden_dim": "token-mixing hidden size Mt",
    "channel_hidden_dim": "channel-mixing hidden size Mc", "n_blocks": "mixer blocks N",
}
FIELDS = tuple(f.name for f in dataclasses.fields(Config))


def model_options(command):
    """Add `--config FILE.toml` and one int flag per Config field (default None) to a command.
    The command receives them as keyword arguments named like the Config fields, plus `config`."""
    for flag, field in reversed(list(FLAGS.items())):
        command = click.option(flag, field, type=int, default=None,
                               help=f"{HELP[field]} (overrides --config)")(command)
    return click.option("--config", "config", type=click.Path(exists=True, dir_okay=False),
                        default=None, help="TOML file whose keys are Config field names "
                                           "(n_lat = 720, ...); flags override it")(command)


def read_toml(path) -> dict:
    """The Config fields of a flat TOML file (click.BadParameter on unknown keys or bad TOML)."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as e:
        raise click.BadParameter(f"{path}: not valid TOML ({e})", param_hint="--config") from None
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise click.BadParameter(f"{path}: unknown keys {unknown}; the keys are the Config "
                                 f"fields {list(FIELDS)}", param_hint="--config")
    return data


def config_from_options(defaults: dict | None = None, config=None, **flags) -> Config:
    """A Config from the flags of `model_options`: flag > TOML (`config`) > `defaults`.

    `flags` are the Config fields as keyword arguments, None where not given. Raises
    click.UsageError when a field is given nowhere or the sizes are not a valid Config."""
    unknown = sorted(set(flags) - set(FIELDS))
    if unknown:
        raise TypeError(f"config_from_options got unknown options {unknown}")
    values = dict(defaults or {})
    if config is not None:
        values.update(read_toml(config))
    values.update({k: v for k, v in flags.items() if v is not None})
    missing = [f for f in FIELDS if f not in values]
    if missing:
        hints = ", ".join(f"{_flag(f)}" for f in missing)
        raise click.UsageError(f"model size not given: {hints} (as flags or in --config)")
    try:
        return Config(**{f: values[f] for f in FIELDS})
    except (TypeError, ValueError) as e:
        raise click.UsageError(f"invalid model size: {e}") from None


def _flag(field: str) -> str:
    return next(flag for flag, f in FLAGS.items() if f == field)
