"""`weathermixer gradcheck` and the shared model-size options (weathermixer/cli/options.py)."""
from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

import weathermixer as wm
from weathermixer.cli.gradcheck import gradcheck
from weathermixer.cli.main import cli
from weathermixer.cli.options import config_from_options
from weathermixer.mixer import model as model_module

SMALL = ["--n-lat", "4", "--n-lon", "6", "--n-prognostic", "2", "--n-static", "1",
         "--patch-lat", "2", "--patch-lon", "3", "--embed-dim", "3", "--token-hidden-dim", "5",
         "--channel-hidden-dim", "4", "--blocks", "1"]


def _run(args, command=gradcheck):
    return CliRunner().invoke(command, args, catch_exceptions=False)


def test_gradcheck_passes_and_prints_a_table():
    result = _run(SMALL + ["--rollout", "2"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.split()[:4] == ["layer", "params", "max", "rel"] for line in lines)
    for layer in ("encoder", "blocks/0/token_mixing/fc1", "decoder/recovery", "head/linear",
                  "(all parameters)"):
        row = next(line for line in lines if line.startswith(layer + " "))
        assert row.split()[-1] == "ok", row
    assert "FAIL" not in result.output
    n_params = wm.Config(n_lat=4, n_lon=6, n_prognostic=2, n_static=1, patch_lat=2, patch_lon=3,
                         embed_dim=3, token_hidden_dim=5, channel_hidden_dim=4,
                         n_blocks=1).n_params()
    joint = next(line for line in lines if line.startswith("(all parameters)"))
    assert int(joint.split()[2]) == n_params


def test_gradcheck_defaults_through_the_main_group():
    result = _run(["gradcheck"], command=cli)
    assert result.exit_code == 0, result.output
    assert "blocks/1/channel_mixing/fc2" in result.output  # default: 2 blocks


def test_zero_tolerance_fails():
    result = _run(SMALL + ["--rollout", "1", "--tol", "0"])
    assert result.exit_code != 0
    assert "FAIL" in result.output and "exceed tol" in result.output


def test_wrong_backward_fails(monkeypatch):
    """A GELU backward off by 1 % must be caught, in the layers upstream of a GELU only."""
    right = model_module.gelu_backward
    monkeypatch.setattr(model_module, "gelu_backward", lambda dy, u: 1.01 * right(dy, u))
    result = _run(SMALL + ["--rollout", "1"])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    status = {line.split()[0]: line.split()[-1] for line in lines
              if line.startswith(("encoder ", "blocks/", "head/"))}
    assert status["blocks/0/token_mixing/fc1"] == "FAIL"
    assert status["head/linear"] == "ok"  # downstream of every GELU: unaffected


def test_toml_config_and_flag_precedence(tmp_path):
    path = tmp_path / "model.toml"
    path.write_text("n_lat = 4\nn_lon = 6\nn_prognostic = 2\nn_static = 0\npatch_lat = 2\n"
                    "patch_lon = 3\nembed_dim = 3\ntoken_hidden_dim = 5\n"
                    "channel_hidden_dim = 4\nn_blocks = 1\n")
    result = _run(["--config", str(path), "--embed-dim", "4", "--rollout", "1"])
    assert result.exit_code == 0, result.output
    assert '"embed_dim": 4' in result.output and '"n_static": 0' in result.output


def test_config_from_options_precedence(tmp_path):
    defaults = dict(n_lat=6, n_lon=8, n_prognostic=3, n_static=1, patch_lat=2, patch_lon=2,
                    embed_dim=5, token_hidden_dim=7, channel_hidden_dim=9, n_blocks=2)
    none = {k: None for k in defaults}
    assert config_from_options(defaults, **none) == wm.Config(**defaults)
    path = tmp_path / "c.toml"
    path.write_text("embed_dim = 11\nn_blocks = 3\n")
    cfg = config_from_options(defaults, config=str(path), **{**none, "n_blocks": 4})
    assert (cfg.embed_dim, cfg.n_blocks, cfg.n_lat) == (11, 4, 6)  # TOML, flag, default
    with pytest.raises(click.UsageError, match="--n-lat"):
        config_from_options({k: v for k, v in defaults.items() if k != "n_lat"}, **none)
    with pytest.raises(TypeError):
        config_from_options(defaults, rollout=2)


@pytest.mark.parametrize("text, message", [
    ("embd_dim = 3\n", "unknown keys"),
    ("n_lat = [\n", "not valid TOML"),
])
def test_bad_toml_is_a_usage_error(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = _run(["--config", str(path)])
    assert result.exit_code == 2
    assert message in result.output


@pytest.mark.parametrize("args, message", [
    (["--n-lat", "5"], "not divisible"),
    (["--embed-dim", "0"], "embed_dim must be >= 1"),
])
def test_invalid_sizes_are_usage_errors(args, message):
    result = _run(args)
    assert result.exit_code == 2
    assert message in result.output
