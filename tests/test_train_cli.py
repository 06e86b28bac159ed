"""`weathermixer train` end to end: learning, resuming, layouts, validation, failure.

The multi-rank runs use the launcher of tests/test_mpi.py (mpiexec with a wall-clock limit).
"""
import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

import weathermixer as wm
from tests.test_mpi import ROOT, mpiexec_command, run_under_mpi

ODD = ["--n-lat", "10", "--patch-lat", "2", "--n-lon", "12", "--patch-lon", "4",
       "--n-prognostic", "5", "--n-static", "2", "--embed-dim", "13", "--token-hidden-dim", "7",
       "--channel-hidden-dim", "9", "--blocks", "2"]
EXACT = ODD + ["--dtype", "float64", "--rollout", "3", "--clip", "0.02", "--batch", "4",
               "--lr", "3e-3", "--synthetic-steps", "24", "--log-every", "1"]


def train_cli(args, n=1, limit=240):
    """Run `weathermixer train ARGS` on n ranks (through `python -m weathermixer`)."""
    if n == 1:
        cmd = [sys.executable, "-m", "weathermixer", "train"] + args
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
    return run_under_mpi(n, ["-m", "weathermixer", "train"] + args, limit=limit)


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def max_relative_difference(a_path, b_path) -> float:
    a, _ = wm.load_checkpoint(a_path)
    b, _ = wm.load_checkpoint(b_path)
    return max(np.abs(a[k] - b[k]).max() / np.abs(a[k]).max() for k in a)


def test_default_job_learns_the_synthetic_task(tmp_path):
    proc = ok(train_cli(["--steps", "80", "--out", str(tmp_path)]))
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "metrics.jsonl")]
    assert len(losses) == 80
    assert np.mean(losses[-10:]) < 0.35 * np.mean(losses[:5]), losses
    assert "samples/s" in proc.stdout and (tmp_path / "last.h5").exists()


def test_resume_continues_exactly(tmp_path):
    ok(train_cli(EXACT + ["--steps", "5", "--out", str(tmp_path / "straight")]))
    ok(train_cli(EXACT + ["--steps", "3", "--out", str(tmp_path / "first")]))
    ok(train_cli(EXACT + ["--steps", "5", "--out", str(tmp_path / "second"),
                          "--resume", str(tmp_path / "first" / "last.h5")]))
    assert max_relative_difference(tmp_path / "straight" / "last.h5",
                                   tmp_path / "second" / "last.h5") < 1e-12


@pytest.mark.parametrize("n,jigsaw", [(2, "2"), (4, "4"), (8, "4"), (2, "1"), (4, "1x4")])
def test_layouts_end_with_the_same_parameters(tmp_path_factory, n, jigsaw):
    """Three AdamW steps with clipping and rollout: every layout ends where 1 rank ends."""
    base = tmp_path_factory.getbasetemp() / "one-rank"
    if not (base / "last.h5").exists():
        ok(train_cli(EXACT + ["--steps", "3", "--out", str(base)]))
    out = tmp_path_factory.mktemp(f"n{n}-j{jigsaw}")
    layout = ["--grid", jigsaw] if "x" in jigsaw else ["--jigsaw", jigsaw]
    ok(train_cli(EXACT + layout + ["--steps", "3", "--out", str(out)], n=n))
    assert max_relative_difference(base / "last.h5", out / "last.h5") < 1e-9


def test_checkpoint_of_one_layout_resumes_in_another(tmp_path):
    """4-way for 2 steps, then 2-way x 2 replicas for 2 more == 1 rank for 4 steps."""
    ok(train_cli(EXACT + ["--steps", "4", "--out", str(tmp_path / "serial")]))
    ok(train_cli(EXACT + ["--jigsaw", "4", "--steps", "2", "--out", str(tmp_path / "a")], n=4))
    ok(train_cli(EXACT + ["--jigsaw", "2", "--steps", "4", "--out", str(tmp_path / "b"),
                          "--resume", str(tmp_path / "a" / "last.h5")], n=4))
    assert max_relative_difference(tmp_path / "serial" / "last.h5",
                                   tmp_path / "b" / "last.h5") < 1e-9


def optimizer_states(path) -> dict:
    with h5py.File(path, "r") as f:
        return {f"{s}/{name}": f["optimizer"][s][name][...]
                for s in ("m", "v") for name in wm.load_checkpoint(path)[0]}


def test_each_step_on_the_host_is_timed_by_its_own_work(tmp_path, monkeypatch):
    """With one step in flight, a host step's work is done when it is queued, so each record's
    seconds must cover its own step: every step is made 0.05 s longer, the last one too (whose
    seconds once covered only the read-back after the step before, about 0)."""
    import time
    from weathermixer.io.synthetic import SyntheticSource
    from weathermixer.mixer import train as training
    from weathermixer.mixer.api import serial_layout
    cfg = wm.Config(n_lat=10, n_lon=12, n_prognostic=5, n_static=2, patch_lat=2, patch_lon=4,
                    embed_dim=13, token_hidden_dim=7, channel_hidden_dim=9, n_blocks=2)
    real = training.loss_array_and_grads

    def slow(*args, **kwargs):
        time.sleep(0.05)
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "loss_array_and_grads", slow)
    source = SyntheticSource(cfg.n_lat, cfg.n_lon, cfg.n_prognostic, cfg.n_static, n_time=24,
                             seed=0)
    settings = training.TrainSettings(steps=4, batch=2, checkpoint_every=2, log_every=100,
                                      out_dir=str(tmp_path))
    history = training.train(cfg, serial_layout(cfg), source, settings)
    assert [r["step"] for r in history] == [1, 2, 3, 4]
    assert all(r["seconds"] >= 0.05 for r in history), [r["seconds"] for r in history]


def test_a_checkpoint_between_steps_holds_its_step_not_the_one_in_flight(tmp_path, monkeypatch):
    """The loop queues step n + 1 before it reads step n back; a checkpoint due after step 2
    of 3 must still hold what a run of 2 steps ends with (parameters, moments, step count)."""
    from weathermixer.io.synthetic import SyntheticSource
    from weathermixer.mixer import state, train as training
    from weathermixer.mixer.api import serial_layout
    cfg = wm.Config(n_lat=10, n_lon=12, n_prognostic=5, n_static=2, patch_lat=2, patch_lon=4,
                    embed_dim=13, token_hidden_dim=7, channel_hidden_dim=9, n_blocks=2)
    saved, save = {}, state.save

    def save_and_keep(path, params, cfg_, layout, optimizer=None, step=0, extra=None):
        save(path, params, cfg_, layout, optimizer, step, extra)
        saved.setdefault(step, (wm.load_checkpoint(path)[0], optimizer_states(path)))

    monkeypatch.setattr(state, "save", save_and_keep)
    for steps, every in ((3, 2), (2, 0)):
        source = SyntheticSource(cfg.n_lat, cfg.n_lon, cfg.n_prognostic, cfg.n_static,
                                 n_time=24, seed=0)
        settings = training.TrainSettings(steps=steps, batch=2, lr=3e-3, dtype="float64",
                                          checkpoint_every=every, log_every=100,
                                          out_dir=str(tmp_path / f"{steps}-{every}"))
        history = training.train(cfg, serial_layout(cfg), source, settings)
        assert [r["step"] for r in history] == list(range(1, steps + 1))
    two = wm.load_checkpoint(tmp_path / "2-0" / "last.h5")[0]
    params, moments = saved[2]
    assert sorted(params) == sorted(two)
    assert all(np.array_equal(params[k], two[k]) for k in two)
    assert all(np.array_equal(v, optimizer_states(tmp_path / "2-0" / "last.h5")[k])
               for k, v in moments.items())
    assert not all(np.array_equal(params[k], saved[3][0][k]) for k in two)  # step 3 moved on


def test_optimizer_state_cut_over_replicas_saves_and_resumes_whole(tmp_path):
    """4 replicas (each updating a quarter of every block, odd sizes: uneven quarters) write
    the moments 1 rank writes; 1 rank resumes from them as if it had run all along."""
    ok(train_cli(EXACT + ["--steps", "2", "--out", str(tmp_path / "two")]))
    ok(train_cli(EXACT + ["--steps", "4", "--out", str(tmp_path / "four")]))
    ok(train_cli(EXACT + ["--jigsaw", "1", "--steps", "2", "--out", str(tmp_path / "dp")], n=4))
    want, got = optimizer_states(tmp_path / "two" / "last.h5"), optimizer_states(
        tmp_path / "dp" / "last.h5")
    assert sorted(got) == sorted(want)
    scale = {s: max(np.abs(w).max() for k, w in want.items() if k.startswith(s)) for s in "mv"}
    for k in want:  # relative to the state's largest element (some gradients are ~1e-20)
        assert np.abs(got[k] - want[k]).max() <= 1e-9 * scale[k[0]], k
    ok(train_cli(EXACT + ["--steps", "4", "--out", str(tmp_path / "resumed"),
                          "--resume", str(tmp_path / "dp" / "last.h5")]))
    assert max_relative_difference(tmp_path / "four" / "last.h5",
                                   tmp_path / "resumed" / "last.h5") < 1e-9


@pytest.mark.parametrize("n,args,message", [
    (2, ["--jigsaw", "4"], "cannot form model groups of 4"),
    (2, ["--jigsaw", "1", "--batch", "3"], "not divisible by the 2 data-parallel replicas"),
    (2, ["--jigsaw", "2", "--replicas", "2"], "needs 4 ranks, but the launcher started 2"),
    (2, ["--jigsaw", "2", "--n-prognostic", "1"], "cannot split prognostic variables = 1"),
    (2, ["--grid", "2x1", "--n-lat", "2", "--patch-lat", "2"], "cannot split token rows"),
    (1, ["--patch-lat", "3"], "n_lat=16 is not divisible by patch_lat=3"),
])
def test_bad_requests_fail_before_any_step(tmp_path, n, args, message):
    proc = train_cli(args + ["--steps", "2", "--out", str(tmp_path)], n=n, limit=60)
    assert proc.returncode != 0
    err = proc.stderr
    assert message in err, err
    assert err.count("Error:") == 1, f"only rank 0 reports:\n{err}"
    assert "step" not in proc.stdout and not (tmp_path / "last.h5").exists()


def test_bad_data_file_is_named(tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    proc = train_cli(["--data", str(bad), "--out", str(tmp_path)], limit=60)
    assert proc.returncode != 0 and "bad.h5" in proc.stderr


def test_an_error_on_one_rank_aborts_the_job_quickly(tmp_path):
    """Rank 1 raises while rank 0 waits in a collective: the job ends, non-zero, in seconds."""
    script = tmp_path / "boom.py"
    script.write_text(
        "import click\nfrom mpi4py import MPI\nfrom weathermixer.cli import main as m\n"
        "@click.command()\ndef boom():\n"
        "    if MPI.COMM_WORLD.rank == 1:\n        raise RuntimeError('rank 1 fails')\n"
        "    MPI.COMM_WORLD.Barrier()\n"
        "m.cli.add_command(boom)\nm.main(['boom'])\n")
    cmd = mpiexec_command(2) + [sys.executable, str(script)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "rank 1 fails" in proc.stderr


def _rank_pids(marker: str) -> list[int]:
    """PIDs of the python processes whose command line contains `marker` (Linux /proc)."""
    import os
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if cmd and b"python" in os.path.basename(cmd[0]) and marker.encode() in b" ".join(cmd):
                pids.append(int(entry))
    return pids


@pytest.mark.parametrize("n", [1, 2])
def test_a_stop_signal_on_one_rank_stops_every_rank_with_a_checkpoint(tmp_path, n):
    """SIGTERM to one rank: all ranks agree to stop after the same step and save last.h5."""
    import os
    import signal
    import time
    out = tmp_path / f"signalled-{n}"
    args = ["-m", "weathermixer", "train", "--steps", "100000", "--out", str(out), "--log-every",
            "1"]
    if n == 1:
        cmd = [sys.executable] + args
    else:
        cmd = mpiexec_command(n) + [sys.executable, "-m", "mpi4py"] + args + ["--jigsaw", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or
                                      len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.2)
    pids = _rank_pids(str(out))
    assert len(pids) == n, pids
    os.kill(max(pids), signal.SIGTERM)  # one rank only (the last started)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout[-2000:] + stderr[-2000:]
    assert "stop requested" in stdout
    steps = len(metrics.read_text().splitlines())
    _, _ = wm.load_checkpoint(out / "last.h5")
    import h5py
    with h5py.File(out / "last.h5") as f:
        assert int(f.attrs["step"]) == steps < 100000


def test_resume_takes_the_model_from_the_checkpoint(tmp_path):
    ok(train_cli(EXACT + ["--steps", "2", "--out", str(tmp_path / "a")]))
    ckpt = str(tmp_path / "a" / "last.h5")
    sizes_free = EXACT[len(ODD):]  # the same run, but no size flags at all
    ok(train_cli(sizes_free + ["--steps", "3", "--out", str(tmp_path / "b"), "--resume", ckpt]))
    proc = train_cli(EXACT + ["--embed-dim", "15", "--steps", "3", "--out", str(tmp_path / "c"),
                              "--resume", ckpt], limit=60)
    assert proc.returncode != 0 and "the checkpoint holds" in proc.stderr
    assert proc.stderr.count("Error:") == 1


def test_resume_continues_the_data_stream_of_the_checkpoint(tmp_path):
    """Seed, rollout and batch come from the checkpoint unless given: the resumed run equals
    the straight one."""
    stream = ["--seed", "5", "--rollout", "2", "--batch", "2"]
    base = [a for a in EXACT]
    for flag in ("--rollout", "--batch"):  # EXACT sets these; the resumed run must not
        i = base.index(flag)
        del base[i:i + 2]
    ok(train_cli(base + stream + ["--steps", "5", "--out", str(tmp_path / "straight")]))
    ok(train_cli(base + stream + ["--steps", "2", "--out", str(tmp_path / "first")]))
    ok(train_cli(base + ["--steps", "5", "--out", str(tmp_path / "second"),
                         "--resume", str(tmp_path / "first" / "last.h5")]))
    assert max_relative_difference(tmp_path / "straight" / "last.h5",
                                   tmp_path / "second" / "last.h5") < 1e-12
