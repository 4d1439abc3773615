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
import pickletools
import warnings
import zipfile
import zlib
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

    A zip-format file (what ``torch.save`` writes) is first checked member by member against the
    CRC-32s its archive records: torch's reader does not check them, so a bit-flipped or badly
    copied file would otherwise load with wrong weights.

    Two ways to let a file ask for ``"module.name"`` globals beyond weights_only's own, each only for
    the names the caller passes:

    * ``trusted_globals``: each is imported and unpickling may run its code (only for a file the
      user trusts);
    * ``stubbed_globals``: each is read as an inert :class:`GlobalPlaceholder` that keeps the
      arguments it was given and runs nothing; for objects beside the weights that the caller does
      not need (a Lightning checkpoint's callbacks or OmegaConf hyper-parameters). Modules torch
      blocks (:data:`TORCH_BLOCKED_MODULES`: ``os``, ``posix``, ``sys``, ``nt``) stay refused.

    Raises :class:`RefusedGlobals` (a ValueError, one line, starting with ``what``) for a file that
    asks for globals the caller may allow, ValueError for a damaged file, one that asks for a module
    torch blocks, or one torch cannot read.
    """
    _check_archive(source, what)
    allowed = [(_import_global(name), name) for name in trusted_globals]
    allowed += [(type(name.rpartition(".")[2], (GlobalPlaceholder,), {"name": name}), name) for name in stubbed_globals]
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
            # A plain pickle of protocol > 2 draws a warning before its refusal below says more.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(stream, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        asked = _file_globals(source)
        blocked = [name for name in asked if name.split(".")[0] in TORCH_BLOCKED_MODULES]
        if blocked:  # whatever the caller allows, torch never unpickles these
            raise ValueError(f"{what} asks for {blocked[0]}, from a module torch never unpickles; refused to "
                             "unpickle it") from None
        names = sorted(set(asked) - _weights_only_globals() - {*trusted_globals, *stubbed_globals})
        if not names:  # not a question of globals: an opcode or a format torch does not read
            raise ValueError(f"{what} could not be read as weights: {_unpickler_error(str(exc))}") from None
        raise RefusedGlobals(f"{what} holds more than tensors and plain containers (it asks for {', '.join(names)}); "
                             "refused to unpickle it", names) from None
    except Exception as exc:
        raise ValueError(f"{what} could not be read: {error_line(exc)}") from None


# torch.load(weights_only=True) refuses any global of these modules, whatever safe_globals says.
TORCH_BLOCKED_MODULES = ("sys", "os", "posix", "nt")


def _weights_only_globals() -> set[str]:
    """The globals weights_only reads without being asked (tensor rebuilding, ordered dicts, ...)."""
    from torch._weights_only_unpickler import _get_allowed_globals

    return set(_get_allowed_globals())


def _unpickler_error(message: str) -> str:
    """The reason in torch's weights-only paragraph (e.g. ``Unsupported operand 149``: a plain pickle
    of a newer protocol than torch's), else its first line."""
    if "WeightsUnpickler error:" not in message:
        return message.strip().splitlines()[0] if message.strip() else "unreadable"
    lines = [line.strip() for line in message.split("WeightsUnpickler error:", 1)[1].splitlines() if line.strip()]
    return lines[0] if lines else "torch's weights-only unpickler refused it"


def _check_archive(source: str | os.PathLike | bytes, what: str) -> None:
    """ValueError unless a zip-format file's members match their recorded CRC-32s (nothing to check
    for a legacy, non-zip file)."""
    stream = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    with stream:
        if not zipfile.is_zipfile(stream):
            return
        try:
            with zipfile.ZipFile(stream) as archive:
                damaged = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as exc:
            raise ValueError(f"{what} is damaged (its zip archive cannot be read: {error_line(exc)}); refused") from None
    if damaged is not None:
        raise ValueError(f"{what} is damaged: {damaged} does not match the CRC-32 its archive records (a bit flip "
                         "or a bad copy); refused")


def _file_globals(source: str | os.PathLike | bytes) -> list[str]:
    """Every ``module.name`` global the file's pickles ask for, read off their opcodes without running
    anything: torch lists a zip-format file's; a legacy or plain pickle is scanned here."""
    stream = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    with stream:
        if zipfile.is_zipfile(stream):
            stream.seek(0)
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(stream))
        stream.seek(0)
        return _pickle_globals(stream)


def _pickle_globals(stream) -> list[str]:
    """The globals of the pickles one after another in ``stream`` (torch's legacy format is several),
    from ``GLOBAL`` opcodes and ``STACK_GLOBAL``'s two preceding strings."""
    found: list[str] = []
    while True:
        strings: list[str] = []
        try:
            for opcode, argument, _ in pickletools.genops(stream):
                if opcode.name == "GLOBAL":
                    found.append(str(argument).replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(argument, str):
                    strings.append(argument)
        except Exception:  # the end of the file, or bytes that are no pickle: what was read stands
            return found


def _import_global(name: str) -> Any:
    """The object a pickle's ``GLOBAL module.name`` refers to; ValueError naming ``name`` otherwise."""
    module_name, _, attribute = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"trusted global {name!r} is not an importable module.name") from None


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

    Checked: ``state`` maps names to tensors; no key missing, unexpected, of another shape than
    ``module``'s or of another kind of dtype (a float for a float, an integer or flag of the same
    dtype; ``module`` may live on the ``meta`` device); the tensors hold as many bytes as they
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
    # A float may be stored in another float dtype (a bf16 export); integers and flags must be theirs.
    retyped = [k for k in expected if k in state and (state[k].dtype != expected[k].dtype and not (
        state[k].is_floating_point() and expected[k].is_floating_point()))]
    if missing or unexpected or mismatched or retyped:
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
        if retyped:
            first = retyped[0]
            problems.append(f"{len(retyped)} of another dtype ({first!r}: {state[first].dtype} in the file, "
                            f"{expected[first].dtype} in the model{', ...' if len(retyped) > 1 else ''})")
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


def averaged_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of what a moving average of ``module``'s weights holds (a checkpoint's
    ``"ema"`` entry): every floating-point parameter, under every name of a shared one, so that the
    averages cover each of its state-dict keys; buffers are not averaged."""
    return [(name, p) for name, p in module.named_parameters(remove_duplicate=False) if p.is_floating_point()]


def check_ema_weights(module: nn.Module, ema: Any, what: str, weights: Mapping | None = None) -> dict:
    """The state dict ``weights`` (default: ``module``'s own) with the parameters of ``ema`` (a
    checkpoint's ``"ema"`` entry: the moving averages by parameter name) in place of the trained
    ones, checked: ``ema`` names exactly ``module``'s floating-point parameters (no buffer, nothing
    missing), and the result passes :func:`check_state_dict`. ValueError, one line starting with
    ``what``, otherwise."""
    if not isinstance(ema, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in ema.items()):
        raise ValueError(f"{what}: the weights are not a mapping of names to tensors")
    names = [name for name, _ in averaged_parameters(module)]
    known = set(names)
    missing = [k for k in names if k not in ema]
    unexpected = [k for k in ema if k not in known]
    if missing or unexpected:
        problems = ([f"{len(missing)} missing ({_names(missing)})"] if missing else []) + (
            [f"{len(unexpected)} not a floating-point parameter ({_names(unexpected)})"] if unexpected else [])
        raise ValueError(f"{what}: the averages do not match the model's parameters: keys " + "; ".join(problems))
    merged = {**(module.state_dict() if weights is None else weights), **ema}
    check_state_dict(module, merged, what)
    return merged
