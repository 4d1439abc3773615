"""The training loop: a plain PyTorch loop over a task's models, one loop for every kind of model.

A task builds what is trained and owns one optimizer step and the validation: a tokenizer
(:class:`kepler.train.vqgan_task.VQGANTask`, the default: a :class:`kepler.models.VQModel` and its
GAN loss) or a prior over a frozen tokenizer's codes (:mod:`kepler.train.prior_task`). The trainer
owns the rest: data order, learning-rate schedule, progress (:mod:`kepler.progress`), TensorBoard
and JSONL logs, checkpoints, exact resume, signals. Runs on one CPU/GPU or under ``torchrun`` (DDP;
NCCL on GPUs, gloo on CPUs).

Everything a run needs to continue exactly is in ``checkpoints/last.pt``: the task's weights,
optimizers and schedulers, the grad scaler, every rank's RNG states, the step and the position in the data (epoch and
batch; augmentations are seeded per sample, see :class:`kepler.data.SeededSampler`), and the
quantizer's statistics (buffers of the model) and, with ``train.ema_decay``, the moving average of
the weights (:mod:`kepler.train.ema`: validation and the final metrics use it). A stop signal
(Ctrl-C's SIGINT, or a scheduler's SIGTERM / SIGUSR1 before its time limit; see
:mod:`kepler.train.stop_signals`) to any rank finishes the current step on every rank, saves one
checkpoint, and raises :class:`TrainingInterrupted`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from kepler.data import EpochLoader, run_classes
from kepler.distributed import (
    DistInfo,
    RankLostError,
    all_gather_objects,
    broadcast_from_rank0,
    cleanup_distributed,
    init_distributed,
    lost_rank_reason,
)
from kepler.io.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from kepler.io.config import to_dict
from kepler.io.files import write_atomically
from kepler.io.weights import check_state_dict
from kepler.models.load import load_model
from kepler.progress import Progress
from kepler.train.ema import WeightEMA
from kepler.train.optim import learning_rate, lr_schedule
from kepler.train.run_dir import RunDirError, RunDirLock, prepare_run_dir
from kepler.train.stop_signals import StopSignal, TrainingInterrupted
from kepler.train.vqgan_task import VQGANTask

log = logging.getLogger("kepler")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a quota); the previous one is intact."""


def run_dir_of(cfg: DictConfig) -> Path:
    return Path(cfg.run_dir) if cfg.run_dir else Path("runs") / cfg.name


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _drop_records_after(log: Path, step: int) -> None:
    """Remove the records of ``log`` (JSON lines) after ``step``: a run killed after its last
    checkpoint logged steps that the resumed run trains (and logs) again; a line cut short by the kill
    goes too."""
    if not log.is_file():
        return

    def before(line: str) -> bool:
        try:
            return json.loads(line).get("step", 0) <= step
        except ValueError:
            return False

    lines = log.read_text().splitlines(keepends=True)
    kept = [line for line in lines if before(line)]
    if len(kept) < len(lines):
        write_atomically(log, lambda f: f.write("".join(kept).encode()))


class Trainer:
    """Holds the run's state; :meth:`run` trains to ``train.max_steps`` and returns the run folder.

    ``task_class`` builds what is trained (models, optimizers, one step, validation):
    :class:`~kepler.train.vqgan_task.VQGANTask` (a tokenizer) by default."""

    def __init__(self, cfg: DictConfig, dist_info: DistInfo, resume: str | None = None, task_class=VQGANTask):
        self.cfg = cfg
        self.dist = dist_info
        self.device = dist_info.device
        self.run_dir = run_dir_of(cfg)
        self.ckpt_path = self.run_dir / "checkpoints" / "last.pt"
        if cfg.train.threads:
            torch.set_num_threads(int(cfg.train.threads))
        self.autocast_dtype = _autocast_dtype(cfg.train.precision, self.device)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.images_seen = 0
        self.skipped_images = 0
        self.train_seconds = 0.0
        self.tb = None
        self.log_file = None

        self.lr = learning_rate(cfg, dist_info.world_size)
        # Read before the task is built, so that the task can refuse a checkpoint it cannot continue
        # (a prior whose tokenizer changed) before it does any work.
        self.resume_state = load_checkpoint(resume) if resume else None
        # Class ids fixed before any data set is built: a resumed run keeps those it recorded.
        recorded = self.resume_state["config"]["data"].get("classes") if resume else None
        cfg.data.classes = run_classes(cfg.data, recorded)
        # The step of the checkpoint at ckpt_path, as far as this run knows (for a failed write's message).
        self.saved_step = None
        if resume and Path(resume).resolve() == self.ckpt_path.resolve():
            self.saved_step = int(self.resume_state["step"])
        torch.manual_seed(cfg.seed)  # same on every rank: identical initial weights and codebook
        self.task = task_class(self, self.lr, lr_schedule(cfg, self.progress))
        self.loader = EpochLoader(self.task.train_set, cfg.data.batch_size, cfg.data.num_workers, cfg.seed,
                                  dist_info.rank, dist_info.world_size, pin_memory=self.device.type == "cuda")
        self.batches_per_epoch = self.loader.batches_per_epoch
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the training set has {len(self.task.train_set)} items, fewer than one batch of "
                f"{cfg.data.batch_size} per process ({dist_info.world_size} processes)"
            )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)
        if resume:
            self._load(resume)
        elif cfg.train.init_from:
            self._init_from(cfg.train.init_from)
        # From the weights the run starts with (or the resumed average): the same on every rank.
        self.ema = WeightEMA.for_run(self.task.model, cfg.train.ema_decay, self.resume_state,
                                     f"--resume checkpoint {resume}")
        self.resume_state = None

        if dist_info.enabled:
            self.task.wrap_ddp([self.device.index] if self.device.type == "cuda" else None)
        if cfg.train.compile:
            self.task.compile()

        if dist_info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=self.step if resume else None)
            if resume:
                _drop_records_after(self.run_dir / "log.jsonl", self.step)
            self.log_file = open(self.run_dir / "log.jsonl", "a")

    def progress(self) -> float:
        """Fraction of the run done: steps of ``max_steps``, or time of ``time_limit_minutes`` if larger."""
        done = self.step / max(1, self.cfg.train.max_steps)
        limit = self.cfg.train.time_limit_minutes
        if limit:
            done = max(done, self.train_seconds / (60.0 * limit))
        return done

    def out_of_time(self) -> bool:
        limit = self.cfg.train.time_limit_minutes
        if not limit:
            return False
        # Every rank must agree: rank 0's clock decides.
        flag = torch.tensor([float(self.train_seconds >= 60.0 * limit)], device=self.device)
        return bool(broadcast_from_rank0(flag).item())

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        rng = all_gather_objects(capture_rng())
        return {
            **self.task.state_dict(),
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
            "step": self.step,
            "data": {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch},
            "counters": {
                "images_seen": self.images_seen,
                "skipped_images": self.skipped_images,
                "train_seconds": self.train_seconds,
            },
            "world_size": self.dist.world_size,
            "config": to_dict(self.cfg),
        }

    def save(self) -> Path:
        """Write ``checkpoints/last.pt`` (rank 0; every rank calls this). Raises
        :class:`CheckpointWriteError` on every rank when the write fails, saying what the file still
        holds (:func:`kepler.io.checkpoint.save_checkpoint` leaves it as it was)."""
        state = self.state_dict()  # collective (RNG gather): every rank calls it
        failure = None
        if self.dist.is_main:
            try:
                save_checkpoint(state, self.ckpt_path)
            except OSError as error:
                previous = (f"{self.ckpt_path} still holds step {self.saved_step}" if self.saved_step is not None
                            else f"{self.ckpt_path} is as it was" if self.ckpt_path.is_file()
                            else f"there is no earlier checkpoint at {self.ckpt_path}")
                failure = f"checkpoint of step {self.step} not written: {error.strerror or error}; {previous}"
        # Rank 0's verdict, to every rank (it is the barrier too): the others must stop with it, not
        # train on without checkpoints or wait for one.
        failure = all_gather_objects(failure)[0]
        if failure is not None:
            raise CheckpointWriteError(failure)
        self.saved_step = self.step
        return self.ckpt_path

    def _load(self, path: str) -> None:
        state = self.resume_state
        self.task.load_state_dict(state, f"--resume checkpoint {path}")
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.epoch = int(state["data"]["epoch"])
        self.batch_in_epoch = int(state["data"]["batch_in_epoch"])
        counters = state["counters"]
        self.images_seen = int(counters["images_seen"])
        self.skipped_images = int(counters["skipped_images"])
        self.train_seconds = float(counters["train_seconds"])
        rng = state["rng"]
        if len(rng) == self.dist.world_size:
            restore_rng(rng[self.dist.rank])
        else:
            log.warning(
                "checkpoint was written by %d processes, this run has %d: RNG states not restored",
                len(rng), self.dist.world_size,
            )
        if self.dist.is_main:
            log.info("resumed from %s at step %d", path, self.step)

    def _init_from(self, path: str) -> None:
        """The task model's weights from the model at ``path`` (``train.init_from``: any form
        :func:`kepler.load` reads), which must match the configured model."""
        loaded = load_model(path, kind=self.task.kind)
        weights = loaded.model.state_dict()
        check_state_dict(self.task.model, weights, f"train.init_from {path}")
        self.task.model.load_state_dict(weights)
        if self.dist.is_main:
            log.info("model weights from %s (%s weights)", path, loaded.weights)

    # ------------------------------------------------------------------ data

    def _batches(self):
        """Training batches forever, from the saved position; keeps ``epoch``/``batch_in_epoch``."""
        while True:
            for batch in self.loader.epoch(self.epoch, self.batch_in_epoch):
                self.batch_in_epoch += 1
                yield batch
            self.epoch += 1
            self.batch_in_epoch = 0

    # ------------------------------------------------------------------ one step

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def clip_and_step(self, optimizer, params) -> None:
        """``optimizer.step()`` through the grad scaler, after clipping to ``optim.grad_clip``."""
        if self.cfg.optim.grad_clip > 0:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip)
        self.scaler.step(optimizer)

    def train_step(self, batches) -> dict:
        """One optimizer step of the task; its logged values, ``loss`` first."""
        logs = self.task.train_step(batches)
        if self.ema is not None:
            self.ema.update()
        self.step += 1
        # After the count: the cosine factor reads progress(), which must include this step (as
        # before the task split; stepping first shifted the schedule by one step).
        self.task.step_schedulers()
        self.images_seen += self.cfg.optim.grad_accum * self.cfg.data.batch_size * self.dist.world_size
        return logs

    # ------------------------------------------------------------------ logging and eval

    def _log(self, record: dict) -> None:
        if not self.dist.is_main:
            return
        self.log_file.write(json.dumps(record) + "\n")
        self.log_file.flush()
        prefix = record["event"]
        for k, v in record.items():
            if isinstance(v, (int, float)) and k not in ("step", "event"):
                self.tb.add_scalar(f"{prefix}/{k}", v, record["step"])

    def validate(self) -> dict:
        """The task's held-out metrics, of the EMA weights when they are on (``weights`` says which)."""
        with self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext():
            metrics = self.task.validate()
        record = {"event": "eval", "step": self.step, **metrics, "weights": "trained" if self.ema is None else "ema"}
        self._log(record)
        return record

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict:
        """Train to ``train.max_steps`` (or the time limit), validate, save; returns :meth:`final_metrics`
        (also written to ``metrics.json`` by rank 0)."""
        cfg = self.cfg.train
        is_main = self.dist.is_main
        if is_main:
            log.info(
                "training %s: %d steps, lr %.3g, %d process(es) on %s, %s",
                self.run_dir, cfg.max_steps, self.lr, self.dist.world_size, self.device, self.task.status,
            )
        # A bar on a terminal; in a log file, one line per log_every (report() below).
        progress = Progress(cfg.max_steps, self.cfg.name, "step", initial=self.step, enabled=is_main and cfg.progress)
        batches = self._batches()
        window_images, window_start = 0, time.perf_counter()
        record: dict = {}
        with StopSignal() as stop:
            while self.step < cfg.max_steps:
                t0 = time.perf_counter()
                logs = self.train_step(batches)
                self.train_seconds += time.perf_counter() - t0
                window_images += self.cfg.optim.grad_accum * self.cfg.data.batch_size * self.dist.world_size
                progress.update()
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    elapsed = time.perf_counter() - window_start
                    record = {
                        "event": "train",
                        "step": self.step,
                        **logs,
                        "lr": self.task.current_lr(),
                        "images_per_s": window_images / max(elapsed, 1e-9),
                        "epoch": self.epoch,
                        "skipped_images": self.skipped_images,
                    }
                    self._log(record)
                    progress.report(
                        loss=f"{record['loss']:.4f}", **self.task.progress_fields(record),
                        img_s=f"{record['images_per_s']:.1f}",
                    )
                    self.task.after_log()
                    window_images, window_start = 0, time.perf_counter()
                if self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                    self.validate()
                if self.step % cfg.ckpt_every == 0:
                    self.save()
                if self.out_of_time():
                    log.info("time limit of %s minutes reached at step %d", cfg.time_limit_minutes, self.step)
                    break
                if stop.agreed(self.device, self.dist.enabled):
                    progress.close()
                    path = self.save()
                    self._log({"event": "interrupted", "step": self.step})
                    self._close()
                    raise TrainingInterrupted(stop.signum, path, self.step)
        progress.close()
        metrics = self.final_metrics(self.validate())
        self.save()
        if is_main:
            (self.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        self._close()
        return metrics

    def final_metrics(self, final: dict) -> dict:
        """The run's summary: the final validation record and the training counters."""
        metrics = {k: v for k, v in final.items() if k != "event"}
        metrics.update(
            run=str(self.run_dir),
            checkpoint=str(self.ckpt_path),
            val_data=str(self.cfg.data.val),
            images_seen=self.images_seen,
            skipped_images=self.skipped_images,
            train_seconds=round(self.train_seconds, 2),
            train_images_per_s=self.images_seen / max(self.train_seconds, 1e-9),
            **self.task.final_metrics(),
            stopped_by_time_limit=self.step < self.cfg.train.max_steps,
        )
        return metrics

    def _close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.log_file is not None:
            self.log_file.close()


def train(cfg: DictConfig, resume: str | bool | None = None, overwrite: bool = False, task_class=VQGANTask) -> dict:
    """Train per ``cfg`` (see :mod:`kepler.io.config`); returns the run's summary (``metrics.json``:
    the final held-out metrics, ``run`` folder, ``checkpoint``, ``step`` and the training counters).

    Args:
        resume: a checkpoint path to continue from, or True for the run's own ``checkpoints/last.pt``
            (a fresh start when it does not exist yet).
        overwrite: a fresh start may replace a previous run in the run folder (its checkpoint, log,
            metrics and TensorBoard files are deleted first); without it, that is an error.
        task_class: what is trained (see :class:`Trainer`); a prior:
            :class:`kepler.train.prior_task.PriorTask` with a config of
            :func:`kepler.io.config.load_prior_config`.

    Raises:
        RunDirError: another training holds the run folder, or a fresh start would replace a
            previous run without ``overwrite`` (see :mod:`kepler.train.run_dir`).
        TrainingInterrupted: after a stop signal (SIGINT, SIGTERM, SIGUSR1), once the checkpoint is saved.
        RankLostError: under torchrun, another rank died or did not answer within
            ``train.dist_timeout_minutes``; one line, naming this rank.
        CheckpointWriteError: a checkpoint could not be written (a full disk); the previous one is intact.
    """
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: continue the run, or start it over")
    timeout = cfg.train.dist_timeout_minutes
    dist_info = init_distributed(cfg.device, timeout)
    run_dir = run_dir_of(cfg)
    lock = RunDirLock(run_dir)
    try:
        if resume is True:
            last = run_dir / "checkpoints" / "last.pt"
            resume = str(last) if last.is_file() else None
        # Rank 0 claims the folder before anything is written; every rank raises its verdict.
        refusal = None
        if dist_info.is_main:
            try:
                lock.acquire()
                prepare_run_dir(run_dir, resume=bool(resume), overwrite=overwrite)
            except RunDirError as exc:
                refusal = str(exc)
        refusal = all_gather_objects(refusal)[0]
        if refusal is not None:
            raise RunDirError(refusal)
        trainer = Trainer(cfg, dist_info, resume=resume or None, task_class=task_class)
        return trainer.run()
    except Exception as error:
        reason = lost_rank_reason(error) if dist_info.enabled else None
        if reason is None:
            raise
        raise RankLostError(f"rank {dist_info.rank} of {dist_info.world_size} stopped: another rank died or did "
                            f"not answer within train.dist_timeout_minutes ({timeout:g}): {reason}") from error
    finally:
        lock.release()
        cleanup_distributed()
