"""Training checkpoints (``.pt``): written atomically, read with ``weights_only=True``, RNG states included.

A checkpoint is a dict of tensors and plain containers. Every kind holds ``model`` (the state dict)
and ``config`` (the run's resolved config); a prior's also holds ``tokenizer`` (the frozen
tokenizer it models: path, SHA-256, code layout). :func:`checkpoint_kind` tells them apart.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from kepler.io.files import write_atomically
from kepler.io.weights import load_weights


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`write_atomically`: a failed write leaves the file at ``path`` as
    it was. Raises the OSError of the write (a full disk: ENOSPC), not the RuntimeError that
    torch's zip writer makes of it ("unexpected pos 704 vs 598", the OSError only its context)."""
    try:
        return write_atomically(path, lambda f: torch.save(state, f))
    except RuntimeError as error:
        if isinstance(error.__context__, OSError):
            raise error.__context__ from None
        raise


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes), e.g. an interrupted copy")
    state = load_weights(path, f"checkpoint {path}", map_location)
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        hint = ""
        if isinstance(state, dict) and "state_dict" in state:
            hint = "; it looks like a Lightning checkpoint: convert a released one with kepler convert"
        raise ValueError(f"{path} is not a kepler checkpoint (no 'model' and 'config' entries){hint}")
    return state


def checkpoint_kind(state: dict) -> str:
    """``"prior"`` for a ``kepler prior train`` checkpoint (it names its tokenizer), else
    ``"tokenizer"`` (``kepler train``, ``kepler convert``)."""
    return "prior" if "tokenizer" in state else "tokenizer"


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
    """Set this process's RNGs to ``state`` (from :func:`capture_rng`; CUDA where both have it)."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
