"""The run folder a training writes into: one training at a time, and never over a previous run by
accident.

A run folder holds ``checkpoints/last.pt``, ``log.jsonl`` (appended to), ``metrics.json``, ``tb/``
and PNG grids. Starting a second training in it would interleave both logs and let each overwrite
the other's checkpoint, and a fresh start over a finished run would silently replace its checkpoint.
So a training holds ``<run>/.lock`` (its PID and host) while it runs, and a fresh start refuses a
folder that already holds a run unless the user asked to continue it (``--resume``) or to replace it
(``--overwrite``).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from pathlib import Path

from kepler.io.files import pid_alive, remove_stale_temporaries

log = logging.getLogger("kepler")

LOCK_NAME = ".lock"
# What a training writes into its run folder; --overwrite deletes exactly these.
RUN_OUTPUTS = ("checkpoints/last.pt", "log.jsonl", "metrics.json", "reconstructions.png", "samples.png", "tb")
# A lock file younger than this may still be being written by a training that is just starting.
_LOCK_WRITE_GRACE_S = 10.0


class RunDirError(ValueError):
    """The run folder cannot be used as asked (in use by another training, or holds a previous run)."""


class RunDirLock:
    """Holds ``<run_dir>/.lock`` (``"<pid> <host>"``) from :meth:`acquire` to :meth:`release`.

    A lock whose holder is gone (same host, no such process; or an empty file older than a few
    seconds) is stale: it is replaced, with a warning. A live holder, or one on another host (whose
    processes cannot be checked from here), makes :meth:`acquire` raise :class:`RunDirError`.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False

    def acquire(self) -> RunDirLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RunDirError(f"cannot create the run folder {self.path.parent}: {exc.strerror or exc}") from None
        stamp = f"{os.getpid()} {socket.gethostname()}\n"
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._refuse_unless_stale()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(stamp)
            self.held = True
            return self

    def _refuse_unless_stale(self) -> None:
        try:
            text = self.path.read_text().split()
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:  # released between our open and this read: try again
            return
        if len(text) == 2 and text[0].isdigit():
            pid, host = int(text[0]), text[1]
            if host != socket.gethostname() or pid_alive(pid):
                raise RunDirError(
                    f"run folder {self.path.parent} is in use by another training (process {pid} on {host}; "
                    f"lock file {self.path}); wait for it to end, or choose another run_dir. If no such "
                    f"process exists, delete the lock file"
                )
            log.warning("removing the stale lock %s of process %d, which is gone", self.path, pid)
        elif age < _LOCK_WRITE_GRACE_S:
            raise RunDirError(f"run folder {self.path.parent} is being claimed by another training ({self.path})")
        else:
            log.warning("removing the unreadable stale lock %s", self.path)
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def prepare_run_dir(run_dir: str | os.PathLike, resume: bool, overwrite: bool) -> None:
    """Make ``run_dir`` ready for a training (call while holding its :class:`RunDirLock`).

    Removes checkpoint temporaries left by killed trainings. A fresh start (``resume`` false) in a
    folder that holds a previous run (a checkpoint or a log) raises :class:`RunDirError` naming
    ``--resume`` and ``--overwrite``; with ``overwrite`` the previous run's outputs are deleted.
    """
    run_dir = Path(run_dir)
    for stale in remove_stale_temporaries(run_dir / "checkpoints"):
        log.warning("removed %s, a checkpoint temporary left by a killed training", stale)
    if resume:
        return
    previous = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if not previous:
        return
    if not overwrite:
        raise RunDirError(
            f"run folder {run_dir} already holds a run ({', '.join(previous)}); continue it with --resume, "
            f"or start over with --overwrite (deletes {', '.join(RUN_OUTPUTS)})"
        )
    for name in previous:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    log.info("--overwrite: deleted %s of the previous run in %s", ", ".join(previous), run_dir)
