"""An exponential moving average of a model's weights (``train.ema_decay``): the weights the field's
tokenizers (LlamaGen, Open-MAGVIT2, MaskBit) report.

:class:`WeightEMA` keeps, for every floating-point parameter of the trained model, ``ema = decay * ema
+ (1 - decay) * param``, updated after each optimizer step and started from the weights the run
starts with (after ``train.init_from``). Buffers (a quantizer's code counts) are not averaged: the EMA
model's are the trained model's. Updated on every rank from the DDP-synchronized parameters, the
averages are the same on every rank.

The trainer saves :meth:`WeightEMA.state_dict` as the checkpoint's ``"ema"`` entry (the averages by
parameter name), restores it on ``--resume``, and evaluates with the averages swapped in
(:meth:`WeightEMA.swapped_in`); :func:`kepler.load` loads them by default.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from kepler.io.weights import averaged_parameters, check_ema_weights

log = logging.getLogger("kepler")


class WeightEMA:
    """The moving average of ``model``'s floating-point parameters, started from their values now."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the EMA decay must be > 0 and < 1, got {decay!r}")
        self.model = model
        self.decay = float(decay)
        named = averaged_parameters(model)
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.averages = [p.detach().clone() for p in self.params]

    @classmethod
    def for_run(cls, model: nn.Module, decay: float | None, resumed: dict | None, source: str) -> WeightEMA | None:
        """The trainer's EMA (None when ``decay`` is None), restored from the ``"ema"`` entry of the
        checkpoint ``resumed`` when it has one; a checkpoint without one (EMA turned on now) starts
        the average from the resumed weights, with a warning."""
        if decay is None:
            if resumed is not None and "ema" in resumed:
                log.warning("%s has EMA weights, but train.ema_decay is off: they are dropped", source)
            return None
        ema = cls(model, decay)
        if resumed is not None:
            if "ema" in resumed:
                ema.load_state_dict(resumed["ema"], source)
            else:
                log.warning("%s has no EMA weights: the average starts from its weights", source)
        return ema

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average, after an optimizer step: ``ema += (1 - decay) * (param - ema)``."""
        torch._foreach_lerp_(self.averages, [p.detach() for p in self.params], 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averages by parameter name, on the CPU (the checkpoint's ``"ema"`` entry)."""
        return {name: avg.detach().to("cpu", copy=True) for name, avg in zip(self.names, self.averages)}

    def load_state_dict(self, state: dict, source: str) -> None:
        """Averages from a checkpoint's ``"ema"`` entry, checked against the model
        (:func:`kepler.io.weights.check_ema_weights`); ValueError naming ``source`` otherwise."""
        check_ema_weights(self.model, state, f"{source} (EMA weights)")
        with torch.no_grad():
            for name, avg in zip(self.names, self.averages):
                avg.copy_(state[name])

    @contextlib.contextmanager
    def swapped_in(self):
        """The averages in the model's parameters for the ``with`` block, the trained weights after."""
        with torch.no_grad():
            trained = [p.detach().clone() for p in self.params]
            torch._foreach_copy_([p.data for p in self.params], self.averages)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in self.params], trained)
