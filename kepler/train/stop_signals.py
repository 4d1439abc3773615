"""How a signal stops a training run: after the current step, on every rank at the same step, with
one checkpoint (the trainer saves it, then raises :class:`TrainingInterrupted`).

The signals are Ctrl-C's SIGINT and what a scheduler sends before it ends a job: SLURM sends SIGTERM
at the time limit and, with ``#SBATCH --signal=USR1@<seconds>``, SIGUSR1 that long before it. The
command line exits 0 after a scheduler's signal (the job ended as planned) and 130 after Ctrl-C.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import torch

from kepler.distributed import all_reduce_sum

log = logging.getLogger("kepler")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class TrainingInterrupted(KeyboardInterrupt):
    """Raised after a stop signal (:data:`STOP_SIGNALS`) stopped a run and its checkpoint was saved."""

    def __init__(self, signum: int, checkpoint: Path, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint {checkpoint}")
        self.signum = signum
        self.checkpoint = checkpoint
        self.step = step

    @property
    def preempted(self) -> bool:
        """A scheduler's signal (SIGTERM, SIGUSR1), not a person's Ctrl-C: the job ends as planned and
        continues with ``--resume``."""
        return self.signum != signal.SIGINT


class StopSignal:
    """While the block runs, the stop signals (:data:`STOP_SIGNALS`) set :attr:`signum` instead of
    ending the process (main thread only); :meth:`agreed` asks every rank between steps."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            if signum == signal.SIGINT:  # Ctrl-C again: the person wants it to stop now, unsaved
                raise KeyboardInterrupt
            # A scheduler's signal again: under SLURM every process of the job gets it and torchrun
            # forwards its own copy, so a rank sees it twice; the checkpoint is under way.
            return
        self.signum = signum
        log.warning("%s received: saving a checkpoint after this step", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def agreed(self, device: torch.device, distributed: bool) -> bool:
        """Whether to stop now: True on every rank at once when any rank got a stop signal. A rank
        that got none takes the first of :data:`STOP_SIGNALS` that one did (Ctrl-C on one rank is
        Ctrl-C on all). A collective: every rank calls it between the same steps."""
        received = torch.tensor([float(self.signum == sig) for sig in STOP_SIGNALS])
        if distributed:
            # The verdict is the summed flags, never this rank's own: a signal landing after the sum
            # must not make one rank stop a step before the others (it counts at the next step).
            received = all_reduce_sum(received.to(device)).cpu()
        if not received.any():
            return False
        if self.signum is None:
            self.signum = STOP_SIGNALS[int(received.nonzero()[0])]
        return True
