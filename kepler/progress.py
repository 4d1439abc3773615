"""Progress of a long loop, for a person at a terminal or for a cluster's log file: the one helper of
every command that shows progress (training, sampling, a prior's evaluation, a study).

When stderr is a terminal, a tqdm bar redraws in place. Anywhere else (a SLURM log, a pipe, ``nohup``)
each redraw would be one more carriage-return line in the file, so the same progress goes out as plain
lines through the ``kepler`` logger, when the caller reports (:meth:`Progress.report`) or evenly
spaced over the loop (``lines``)::

    tiny: 20/100 steps, 4.2 steps/s, loss=0.1234, util=0.81, img_s=33.4, ETA 0:00:19
"""

from __future__ import annotations

import datetime
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator

log = logging.getLogger("kepler")


class Progress:
    """``total`` units of work called ``unit`` (``"step"``, ``"sample"``, ``"run"``), ``desc`` before
    each line. ``initial``: units done before this process (a resumed run's steps), counted but not
    in the rate. ``lines``: plain lines :meth:`update` writes by itself, evenly spaced over the loop
    (0: only those of :meth:`report`). ``enabled=False``: no bar and no lines (a rank other than 0,
    ``train.progress: false``); :meth:`status` still counts."""

    def __init__(self, total: int, desc: str, unit: str, *, initial: int = 0, lines: int = 0, enabled: bool = True):
        self.total, self.desc, self.unit = total, desc, unit
        self.done = initial
        self._timed = 0  # units done since _start, the rate's numerator
        self._start = time.perf_counter()
        self._every = math.ceil(total / lines) if lines and total > 0 else 0
        self._enabled = enabled
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        """``n`` more units done."""
        before, self.done = self.done, self.done + n
        self._timed += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._enabled and self._every and (self.done // self._every > before // self._every
                                                or before < self.total <= self.done):
            log.info("%s: %s", self.desc, self.status())

    def track(self, items: Iterable, units: Callable[[object], int] | None = None) -> Iterator:
        """``items``, each counted done (``units(item)`` units; one by default) when the next is asked
        for, so once the loop over them has done its work; closes the bar after the last."""
        for item in items:
            yield item
            self.update(1 if units is None else units(item))
        self.close()

    def skip(self, n: int = 1) -> None:
        """``n`` more units that needed no work (a study's reused run): counted, not in the rate."""
        self.done += n
        if self._bar is not None:
            self._bar.update(n)

    def report(self, **fields) -> None:
        """Show ``fields`` (name=value; floats to 4 digits): the bar's postfix on a terminal, else one line."""
        if self._bar is not None:
            self._bar.set_postfix({k: _text(v) for k, v in fields.items()}, refresh=True)
        elif self._enabled:
            log.info("%s: %s", self.desc, self.status(**fields))

    def status(self, **fields) -> str:
        """``20/100 steps, 4.2 steps/s, loss=0.1234, ETA 0:00:19``: the count, the rate since this
        process started (units per second, or seconds per unit below one a second), ``fields``, the
        time left at that rate."""
        elapsed = time.perf_counter() - self._start
        rate = self._timed / elapsed if elapsed > 0 and self._timed else None
        parts = [f"{self.done}/{self.total} {self.unit}s"]
        if rate is not None:
            parts.append(f"{rate:.1f} {self.unit}s/s" if rate >= 1 else f"{1 / rate:.1f} s/{self.unit}")
        parts += [f"{k}={_text(v)}" for k, v in fields.items()]
        left = max(0, self.total - self.done)
        eta = "?" if rate is None and left else str(datetime.timedelta(seconds=round(left / rate if left else 0)))
        return ", ".join(parts + [f"ETA {eta}"])

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _text(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
