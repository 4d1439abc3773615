"""Training end to end: outputs, exact resume, signals, DDP on 2 gloo processes, config errors."""

import errno
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kepler.cli import main
from kepler.io.checkpoint import load_checkpoint, save_checkpoint
from kepler.io import files as files_module
from kepler.io.config import load_config
from kepler.train.optim import learning_rate
from kepler.train import trainer as trainer_module
from kepler.train.stop_signals import StopSignal
from kepler.train.trainer import Trainer, TrainingInterrupted, train

REPO = Path(__file__).resolve().parents[1]

TINY = """
name: tiny
seed: 1
model:
  ch: 8
  ch_mult: [1, 2]
  num_res_blocks: 1
  attn_resolutions: [16]
  z_channels: 8
  resolution: 32
  norm_groups: 4
  embed_dim: 8
  quantizer: {{num_codes: 16, partitions: 4}}
loss: {{perceptual_weight: 0.0, disc_start: {disc_start}, disc_ndf: 8, disc_num_layers: 2}}
data: {{train: {train}, val: {val}, size: 32, resize: 40, batch_size: 2, val_batch_size: 4, val_max_images: 4}}
optim: {{base_lr: 1.0e-4, grad_accum: {accum}, grad_clip: 1.0, warmup_steps: 2, schedule: cosine}}
train: {{max_steps: {steps}, eval_every: 2, ckpt_every: 2, log_every: 1, grid_images: 2, progress: false, threads: 1}}
"""


def random_images(folder: Path, count: int = 6, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


def tiny_config(tmp_path: Path, steps: int = 4, disc_start: int = 1, accum: int = 1, train_data=None,
                val_data=None) -> Path:
    if train_data is None:
        train_data = random_images(tmp_path / "train_images")
    if val_data is None:
        val_data = random_images(tmp_path / "val_images", count=3, seed=1)
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY.format(steps=steps, disc_start=disc_start, accum=accum, train=train_data, val=val_data))
    return path


def test_tiny_run_end_to_end_through_the_cli(tmp_path, capsys):
    config = tiny_config(tmp_path, train_data="sample", val_data="sample")
    run = tmp_path / "run"
    assert main(["train", str(config), f"run_dir={run}"]) == 0
    out = capsys.readouterr().out
    assert "PSNR" in out and "mean-colour baseline" in out and "utilization" in out
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["event"] == "train"]
    eval_records = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    assert [r["step"] for r in eval_records] == [2, 4]
    for key in ("loss", "l1", "utilization", "perplexity", "images_per_s", "lr"):
        assert np.isfinite(train_records[-1][key]), key
    assert "d_loss" in train_records[-1]  # the GAN is on from step 1
    # The lr logged after step k is the next step's: warmup (k + 1) / 2, then cosine over
    # progress k / max_steps (it ran a step behind once, when the schedulers stepped before the count).
    cfg = load_config(config)
    base, floor = learning_rate(cfg, world_size=1), cfg.optim.min_lr_ratio
    cosine = [floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(5)]
    expected = [base * (min(1.0, (k + 1) / 2) if k < 2 else cosine[k]) for k in (1, 2, 3, 4)]
    assert [r["lr"] for r in train_records] == pytest.approx(expected, rel=1e-9)
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("psnr", "ssim", "l1", "baseline_psnr", "utilization", "perplexity"):
        assert np.isfinite(metrics[key]), key
    assert metrics["step"] == 4 and metrics["images_seen"] == 8
    assert (run / "recon_step2.png").is_file() and (run / "recon_step4.png").is_file()
    assert (run / "reconstructions.png").read_bytes() == (run / "recon_step4.png").read_bytes()
    # 2 (original, reconstruction) pairs in one row, 2-pixel padding
    assert Image.open(run / "reconstructions.png").size == (4 * 32 + 5 * 2, 32 + 2 * 2)
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tb").iterdir())
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 4 and state["config"]["name"] == "tiny"
    for key in ("model", "discriminator", "opt_ae", "opt_disc", "sched_ae", "sched_disc", "scaler", "rng", "data"):
        assert key in state, key
    assert "quantize.code_counts" in state["model"]
    assert not list((run / "checkpoints").glob(".*tmp*"))  # atomic write left no temporary file


def _flat_state(state: dict) -> dict:
    out = {}
    for key in ("model", "discriminator", "ema"):
        for name, tensor in state.get(key, {}).items():
            out[f"{key}.{name}"] = tensor
    for key in ("opt_ae", "opt_disc"):
        for pid, pstate in state[key]["state"].items():
            for name, value in pstate.items():
                out[f"{key}.{pid}.{name}"] = torch.as_tensor(value)
    return out


# Settings under which a training step draws from the RNGs after the resume point: dropout (torch's
# global generator every forward), k-means init and dead-code re-seeding (random rows).
DRAWING_OPTIONS = ["model.dropout=0.1", "model.quantizer.init=kmeans", "model.quantizer.dead_code_threshold=2"]


# Every loss option at once, GAN on from step 0: LeCam's moving averages must resume exactly too.
LOSS_OPTIONS = ["loss.gen_loss=non_saturating", "loss.rec_loss=l2", "loss.lecam_weight=0.1", "loss.disc_start=0",
                "model.quantizer.entropy_weight=0.1"]


# The moving average of the weights (train.ema_decay) must resume exactly too.
EMA_OPTIONS = ["train.ema_decay=0.9"]

# Every option of the recipe at once: the DINOv2-feature discriminator's heads (spectral norm's
# power-iteration vectors included) too; its ViT comes from the weights file again.
EVERY_OPTION = [*LOSS_OPTIONS, *EMA_OPTIONS, "model.quantizer.l2_norm=true", "loss.disc=dino",
                "loss.dino_weights={dino_weights}", "loss.dino_resolution=28", "loss.dino_layers=[2,11]"]


@pytest.mark.parametrize("options", [[], LOSS_OPTIONS, EMA_OPTIONS, EVERY_OPTION],
                         ids=["default", "every_loss_option", "ema", "every_option"])
def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path, monkeypatch, request, options):
    config = tiny_config(tmp_path, steps=4, disc_start=1, accum=2)
    if options is EVERY_OPTION:
        options = [o.format(dino_weights=request.getfixturevalue("dino_weights")) for o in options]
    overrides = [*DRAWING_OPTIONS, *options]
    full = train(load_config(config, [f"run_dir={tmp_path / 'full'}", *overrides]))
    original_step = Trainer.train_step

    def step_then_interrupt(self, batches):
        logs = original_step(self, batches)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # the real path: the handler, then a checkpoint
        return logs

    def interrupted_then_resumed(name: str) -> dict:
        half = load_config(config, [f"run_dir={tmp_path / name}", *overrides])
        monkeypatch.setattr(Trainer, "train_step", step_then_interrupt)
        with pytest.raises(TrainingInterrupted, match="stopped by SIGINT at step 2"):
            train(half)
        monkeypatch.setattr(Trainer, "train_step", original_step)
        return train(half, resume=True)

    resumed = interrupted_then_resumed("half")
    a = load_checkpoint(full["checkpoint"])
    b = load_checkpoint(resumed["checkpoint"])
    assert a["step"] == b["step"] == 4
    assert a["data"] == b["data"]
    flat_a, flat_b = _flat_state(a), _flat_state(b)
    assert flat_a.keys() == flat_b.keys()
    for name in flat_a:
        assert torch.equal(flat_a[name], flat_b[name]), name
    assert a["sched_ae"]["last_epoch"] == b["sched_ae"]["last_epoch"] == 4
    torch.testing.assert_close(a["rng"][0]["torch"], b["rng"][0]["torch"], rtol=0, atol=0)
    if "train.ema_decay=0.9" in options:
        # Compared above, bit for bit: every parameter's average, and it is not the weights themselves.
        assert {f"ema.{k}" for k in a["model"] if a["model"][k].is_floating_point()} <= flat_a.keys()
        assert not torch.equal(a["ema"]["encoder.conv_out.weight"], a["model"]["encoder.conv_out.weight"])
    if "loss.lecam_weight=0.1" in options:
        assert (a["lecam_ema"] != 0).all()  # LeCam ran, and its averages resumed exactly (above)
    if "loss.disc=dino" in options:
        assert any(name.endswith("_u") for name in a["discriminator"])  # spectral norm's state resumed (above)
    if options:
        return
    # The steps after the resume point draw from the RNG: without restoring it the run is another.
    monkeypatch.setattr(trainer_module, "restore_rng", lambda state: None)
    unrestored = load_checkpoint(interrupted_then_resumed("unrestored")["checkpoint"])
    assert not torch.equal(unrestored["model"]["encoder.conv_out.weight"], a["model"]["encoder.conv_out.weight"])


def _wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for training to start")
        time.sleep(0.2)


# Ctrl-C exits as the shell's interrupted command; a scheduler's warning (SIGTERM under torchrun in
# tests/test_cluster.py) ends the job as planned.
@pytest.mark.parametrize("signum, exit_code", [(signal.SIGINT, 130), (signal.SIGUSR1, 0)],
                         ids=["SIGINT", "SIGUSR1"])
def test_signal_saves_a_checkpoint_and_exits_cleanly(tmp_path, signum, exit_code):
    config = tiny_config(tmp_path, steps=100000, disc_start=1000000)
    run = tmp_path / "run"
    log = run / "log.jsonl"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kepler", "train", str(config), f"run_dir={run}", "train.ckpt_every=100000",
         "train.eval_every=100000"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    _wait_for(lambda: log.is_file() and log.read_text().count("\n") >= 2, 240, proc)
    proc.send_signal(signum)
    try:
        _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == exit_code, stderr
    assert "Traceback" not in stderr
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (f"kepler train: stopped by {signal.Signals(signum).name} at step {state['step']}; checkpoint "
            f"{run / 'checkpoints' / 'last.pt'}; continue with --resume\n") in stderr
    assert 2 <= state["step"] < 100000
    assert json.loads(log.read_text().splitlines()[-1]) == {"event": "interrupted", "step": state["step"]}
    # and the run continues from there
    assert main(["train", str(config), f"run_dir={run}", f"train.max_steps={state['step'] + 1}",
                 "train.eval_every=1000", "--resume"]) == 0
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == state["step"] + 1


def test_a_repeated_scheduler_signal_is_ignored_and_a_second_ctrl_c_stops_at_once():
    """Under SLURM a rank gets the warning twice (sent to every process, and forwarded by torchrun):
    the second must not abort the checkpoint under way. Ctrl-C twice is a person insisting."""
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGUSR1
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs at the next bytecode; this is not reached
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the handlers before it are back


def test_off_a_terminal_training_progress_is_plain_lines(tmp_path):
    """stderr to a file, as in a SLURM log: one line per log_every with the step, the rate, the loss
    and the ETA, and none of a redrawn bar's carriage returns (a demo's log held about 2000)."""
    config = tiny_config(tmp_path, steps=4, disc_start=100)
    proc = subprocess.run(
        [sys.executable, "-m", "kepler", "train", str(config), f"run_dir={tmp_path / 'run'}", "train.progress=true",
         "train.log_every=2"],
        cwd=tmp_path, env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr
    steps = re.findall(r"^tiny: (\d)/4 steps, \d+\.\d (?:steps/s|s/step), loss=\d+\.\d{4}, util=\d\.\d\d, "
                       r"img_s=\d+\.\d, ETA \d+:\d\d:\d\d$", proc.stderr, re.MULTILINE)
    assert steps == ["2", "4"], proc.stderr


def test_ddp_two_gloo_processes(tmp_path):
    config = tiny_config(tmp_path, steps=3, disc_start=2, accum=2)
    run = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "kepler", "train", str(config), f"run_dir={run}", "device=cpu"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["step"] == 3
    assert state["counters"]["images_seen"] == 3 * 2 * 2 * 2  # steps x accum x batch x ranks
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["images"] == 3  # the 3 validation images, sharded over 2 ranks, counted once
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert sum(r["event"] == "train" for r in records) == 3  # only rank 0 logs


# Run under torchrun: each rank writes the moving average it holds when training ends.
EMA_PROBE = """
import sys, torch
from kepler.cli import main
from kepler.train.trainer import Trainer

run = Trainer.run
def run_then_save(self):
    metrics = run(self)
    torch.save(self.ema.state_dict(), f"{self.run_dir}/ema_rank{self.dist.rank}.pt")
    return metrics
Trainer.run = run_then_save
sys.exit(main(sys.argv[1:]))
"""


def test_ddp_ema_is_the_same_on_every_rank(tmp_path):
    """Updated from the DDP-synchronized parameters on every rank, the averages are equal across ranks
    and are what the checkpoint saves (a rank that skipped an update would hold another)."""
    config = tiny_config(tmp_path, steps=2, disc_start=100)
    run = tmp_path / "ddp"
    probe = tmp_path / "ema_probe.py"
    probe.write_text(EMA_PROBE)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(probe),
         "train", str(config), f"run_dir={run}", "device=cpu", "train.ema_decay=0.5", "train.eval_every=100"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    ranks = [torch.load(run / f"ema_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() == state["ema"].keys()
    for name in state["ema"]:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        assert torch.equal(ranks[1][name], state["ema"][name]), name
    assert not torch.equal(state["ema"]["decoder.conv_out.weight"], state["model"]["decoder.conv_out.weight"])
    assert json.loads((run / "metrics.json").read_text())["weights"] == "ema"


def test_corrupt_training_images_are_skipped_and_counted(tmp_path):
    images = random_images(tmp_path / "train_images", count=4)
    (images / "img1.png").write_bytes(b"broken")
    config = tiny_config(tmp_path, steps=2, disc_start=100, train_data=images)
    with pytest.warns(UserWarning, match="skipping unreadable image .*img1.png"):
        returned = train(load_config(config, [f"run_dir={tmp_path / 'run'}"]))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(returned))
    assert metrics["skipped_images"] >= 1


def test_empty_training_folder_is_a_clear_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    config = tiny_config(tmp_path, train_data=empty)
    assert main(["train", str(config)]) == 2
    assert f"empty dataset: no images (.jpg, .jpeg, .png, .webp) found under {empty}" in capsys.readouterr().err


def test_learning_rate_scaling():
    cfg = load_config(None, ["optim.base_lr=1e-5", "data.batch_size=4", "optim.grad_accum=2"])
    assert learning_rate(cfg, world_size=3) == pytest.approx(1e-5 * 4 * 2 * 3)
    cfg = load_config(None, ["optim.base_lr=1e-5", "optim.scale_lr=false"])
    assert learning_rate(cfg, world_size=3) == pytest.approx(1e-5)


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  chanels: 3\n")
    with pytest.raises(ValueError, match="unknown config key 'model.chanels'"):
        load_config(bad)
    with pytest.raises(ValueError, match="unknown config key 'train.max_step'"):
        load_config(None, ["train.max_step=3"])
    with pytest.raises(ValueError, match="config key 'optim.base_lr' must be a finite number"):
        load_config(None, ["optim.base_lr=fast"])
    with pytest.raises(ValueError, match="override 'seed' must look like key=value"):
        load_config(None, ["seed"])
    with pytest.raises(FileNotFoundError, match="config file .*missing.yaml does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_configs_load():
    for name in ("sample", "celebahq_f16", "ade20k_f16"):
        cfg = load_config(name)
        assert cfg.name == name
        assert cfg == load_config(REPO / "kepler" / "configs" / f"{name}.yaml")
    paper = load_config("ade20k_f16")
    assert paper.model.quantizer.num_codes == 1024 and paper.model.quantizer.partitions == 4
    assert 2 ** (len(paper.model.ch_mult) - 1) == 16


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"model": {}, "config": {}, "step": 1}, path)

    def failing_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"model": {}, "config": {}, "step": 2}, path)
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


class FullDisk:
    """A file on a disk that fills after ``room`` more bytes: the write that passes it writes what
    fits and raises ENOSPC, as ``write(2)`` does."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data) -> int:
        if len(data) > self.room:
            self.file.write(bytes(data[: self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self.file.__exit__(*exc)


def test_a_full_disk_keeps_the_previous_checkpoint_and_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    """The step-4 checkpoint meets a full disk halfway (torch's writer turns the OSError into an
    opaque RuntimeError; the line names the OSError): the step-2 one stays, nothing half-written is left."""
    config = tiny_config(tmp_path, steps=6, disc_start=100)  # checkpoints at steps 2, 4, 6
    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / "last.pt"
    opened = []

    def open_until_the_disk_is_full(path, mode="r", *args, **kwargs):
        file = open(path, mode, *args, **kwargs)
        opened.append(path)
        return FullDisk(file, room=4096) if len(opened) == 2 else file

    monkeypatch.setattr(files_module, "open", open_until_the_disk_is_full, raising=False)
    assert main(["train", str(config), f"run_dir={run}"]) == 1
    assert capsys.readouterr().err == (f"kepler train: error: checkpoint of step 4 not written: No space left on "
                                       f"device; {checkpoint} still holds step 2\n")
    assert [p.name for p in opened] == [".last.pt.tmp" + str(os.getpid())] * 2
    assert load_checkpoint(checkpoint)["step"] == 2
    assert [p.name for p in checkpoint.parent.iterdir()] == ["last.pt"]


def test_a_resumed_run_logs_each_step_once(tmp_path):
    """A run killed after its last checkpoint has logged steps the resumed run trains again: they are
    dropped from log.jsonl (and a line cut short by the kill), so each step is logged once."""
    config = tiny_config(tmp_path, steps=2, disc_start=100)
    run = tmp_path / "run"
    train(load_config(config, [f"run_dir={run}"]))
    log = run / "log.jsonl"
    with log.open("a") as f:  # what a kill at step 3, after the step-2 checkpoint, leaves behind
        f.write(json.dumps({"event": "train", "step": 3, "loss": 1.0}) + "\n" + '{"event": "tra')
    train(load_config(config, [f"run_dir={run}", "train.max_steps=4"]), resume=True)
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train"] == [1, 2, 3, 4]
    assert [r["loss"] for r in records if r["step"] == 3 and r["event"] == "train"] != [1.0]


def test_overrides_may_follow_the_flags(tmp_path, capsys):
    config = tiny_config(tmp_path, steps=1, disc_start=100)
    run = tmp_path / "run"
    assert main(["train", str(config), f"run_dir={run}"]) == 0
    assert main(["train", str(config), "--overwrite", f"run_dir={run}", "train.max_steps=2"]) == 0
    assert json.loads((run / "metrics.json").read_text())["step"] == 2
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["train", str(config), "--overwrite", "not_an_override"])
    assert "unrecognized arguments: not_an_override" in capsys.readouterr().err


@pytest.mark.parametrize("quantizer", [
    ["model.quantizer.entropy_weight=0.1"],
    ["model.quantizer.type=lfq", "model.quantizer.codebook_size=16", "model.quantizer.entropy=kepler"],
], ids=["kepler", "lfq"])
def test_the_entropy_loss_is_logged_and_reported(tmp_path, quantizer):
    """The entropy loss (KeplerQuantizer's entropy_weight, LFQ's entropy: kepler): both entropies in
    every training record, in metrics.json (the validation means) and in `kepler eval` of the saved
    model (a fresh model in eval mode), each between 0 and log K."""
    config = tiny_config(tmp_path, steps=2, disc_start=10)
    run = tmp_path / "run"
    assert main(["train", str(config), f"run_dir={run}", *quantizer]) == 0
    assert main(["eval", str(run / "checkpoints" / "last.pt"), "--data", str(tmp_path / "val_images"),
                 "--out", str(tmp_path / "eval")]) == 0
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    metrics = json.loads((run / "metrics.json").read_text())
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())["resolutions"]["32"]
    for record in [r for r in records if r["event"] == "train"] + [metrics, evaluated]:
        for key in ("entropy_per_sample", "entropy_batch"):
            assert 0 <= record[key] <= math.log(16) + 1e-6, (key, record)
