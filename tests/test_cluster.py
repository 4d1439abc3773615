"""Training past one process, as a cluster runs it: preemption signals under torchrun, a rank that
dies or hangs, and two node ranks of torchrun on this machine (gloo, CPU)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_quantizer_ddp import free_port
from test_train import DRAWING_OPTIONS, _flat_state, tiny_config

from kepler.io.checkpoint import load_checkpoint

# One thread a process: the ranks share two busy cores.
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
TIMEOUT_S = 240


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def worker_pids(launcher: subprocess.Popen, count: int) -> dict[int, int]:
    """Global rank -> PID of the ``count`` worker processes torchrun ``launcher`` started."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        workers = {}
        for entry in Path("/proc").iterdir():
            try:
                status = (entry / "status").read_text()
                environ = (entry / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError):  # not a process, or it is gone
                continue
            if f"PPid:\t{launcher.pid}\n" in status:
                rank = next(int(v[5:]) for v in environ if v.startswith(b"RANK="))
                workers[rank] = int(entry.name)
        if len(workers) == count:
            return workers
        time.sleep(0.2)
    raise AssertionError(f"torchrun did not start {count} workers")


def wait_for_steps(log: Path, steps: int, procs: list[subprocess.Popen]) -> None:
    """Until rank 0 has logged ``steps`` training records."""
    deadline = time.monotonic() + TIMEOUT_S
    while not (log.is_file() and log.read_text().count('"event": "train"') >= steps):
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"training exited early ({proc.returncode}): {proc.stderr.read()[-4000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for training to start")
        time.sleep(0.2)


def finish(proc: subprocess.Popen, timeout: float = TIMEOUT_S) -> str:
    """``proc``'s stderr once it exits (killed if it runs past ``timeout``)."""
    try:
        return proc.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


# Steps of the preemption test's runs: the signal lands after step 2, well before the end.
PREEMPTED_RUN_STEPS = 24


@pytest.mark.slow
def test_preemption_under_torchrun_saves_once_exits_0_and_resumes_exactly(tmp_path):
    """SIGTERM to rank 0 and SIGUSR1 to rank 1 (a scheduler's two warnings) mid-run: both ranks stop
    at one step, rank 0 writes one checkpoint, both exit 0 (torchrun exits 0 only when every worker
    does), and the resumed run ends bit for bit where an uninterrupted run does."""
    config = tiny_config(tmp_path, steps=PREEMPTED_RUN_STEPS, disc_start=1)
    common = [str(config), "device=cpu", "train.eval_every=100000", "train.ckpt_every=100000", *DRAWING_OPTIONS]

    def launch(run: Path, *extra: str) -> subprocess.Popen:
        return subprocess.Popen(torchrun("--standalone", "--nproc_per_node", "2", "-m", "kepler", "train", *common,
                                         f"run_dir={run}", *extra),
                                cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    half, full = tmp_path / "half", tmp_path / "full"
    stopped, uninterrupted = launch(half), launch(full)  # side by side: the test's time is mostly start-up
    workers = worker_pids(stopped, 2)
    wait_for_steps(half / "log.jsonl", 2, [stopped])
    os.kill(workers[0], signal.SIGTERM)
    os.kill(workers[1], signal.SIGUSR1)
    stderr = finish(stopped)
    assert stopped.returncode == 0, stderr[-4000:]
    state = load_checkpoint(half / "checkpoints" / "last.pt")
    stop = state["step"]
    assert 2 <= stop < PREEMPTED_RUN_STEPS and state["world_size"] == 2 and len(state["rng"]) == 2
    assert [p.name for p in (half / "checkpoints").iterdir()] == ["last.pt"]
    records = [json.loads(line) for line in (half / "log.jsonl").read_text().splitlines()]
    assert records[-1] == {"event": "interrupted", "step": stop}
    assert sum(r["event"] == "interrupted" for r in records) == 1
    line = (f"kepler train: stopped by SIGTERM at step {stop}; checkpoint {half / 'checkpoints' / 'last.pt'}; "
            "continue with --resume\n")
    assert stderr.count(line) == 1 and "Traceback" not in stderr, stderr[-4000:]

    resumed = launch(half, "--resume")
    for proc in (resumed, uninterrupted):
        stderr = finish(proc)
        assert proc.returncode == 0, stderr[-4000:]
    a = load_checkpoint(full / "checkpoints" / "last.pt")
    b = load_checkpoint(half / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == PREEMPTED_RUN_STEPS and a["data"] == b["data"]
    flat_a, flat_b = _flat_state(a), _flat_state(b)
    assert flat_a.keys() == flat_b.keys()
    for name in flat_a:
        assert torch.equal(flat_a[name], flat_b[name]), name
    for rank in (0, 1):
        assert torch.equal(a["rng"][rank]["torch"], b["rng"][rank]["torch"]), rank
