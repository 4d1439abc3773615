"""What the trainer trains for a tokenizer: a :class:`kepler.models.VQModel` and its GAN loss.

:class:`kepler.train.trainer.Trainer` runs the loop (data order, LR schedule, logging, checkpoints,
resume, signals, DDP); a task owns the models, their optimizers and schedulers, one optimizer step
and the validation. One optimizer step here = ``grad_accum`` micro-batches through the autoencoder
(generator update), then, from ``loss.disc_start`` on, the same micro-batches through the
discriminator.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from kepler.data import build_dataset, held_out_set
from kepler.io.config import to_dict
from kepler.io.images import save_pair_grid
from kepler.io.weights import check_state_dict
from kepler.models import VQGANLoss, VQModel
from kepler.train.evaluate import run_validation
from kepler.train.optim import build_optimizer


class VQGANTask:
    """The tokenizer task: built by the trainer after it seeded the RNG.

    ``kind`` is the model kind it trains (:func:`kepler.load` of ``train.init_from`` must give one).

    Args:
        trainer: the :class:`~kepler.train.trainer.Trainer` (its config, device, step, autocast,
            grad scaler and optimizer-step helper are shared).
        lr: the learning rate; ``lr_factor(step)`` scales it (warmup, schedule).
    """

    kind = "tokenizer"

    def __init__(self, trainer, lr: float, lr_factor):
        cfg = trainer.cfg
        self.trainer = trainer
        device = trainer.device
        self.model = VQModel.from_config(to_dict(cfg.model)).to(device)
        self.loss = VQGANLoss(**to_dict(cfg.loss)).to(device)
        self.train_set = build_dataset(cfg.data, "train")
        self.val_set = held_out_set(cfg.data)

        self.opt_ae = build_optimizer(cfg.optim, [p for p in self.model.parameters() if p.requires_grad], lr)
        self.sched_ae = torch.optim.lr_scheduler.LambdaLR(self.opt_ae, lr_factor)
        self.model_ddp = self.model
        # The discriminator as the generator's step scores with (unwrapped: no DDP forward without a
        # backward into its weights) and as its own step trains it.
        self.disc_scorer = self.disc_ddp = disc = self.loss.discriminator
        self.opt_disc = self.sched_disc = None
        if disc is not None:  # None: loss.disc is dino and its weights are missing (the GAN is off)
            self.opt_disc = build_optimizer(cfg.optim, [p for p in disc.parameters() if p.requires_grad], lr)
            # The discriminator only steps from disc_start on; its rate follows the generator's step.
            self.sched_disc = torch.optim.lr_scheduler.LambdaLR(self.opt_disc, lambda _: lr_factor(trainer.step))

    @property
    def status(self) -> str:
        """What the run's first log line adds about this task."""
        return f"perceptual loss {self.loss.perceptual_status}, discriminator {self.loss.disc_status}"

    def wrap_ddp(self, device_ids) -> None:
        # The quantizer all-reduces its own statistics; broadcasting buffers would overwrite them.
        self.model_ddp = DDP(self.model, device_ids=device_ids, broadcast_buffers=False)
        if self.loss.discriminator is not None:
            self.disc_ddp = DDP(self.loss.discriminator, device_ids=device_ids)

    def compile(self) -> None:
        """``train.compile``: the training forwards through ``torch.compile``; the modules themselves
        (validation, checkpoints, the EMA) stay eager. The tokenizer's graph breaks where its
        quantizer runs Python between kernels (data-dependent initialization, code statistics); the
        discriminator compiles as one graph."""
        self.model_ddp = torch.compile(self.model_ddp)
        if self.loss.discriminator is not None:
            # Static shapes: the training batches keep theirs, and the DINO heads' batch groups are
            # worked out from the batch size in Python.
            self.disc_scorer = torch.compile(self.disc_scorer, fullgraph=True, dynamic=False)
            self.disc_ddp = torch.compile(self.disc_ddp, fullgraph=not self.trainer.dist.enabled, dynamic=False)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """This task's entries of the checkpoint (the trainer adds step, RNG, data position, ...)."""
        state = {
            "model": self.model.state_dict(),
            "lecam_ema": self.loss.lecam_ema.cpu(),
            "opt_ae": self.opt_ae.state_dict(),
            "sched_ae": self.sched_ae.state_dict(),
            "quantizer": {
                "utilization": self.model.quantize.codebook_utilization().item(),
                "code_counts": self.model.quantize.code_counts.cpu(),
            },
        }
        if self.loss.discriminator is not None:
            state["discriminator"] = self.loss.discriminator.state_dict()
            state["opt_disc"] = self.opt_disc.state_dict()
            state["sched_disc"] = self.sched_disc.state_dict()
        return state

    def load_state_dict(self, state: dict, source: str) -> None:
        # A run resumed with a changed model config: one line naming the keys, not load_state_dict's report.
        check_state_dict(self.model, state["model"], source)
        disc = self.loss.discriminator
        if disc is None and "discriminator" in state:  # resuming would drop the trained discriminator
            raise ValueError(f"{source} has a trained discriminator, but this run's is {self.loss.disc_status}; "
                             "give loss.dino_weights the ViT's weights file to resume")
        if disc is not None:
            if "discriminator" not in state:
                raise ValueError(f"{source} has no discriminator, but this run trains one ({self.loss.disc_status})")
            check_state_dict(disc, state["discriminator"], f"{source} (discriminator)")
        self.model.load_state_dict(state["model"])
        if "lecam_ema" in state:  # checkpoints from before LeCam have none (and never used one)
            self.loss.lecam_ema.copy_(state["lecam_ema"])
        self.opt_ae.load_state_dict(state["opt_ae"])
        self.sched_ae.load_state_dict(state["sched_ae"])
        if disc is not None:
            disc.load_state_dict(state["discriminator"])
            self.opt_disc.load_state_dict(state["opt_disc"])
            self.sched_disc.load_state_dict(state["sched_disc"])

    # ------------------------------------------------------------------ one step

    def train_step(self, batches) -> dict:
        """One optimizer step over ``grad_accum`` batches of ``batches``; the logged values, ``loss``
        first. The trainer counts the step and the images afterwards."""
        trainer = self.trainer
        accum = int(trainer.cfg.optim.grad_accum)
        step = trainer.step
        gan = self.loss.gan_active(step)
        disc = self.loss.discriminator
        scorer = self.disc_scorer
        totals: dict[str, float] = {}
        micro = []

        def add(logs: dict) -> None:
            for k, v in logs.items():
                totals[k] = totals.get(k, 0.0) + float(v) / accum

        # Generator (autoencoder) update. The discriminator only scores here: no grads into it.
        if disc is not None:
            disc.requires_grad_(False)
        self.opt_ae.zero_grad(set_to_none=True)
        for i in range(accum):
            images, skipped = next(batches)
            trainer.skipped_images += len(skipped)
            x = images.to(trainer.device, non_blocking=True)
            sync = i == accum - 1 or not trainer.dist.enabled
            with contextlib.nullcontext() if sync else self.model_ddp.no_sync():
                with trainer.autocast():
                    x_rec, q_loss, info = self.model_ddp(x)
                    loss, logs = self.loss.generator_loss(
                        q_loss, x, x_rec.float(), step, self.model.last_layer, discriminator=scorer
                    )
                trainer.scaler.scale(loss / accum).backward()
            logs["perplexity"] = info.perplexity.float().mean()
            logs.update(self.model.quantize.loss_terms)  # the quantizer's regularizers (e.g. entropies)
            add(logs)
            micro.append((x, x_rec.detach()))
        if disc is not None:
            disc.requires_grad_(True)
        trainer.clip_and_step(self.opt_ae, self.model.parameters())

        if gan:
            self.opt_disc.zero_grad(set_to_none=True)
            for i, (x, x_rec) in enumerate(micro):
                sync = i == accum - 1 or not trainer.dist.enabled
                with contextlib.nullcontext() if sync else self.disc_ddp.no_sync():
                    with trainer.autocast():
                        d_loss, logs = self.loss.discriminator_loss(x, x_rec, step, discriminator=self.disc_ddp)
                    trainer.scaler.scale(d_loss / accum).backward()
                add(logs)
            trainer.clip_and_step(self.opt_disc, [p for p in disc.parameters() if p.requires_grad])
        trainer.scaler.update()
        self.discriminator_stepped = gan
        totals["utilization"] = float(info.utilization)
        return {"loss": totals.pop("ae_loss"), **totals}

    def step_schedulers(self) -> None:
        """Advance the learning rates, once the trainer has counted the step (see Trainer.train_step)."""
        self.sched_ae.step()
        if self.discriminator_stepped:
            self.sched_disc.step()

    def current_lr(self) -> float:
        return self.sched_ae.get_last_lr()[0]

    def progress_fields(self, record: dict) -> dict:
        """The progress bar's fields besides the loss and the throughput."""
        return {"util": f"{record['utilization']:.2f}"}

    def after_log(self) -> None:
        # Utilization in the logs is over the last log_every steps.
        self.model.quantize.reset_usage()

    # ------------------------------------------------------------------ eval

    def validate(self) -> dict:
        """Held-out metrics; rank 0 also writes the reconstruction grid to the run folder."""
        trainer = self.trainer
        cfg = trainer.cfg
        metrics, grid, _ = run_validation(
            self.model,
            self.val_set,
            batch_size=cfg.data.val_batch_size,
            device=trainer.device,
            autocast_dtype=trainer.autocast_dtype,
            grid_images=cfg.train.grid_images if trainer.dist.is_main else 0,
            rank=trainer.dist.rank,
            world_size=trainer.dist.world_size,
        )
        if trainer.dist.is_main and grid is not None:
            run_dir: Path = trainer.run_dir
            path = save_pair_grid(*grid, run_dir / f"recon_step{trainer.step}.png")
            (run_dir / "reconstructions.png").write_bytes(path.read_bytes())
            trainer.tb.add_images("val/originals_and_reconstructions", (torch.cat(grid, dim=-1) + 1) / 2, trainer.step)
        return metrics

    def final_metrics(self) -> dict:
        """What the run's summary adds about this task."""
        return {"perceptual_loss": self.loss.perceptual_status, "discriminator": self.loss.disc_status}
