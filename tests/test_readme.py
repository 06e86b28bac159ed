"""The README stays true: its Python example runs as written, and its two commands are the
ones .ci/run and a new user run."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_python_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (code,) = re.findall(r"```python\n(.*?)```", README, re.S)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["y"].shape == (2, 3, 8, 12) and (tmp_path / "model.h5").exists()
    assert set(scope["grads"]) == set(scope["params"])


def test_the_two_commands_are_marked():
    for marker in ("main-command", "test-command"):
        block = re.search(rf"<!-- {marker} -->\n```\n(.+?)\n```\n<!-- /{marker} -->", README, re.S)
        assert block and block.group(1).startswith("pip install -e ")
    assert "<!-- test-command -->" in (ROOT / ".ci" / "run").read_text()
