"""The optimizer, the learning rate and its schedule, as the ``optim`` config section says."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from omegaconf import DictConfig


def build_optimizer(optim: DictConfig, params, lr: float) -> torch.optim.Optimizer:
    """The optimizer an ``optim`` section names (``adam`` or ``adamw``), at learning rate ``lr``."""
    optim_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optim.name]
    return optim_cls(params, lr=lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)


def learning_rate(cfg: DictConfig, world_size: int) -> float:
    """``base_lr``, times ``batch_size * grad_accum * world_size`` when ``scale_lr`` (taming's rule)."""
    lr = float(cfg.optim.base_lr)
    if cfg.optim.scale_lr:
        lr *= cfg.data.batch_size * cfg.optim.grad_accum * world_size
    return lr


def lr_schedule(cfg: DictConfig, progress: Callable[[], float]) -> Callable[[int], float]:
    """LR factor per step: linear warmup, then constant or cosine to ``min_lr_ratio``; ``progress()``
    is the fraction of the run done (steps, or time under ``train.time_limit_minutes``)."""
    warmup = int(cfg.optim.warmup_steps)
    schedule = cfg.optim.schedule
    floor = float(cfg.optim.min_lr_ratio)  # schedule, like every choice, is checked at config load (CHOICES)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress())))

    return factor
