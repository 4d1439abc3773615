"""Training past one process, as a cluster runs it: preemption signals under torchrun, a rank that
dies or hangs, and two node ranks of torchrun on this machine (gloo, CPU)."""

import contextlib
import json
import os
import re
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
from kepler.io.config import load_config

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


def two_nodes(port: int, *command: str, **popen) -> list[subprocess.Popen]:
    """torchrun twice, node ranks 0 and 1 of one process each, meeting at 127.0.0.1:``port``: what
    two machines of a cluster run, one line each."""
    return [subprocess.Popen(torchrun("--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(node),
                                      "--master_addr", "127.0.0.1", "--master_port", str(port), *command),
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
            for node in (0, 1)]


def test_dist_timeout_must_be_positive():
    with pytest.raises(ValueError, match=r"^config key 'train.dist_timeout_minutes' must be > 0, got 0$"):
        load_config(None, ["train.dist_timeout_minutes=0"])
    assert load_config(None, ["train.dist_timeout_minutes=0.2"]).train.dist_timeout_minutes == 0.2


# Seconds for the second node's rank to be noticed gone: the timeout (0.2 minutes), and what two busy
# cores need to raise, print and exit.
TIMEOUT_MINUTES = 0.2
NOTICED_WITHIN_S = 60 * TIMEOUT_MINUTES + 30


@pytest.mark.slow
@pytest.mark.parametrize("fault", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "hung"])
def test_a_lost_rank_stops_the_other_with_one_line_within_the_timeout(tmp_path, fault):
    """The rank of node 1 killed outright (its connections close) or stopped (they stay open: only the
    timeout ends the wait) mid-run: the rank of node 0 stops with one line naming the cause, exit 1,
    instead of waiting out the default 30 minutes. Two torchruns, as two nodes: one torchrun would
    itself end its other workers when one dies."""
    config = tiny_config(tmp_path, steps=100000, disc_start=1)
    run = tmp_path / "run"
    nodes = two_nodes(free_port(), "-m", "kepler", "train", str(config), f"run_dir={run}", "device=cpu",
                      "train.eval_every=100000", "train.ckpt_every=100000",
                      f"train.dist_timeout_minutes={TIMEOUT_MINUTES}", cwd=tmp_path)
    (survivor,), (victim,) = (worker_pids(node, 1).values() for node in nodes)
    try:
        wait_for_steps(run / "log.jsonl", 2, nodes)
        os.kill(victim, fault)
        lost = time.monotonic()
        stderr = finish(nodes[0], NOTICED_WITHIN_S)
        waited = time.monotonic() - lost
    finally:
        for pid in (survivor, victim):  # what is left when the test failed, or the stopped one
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in nodes:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
    assert nodes[0].returncode == 1, stderr[-4000:]
    # gloo's words for a closed connection depend on what rank 0 was doing: reading, writing, waiting.
    reason = {signal.SIGKILL: r".*(Connection closed by peer|Connection reset by peer|Broken pipe).*",
              signal.SIGSTOP: r"Timed out waiting 12000ms for recv operation to complete"}[fault]
    lines = [line for line in stderr.splitlines() if line.startswith("kepler train: ")]
    assert len(lines) == 1, stderr[-4000:]
    assert re.fullmatch(r"kepler train: error: rank 0 of 2 stopped: another rank died or did not answer within "
                        rf"train.dist_timeout_minutes \(0.2\): {reason}", lines[0]), lines[0]
    assert "[rank0]" not in stderr, stderr[-4000:]  # no traceback of the worker (torchrun adds its own report)
    if fault == signal.SIGSTOP:
        assert waited >= 60 * TIMEOUT_MINUTES - 1  # the timeout ended it, and nothing sooner
