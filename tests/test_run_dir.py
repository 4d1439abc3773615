"""The run folder: a fresh start never replaces a previous run, one training at a time, stale
checkpoint temporaries of killed trainings are removed."""

import json
import socket
import subprocess
import sys

import pytest
from test_train import tiny_config

from kepler.cli import main
from kepler.io.config import load_config
from kepler.train.run_dir import LOCK_NAME, RunDirError
from kepler.train.trainer import train


def _dead_pid() -> int:
    """The PID of a process that has exited (and was reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _train_argv(config, run_dir, *extra) -> list[str]:
    return ["train", str(config), f"run_dir={run_dir}", "train.max_steps=2", *extra]


def test_fresh_start_over_a_previous_run_is_refused_and_overwrite_starts_over(tmp_path, capsys):
    config, run = tiny_config(tmp_path), tmp_path / "run"
    assert main(_train_argv(config, run)) == 0
    checkpoint = (run / "checkpoints" / "last.pt").read_bytes()
    log_lines = (run / "log.jsonl").read_text().splitlines()
    capsys.readouterr()

    assert main(_train_argv(config, run, "train.max_steps=4")) == 2
    err = capsys.readouterr().err
    assert err.startswith("kepler train: error: run folder") and "--resume" in err and "--overwrite" in err
    assert (run / "checkpoints" / "last.pt").read_bytes() == checkpoint  # nothing replaced
    assert (run / "log.jsonl").read_text().splitlines() == log_lines  # nothing appended

    assert main(_train_argv(config, run, "--resume", "--overwrite")) == 2
    assert "exclude each other" in capsys.readouterr().err

    assert main(_train_argv(config, run, "train.max_steps=4", "--overwrite")) == 0
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["event"] == "train"]
    assert train_steps == sorted(train_steps) and train_steps[0] == 1  # the old run's log is gone
    assert not (run / LOCK_NAME).exists()  # released at the end


def test_a_run_folder_held_by_a_live_training_is_refused(tmp_path):
    config, run = tiny_config(tmp_path), tmp_path / "run"
    run.mkdir()
    # A live holder on this host: a process that outlives the attempt.
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / LOCK_NAME).write_text(f"{holder.pid} {socket.gethostname()}\n")
        with pytest.raises(RunDirError, match=f"in use by another training \\(process {holder.pid}"):
            train(load_config(config, [f"run_dir={run}"]))
        assert not (run / "log.jsonl").exists() and not (run / "checkpoints").exists()
        assert (run / LOCK_NAME).read_text().split()[0] == str(holder.pid)  # not taken over
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_replaced(tmp_path, caplog):
    config, run = tiny_config(tmp_path, steps=2), tmp_path / "run"
    run.mkdir()
    dead = _dead_pid()
    (run / LOCK_NAME).write_text(f"{dead} {socket.gethostname()}\n")
    with caplog.at_level("WARNING", logger="kepler"):
        metrics = train(load_config(config, [f"run_dir={run}"]))
    assert metrics["step"] == 2
    assert f"stale lock {run / LOCK_NAME} of process {dead}" in caplog.text
    assert not (run / LOCK_NAME).exists()


def test_stale_checkpoint_temporaries_are_removed_at_the_next_start(tmp_path):
    config, run = tiny_config(tmp_path, steps=2), tmp_path / "run"
    checkpoints = run / "checkpoints"
    checkpoints.mkdir(parents=True)
    stale = checkpoints / f".last.pt.tmp{_dead_pid()}"
    stale.write_bytes(b"half a checkpoint")
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = checkpoints / f".last.pt.tmp{writer.pid}"  # a live process's save in progress: kept
        live.write_bytes(b"being written")
        train(load_config(config, [f"run_dir={run}"]))
        assert not stale.exists() and live.exists()
    finally:
        writer.kill()
        writer.wait()
    assert (checkpoints / "last.pt").is_file()


def test_an_unusable_run_folder_is_a_one_line_error(tmp_path, capsys):
    config = tiny_config(tmp_path)
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    assert main(_train_argv(config, not_a_folder / "run")) == 2
    assert capsys.readouterr().err.startswith(f"kepler train: error: cannot create the run folder {not_a_folder / 'run'}")
