"""Weight files from outside: read without running their code, checked before memory is spent on them.

A pickle can run any code while it is read, and ``torch.load(..., weights_only=False)`` lets it. Every
file kepler reads (training checkpoints, LPIPS and FID Inception weights) goes through
:func:`load_weights` (``weights_only=True``: tensors and plain containers only); what it refuses is a
one-line ValueError naming the file and the global it asked for.

A state dict meant for a module is compared with it by :func:`check_state_dict` before it is loaded,
and the module can be a ``meta``-device skeleton: a checkpoint whose config describes a huge model is
refused without allocating it.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

# How many key names a mismatch message lists before "...".
_NAMES_SHOWN = 3


class RefusedGlobals(ValueError):
    """:func:`load_weights` refused a file that asks for globals beyond tensors and plain containers.

    ``names``: the globals it asks for, as ``"module.name"`` strings (all of them where torch can
    list them), for a caller that can offer a deliberate way to allow them.
    """

    def __init__(self, message: str, names: list[str]):
        super().__init__(message)
        self.names = names


class GlobalPlaceholder:
    """What :func:`load_weights` reads a stubbed global as (a subclass named after it): called or
    restored, it only keeps its arguments."""

    name = ""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<placeholder for {self.name}>"


def error_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type's name if it has none), for one-line errors."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def load_weights(
    source: str | os.PathLike | bytes,
    what: str,
    map_location: str | torch.device = "cpu",
    trusted_globals: Sequence[str] = (),
    stubbed_globals: Sequence[str] = (),
) -> Any:
    """``torch.load(source, weights_only=True)``; ``source`` is a path or the file's bytes.

    Two ways to let a file ask for ``"module.name"`` globals beyond weights_only's own, each only for
    the names the caller passes:

    * ``trusted_globals``: each is imported and unpickling may run its code (only for a file the
      user trusts);
    * ``stubbed_globals``: each is read as an inert :class:`GlobalPlaceholder` that keeps the
      arguments it was given and runs nothing; for objects beside the weights that the caller does
      not need (a Lightning checkpoint's callbacks or OmegaConf hyper-parameters). Modules torch
      blocks (``os``, ``posix``, ...) stay refused.

    Raises :class:`RefusedGlobals` (a ValueError, one line, starting with ``what``) for a file that
    asks for anything else, ValueError for a file torch cannot read.
    """
    allowed = [(_import_global(name), name) for name in trusted_globals]
    allowed += [(type(name.rpartition(".")[2], (GlobalPlaceholder,), {"name": name}), name) for name in stubbed_globals]
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(stream, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is a paragraph; the globals the file asks for are the part that matters.
        allowed_names = [*trusted_globals, *stubbed_globals]
        names = _refused_globals(source, str(exc), allowed_names)
        blocked = [name for name in names if name in allowed_names]
        if blocked:  # torch refuses some modules (os, subprocess, ...) whatever the caller allows
            raise ValueError(
                f"{what} asks for {blocked[0]}, from a module torch never unpickles; refused to unpickle it"
            ) from None
        detail = f"it asks for {', '.join(names)}" if names else str(exc).splitlines()[0]
        raise RefusedGlobals(
            f"{what} holds more than tensors and plain containers ({detail}); refused to unpickle it", names
        ) from None
    except Exception as exc:
        raise ValueError(f"{what} could not be read: {error_line(exc)}") from None


def _import_global(name: str) -> Any:
    """The object a pickle's ``GLOBAL module.name`` refers to; ValueError naming ``name`` otherwise."""
    module_name, _, attribute = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"trusted global {name!r} is not an importable module.name") from None


def _refused_globals(source: str | os.PathLike | bytes, message: str, trusted: Sequence[str]) -> list[str]:
    """Every global of ``source`` that weights_only refuses (torch lists them for zip-format files),
    else the one named in torch's ``message``."""
    try:
        stream = io.BytesIO(source) if isinstance(source, bytes) else source
        names = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(stream)) - set(trusted))
    except Exception:  # a legacy (non-zip) file: torch can only name the first global it met
        names = []
    if not names:
        asked = re.search(r"GLOBAL ([\w.]+)", message)
        names = [asked.group(1)] if asked else []
    return names


def sha256_prefix_matches(data: bytes, prefix: str) -> tuple[bool, str]:
    """``(hex SHA-256 of data starts with prefix, the hex digest)``: the check torch hub makes of a
    ``<name>-<prefix>.pth`` file."""
    digest = hashlib.sha256(data).hexdigest()
    return digest.startswith(prefix), digest


def _names(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_NAMES_SHOWN])
    return shown + (", ..." if len(keys) > _NAMES_SHOWN else "")


def check_state_dict(module: nn.Module, state: Any, what: str) -> None:
    """Raise ValueError (one line, starting with ``what``) unless ``state`` loads into ``module``
    exactly and holds finite, real data.

    Checked: ``state`` maps names to tensors; no key missing, unexpected or of another shape than
    ``module``'s (``module`` may live on the ``meta`` device); the tensors hold as many bytes as they
    claim (a stride-0 view of one element cannot stand in for a large weight); every floating point
    value is finite (the count and the first key are named).
    """
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{what}: the weights are not a mapping of names to tensors")
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing ({_names(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected ({_names(unexpected)})")
        if mismatched:
            first = mismatched[0]
            problems.append(
                f"{len(mismatched)} of another shape ({first!r}: {tuple(state[first].shape)} in the file, "
                f"{tuple(expected[first].shape)} in the model{', ...' if len(mismatched) > 1 else ''})"
            )
        raise ValueError(f"{what}: the weights do not match the model config: keys " + "; ".join(problems))
    claimed = sum(t.numel() * t.element_size() for t in state.values())
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in state.values()}
    held = sum(storages.values())
    if claimed > held:
        raise ValueError(f"{what}: the weights claim {claimed} bytes but hold {held} (overlapping or stride-0 tensors)")
    bad_count, first_bad = 0, None
    for key, tensor in state.items():
        if tensor.is_floating_point() or tensor.is_complex():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad and first_bad is None:
                first_bad = key
            bad_count += bad
    if bad_count:
        raise ValueError(f"{what}: {bad_count} weights are not finite (NaN or inf), the first in {first_bad!r}")
