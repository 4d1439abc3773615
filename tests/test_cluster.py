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

from test_prior_train import TOKENIZER, prior_config
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
    # gloo's words for a closed connection, or a timed-out one, depend on what rank 0 was doing:
    # reading, writing, waiting.
    reason = {signal.SIGKILL: r".*(Connection closed by peer|Connection reset by peer|Broken pipe).*",
              signal.SIGSTOP: r"Timed out waiting 12000ms for (recv|send) operation to complete"}[fault]
    lines = [line for line in stderr.splitlines() if line.startswith("kepler train: ")]
    assert len(lines) == 1, stderr[-4000:]
    assert re.fullmatch(r"kepler train: error: rank 0 of 2 stopped: another rank died or did not answer within "
                        rf"train.dist_timeout_minutes \(0.2\): {reason}", lines[0]), lines[0]
    assert "[rank0]" not in stderr, stderr[-4000:]  # no traceback of the worker (torchrun adds its own report)
    if fault == signal.SIGSTOP:
        assert waited >= 60 * TIMEOUT_MINUTES - 1  # the timeout ended it, and nothing sooner


# Run by each rank under torchrun: the weights it holds when training ends, beside the checkpoint.
WEIGHTS_PROBE = """
import sys, torch
from kepler.cli import main
from kepler.train.trainer import Trainer

run = Trainer.run
def run_then_save(self):
    metrics = run(self)
    torch.save(self.task.model.state_dict(), f"{self.run_dir}/weights_rank{self.dist.rank}.pt")
    return metrics
Trainer.run = run_then_save
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_two_nodes_train_a_tokenizer_then_a_prior(tmp_path):
    """torchrun on two node ranks (one process each, rendezvous on 127.0.0.1, gloo) trains the tiny
    tokenizer, then the tiny prior over its codes: both nodes finish, rank 0 writes the one
    checkpoint, and both ranks end with the weights it holds."""
    probe = tmp_path / "weights_probe.py"
    probe.write_text(WEIGHTS_PROBE)
    tokenizer_config = tmp_path / "tok.yaml"
    tokenizer_config.write_text(TOKENIZER.format(partitions=2))
    tokenizer_run, prior_run = tmp_path / "tok", tmp_path / "prior"
    commands = [
        ("train", str(tokenizer_config), f"run_dir={tokenizer_run}", "train.max_steps=3", "train.eval_every=100"),
        ("prior", "train", str(prior_config(tmp_path, tokenizer_run / "checkpoints" / "last.pt", steps=3)),
         f"run_dir={prior_run}", "train.eval_every=100", "train.grid_images=0"),
    ]
    for command, run in zip(commands, (tokenizer_run, prior_run)):
        nodes = two_nodes(free_port(), str(probe), *command, "device=cpu", cwd=tmp_path)
        for node, proc in enumerate(nodes):
            stderr = finish(proc)
            assert proc.returncode == 0, f"node {node}: {stderr[-4000:]}"
        assert [p.name for p in (run / "checkpoints").iterdir()] == ["last.pt"]
        state = load_checkpoint(run / "checkpoints" / "last.pt")
        assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["step"] == 3
        assert state["counters"]["images_seen"] == 3 * 2 * (4 if command[0] == "prior" else 2)  # steps x ranks x batch
        ranks = [torch.load(run / f"weights_rank{r}.pt", weights_only=True) for r in (0, 1)]
        assert ranks[0].keys() == ranks[1].keys() == state["model"].keys()
        for name in state["model"]:
            assert torch.equal(ranks[0][name], ranks[1][name]), name
            assert torch.equal(ranks[1][name], state["model"][name]), name
        assert sum(r["event"] == "train" for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())) == 3
