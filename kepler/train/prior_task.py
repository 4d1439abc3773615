"""What the trainer trains for a prior: a :class:`kepler.models.CodeTransformer` over the index maps
of a frozen tokenizer (the second stage; ``kepler prior train``).

The tokenizer (config key ``tokenizer.checkpoint``: a run's checkpoint or an exported folder, read by
:func:`kepler.load`) encodes the images once, every rank its share, into the run's code cache
(:mod:`kepler.train.codes`), which the prior then reads memory-mapped: its memory does not grow with
the data set.
The tokenizer's EMA weights are used when it has them (``weights`` in the checkpoint's tokenizer record
says which; :func:`kepler.models.load.load_prior_tokenizer` loads the same). The checkpoint records
the tokenizer's absolute path and SHA-256: ``--resume`` refuses a tokenizer
file that changed since (its codes would not be the ones the prior learned), and so do
``kepler sample`` and ``kepler prior eval`` (:func:`kepler.models.load.load_prior_tokenizer`).
Validation is the held-out negative log-likelihood in bits per token (sub-code) and per position,
next to two baselines (:mod:`kepler.train.prior_eval`).

A class-conditional prior (``model.num_classes > 0``) trains on labelled data; the class is the
start token in training, validation and sampling. An unconditional prior ignores labels.

Each validation also draws ``train.grid_images`` samples (seed 0, so that successive grids compare)
and writes them, decoded by the tokenizer, to ``samples_step<N>.png``, ``samples.png`` and TensorBoard.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from kepler.data import to_unit
from kepler.io.config import to_dict
from kepler.io.files import file_sha256
from kepler.io.images import save_image_grid
from kepler.io.weights import check_state_dict
from kepler.models import CodeTransformer
from kepler.models.code_transformer import token_cross_entropy
from kepler.models.load import load_model, tokenizer_layout
from kepler.models.sampling import sample_images
from kepler.train.codes import CodeMaps, extract_codes
from kepler.train.optim import build_optimizer
from kepler.train.prior_eval import baseline_bits, held_out_bits, slot_counts


class PriorTask:
    """The prior task (see the module docstring); the trainer's interface as
    :class:`~kepler.train.vqgan_task.VQGANTask`'s."""

    kind = "prior"

    def __init__(self, trainer, lr: float, lr_factor):
        cfg = trainer.cfg
        self.trainer = trainer
        device = trainer.device
        # Absolute: a prior used from another folder must find the same file, not another runs/...
        self.tokenizer_path = str(Path(cfg.tokenizer.checkpoint).resolve())
        self.num_classes = int(cfg.model.num_classes)
        # Loading and encoding must not draw from the seeded RNG: the prior's initial weights are the
        # same whether the codes are encoded now or read from the cache.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            self.tokenizer_sha256 = file_sha256(self.tokenizer_path)
            if trainer.resume_state is not None:  # before anything is encoded with another tokenizer
                self._check_tokenizer(trainer.resume_state["tokenizer"]["sha256"])
            loaded = load_model(self.tokenizer_path, device, kind="tokenizer")  # its EMA weights when it has them
            self.tokenizer_weights = loaded.weights
            tokenizer = loaded.model.requires_grad_(False)
            del loaded
            self.layout = tokenizer_layout(tokenizer, cfg.data.size)
            stored = extract_codes(tokenizer, self.tokenizer_sha256, cfg.data, self.num_classes, self.layout,
                                   trainer.run_dir, device, trainer.dist.rank, trainer.dist.world_size)
        # Kept where validation draws sample grids (rank 0); else freed.
        self.tokenizer = tokenizer if trainer.dist.is_main and cfg.train.grid_images else None
        del tokenizer
        self.val_codes, self.val_labels = stored.val, stored.val_labels
        self.train_counts = slot_counts(stored.train, self.layout)
        self.train_set = CodeMaps(stored.train, stored.train_labels)

        self.model = CodeTransformer(self.layout, **to_dict(cfg.model)).to(device)
        self.opt = build_optimizer(cfg.optim, self.model.parameters(), lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_factor)
        self.model_ddp = self.model

    @property
    def status(self) -> str:
        classes = f", {self.num_classes} classes" if self.num_classes else ""
        return (f"{len(self.train_set)} training maps of {self.layout.height}x{self.layout.width}x"
                f"{self.layout.tokens_per_position} codes (K={self.layout.codebook_size}{classes})")

    def wrap_ddp(self, device_ids) -> None:
        self.model_ddp = DDP(self.model, device_ids=device_ids)

    def compile(self) -> None:
        """``train.compile``: the training forward through ``torch.compile`` (one graph without DDP,
        whose bucketing splits it); the module itself (validation, checkpoints, the EMA) stays eager."""
        self.model_ddp = torch.compile(self.model_ddp, fullgraph=not self.trainer.dist.enabled)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "tokenizer": {"checkpoint": self.tokenizer_path, "sha256": self.tokenizer_sha256,
                          "layout": asdict(self.layout), "weights": self.tokenizer_weights},
            "train_slot_counts": self.train_counts,
        }

    def _check_tokenizer(self, recorded: str) -> None:
        """The checkpoint resumed from was trained on the tokenizer of SHA-256 ``recorded``: it must be
        this one."""
        if recorded != self.tokenizer_sha256:
            raise ValueError(f"--resume: the checkpoint was trained on a tokenizer with SHA-256 {recorded}, but "
                             f"tokenizer.checkpoint {self.tokenizer_path} has SHA-256 {self.tokenizer_sha256}: "
                             "resuming would train the prior on another tokenizer's codes")

    def load_state_dict(self, state: dict, source: str) -> None:
        check_state_dict(self.model, state["model"], source)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])

    # ------------------------------------------------------------------ one step

    def train_step(self, batches) -> dict:
        trainer = self.trainer
        accum = int(trainer.cfg.optim.grad_accum)
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        for i in range(accum):
            batch, _ = next(batches)
            codes, labels = batch if self.num_classes else (batch, None)
            codes = codes.to(trainer.device, non_blocking=True)
            if labels is not None:
                labels = labels.to(trainer.device, non_blocking=True)
            sync = i == accum - 1 or not trainer.dist.enabled
            with contextlib.nullcontext() if sync else self.model_ddp.no_sync():
                with trainer.autocast():
                    logits = self.model_ddp(codes, labels)
                loss = token_cross_entropy(logits, codes)
                trainer.scaler.scale(loss / accum).backward()
            total += float(loss.detach()) / accum
        trainer.clip_and_step(self.opt, self.model.parameters())
        trainer.scaler.update()
        return {"loss": total, "bits_per_token": total / math.log(2)}

    def step_schedulers(self) -> None:
        """Advance the learning rate, once the trainer has counted the step (see Trainer.train_step)."""
        self.sched.step()

    def current_lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def progress_fields(self, record: dict) -> dict:
        return {"bits": f"{record['bits_per_token']:.3f}"}

    def after_log(self) -> None:
        pass

    # ------------------------------------------------------------------ eval

    def validate(self) -> dict:
        """Held-out bits and their baselines; rank 0 also writes the sample grid to the run folder."""
        trainer = self.trainer
        if self.tokenizer is not None:
            self._write_samples(trainer.cfg.train.grid_images)
        return {
            **held_out_bits(self.model, self.val_codes, trainer.cfg.data.val_batch_size, trainer.device,
                            self.val_labels),
            **baseline_bits(self.train_counts, self.val_codes, self.layout),
            "val_maps": len(self.val_codes),
        }

    def _write_samples(self, num: int) -> None:
        """``num`` samples (seed 0; a class-conditional prior's cycle through the classes) as
        ``samples_step<N>.png`` and ``samples.png`` in the run folder, and in TensorBoard."""
        trainer = self.trainer
        labels = torch.arange(num, device=trainer.device) % self.num_classes if self.num_classes else None
        _, images = sample_images(self.model, self.tokenizer, num, labels, seed=0)
        path = save_image_grid(images.cpu(), trainer.run_dir / f"samples_step{trainer.step}.png")
        (trainer.run_dir / "samples.png").write_bytes(path.read_bytes())
        trainer.tb.add_images("val/samples", to_unit(images), trainer.step)

    def final_metrics(self) -> dict:
        return {"tokenizer": self.tokenizer_path, "train_maps": len(self.train_set),
                "tokens_per_map": self.layout.flat_length}
