"""Checkpoints: written atomically, read with ``weights_only=True``, RNG states included."""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from kepler.weights import load_weights

# save_checkpoint writes ``.<name>.tmp<pid>`` beside the checkpoint and renames it over the target.
_TMP_PATTERN = re.compile(r"^\..+\.tmp(\d+)$")


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries of :func:`save_checkpoint` in ``folder`` whose writer is gone (a
    training killed mid-save with SIGKILL cannot clean up); returns the deleted paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for path in sorted(folder.iterdir()):
        match = _TMP_PATTERN.match(path.name)
        if match and path.is_file() and not pid_alive(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def write_atomically(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """``write(f)`` into a temporary file beside ``path`` (``.NAME.tmpPID``, which
    :func:`remove_stale_temporaries` cleans after a kill), fsync, then rename over ``path``: a
    crash mid-write leaves the previous file intact and a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`write_atomically`."""
    return write_atomically(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes), e.g. an interrupted copy")
    state = load_weights(path, f"checkpoint {path}", map_location)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ValueError(f"{path} is not a kepler checkpoint (no 'model' and 'config' entries)")
    return state


def capture_rng() -> dict:
    """This process's RNG states (torch CPU and CUDA, numpy, python) as checkpoint-safe containers."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
