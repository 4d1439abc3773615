"""Weight files from outside: read without running their code.

A pickle can run any code while it is read, and ``torch.load(..., weights_only=False)`` lets it. Every
file kepler reads (training checkpoints, LPIPS and FID Inception weights) goes through
:func:`load_weights` (``weights_only=True``: tensors and plain containers only); what it refuses is a
one-line ValueError naming the file and the global it asked for.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
from typing import Any

import torch


def load_weights(source: str | os.PathLike | bytes, what: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(source, weights_only=True)``; ``source`` is a path or the file's bytes.

    Raises ValueError (one line, starting with ``what``) for a file that asks for anything but
    tensors and plain containers, or that torch cannot read.
    """
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        return torch.load(stream, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is a paragraph; the global the file asked for is the part that matters.
        asked = re.search(r"GLOBAL ([\w.]+)", str(exc))
        detail = f"it asks for {asked.group(1)}" if asked else str(exc).splitlines()[0]
        raise ValueError(
            f"{what} holds more than tensors and plain containers ({detail}); refused to unpickle it"
        ) from None
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{what} could not be read: {first_line}") from None


def sha256_prefix_matches(data: bytes, prefix: str) -> tuple[bool, str]:
    """``(hex SHA-256 of data starts with prefix, the hex digest)``: the check torch hub makes of a
    ``<name>-<prefix>.pth`` file."""
    digest = hashlib.sha256(data).hexdigest()
    return digest.startswith(prefix), digest
