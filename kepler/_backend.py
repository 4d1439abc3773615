"""Backend choice for every kepler op: explicit argument > ``KEPLER_BACKEND`` > ``auto``.

Backends, all with the same contract per op:

* ``reference``: plain PyTorch (``kepler.reference``), the spec; runs anywhere.
* ``cpu``: C++ kernels in ``kepler._C`` for CPU tensors.
* ``cuda``: CUDA kernels in ``kepler._C`` for CUDA tensors.
* ``triton``: Triton kernels (``kepler.kernels``) for CUDA tensors, and for CPU tensors when the
  Triton interpreter is on (``TRITON_INTERPRET=1``), which is how CPU-only CI tests them.

``auto`` picks the first available in :data:`AUTO_ORDER` for the tensors' device: ``triton`` >
``cuda`` > ``reference`` on a GPU, ``cpu`` > ``reference`` on the CPU. On a GPU ``triton`` comes
first because the CUDA kernels have not yet run on a real GPU: they are compiled for sm_80/sm_90
but tested only on CPU-only machines, and are written to be simple rather than fast (no tensor
cores in nearest_codeword). ``cuda`` goes first once ``benchmarks/gpu_check.sh`` has shown them
correct and faster on a GPU. An explicit request that cannot be served raises; ``auto`` falls back
quietly and logs the choice at debug level.
"""

from __future__ import annotations

import functools
import logging
import os

import torch

from kepler import _ext
from kepler.kernels._common import triton_interpreter_on

log = logging.getLogger("kepler")

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "KEPLER_BACKEND"
# auto's preference per device type (why triton leads on CUDA: the module docstring).
AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the machine
        log.debug("triton not importable: %s", exc)
        return False
    return True


def _unavailable_reason(backend: str, device_type: str) -> str | None:
    """None if ``backend`` can run on ``device_type`` here, else a human-readable reason."""
    if backend == "reference":
        return None
    if backend in ("cpu", "cuda"):
        if device_type != backend:
            return f"the {backend!r} backend runs on {backend.upper()} tensors, got {device_type} tensors"
        if not _ext.HAS_CPU_EXT:
            return f"kepler._C is not built ({_ext.EXT_IMPORT_ERROR}); {_ext.INSTALL_HINT}"
        if backend == "cuda" and not _ext.HAS_CUDA_EXT:
            return f"kepler._C was built without CUDA kernels; {_ext.INSTALL_HINT}"
        return None
    if backend == "triton":
        if not _triton_importable():
            return "triton is not installed (pip install triton)"
        if device_type == "cuda":
            return None
        if device_type == "cpu" and triton_interpreter_on():
            return None
        return (
            f"the 'triton' backend needs CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors; "
            f"got {device_type} tensors"
        )
    return f"unknown backend {backend!r}; expected one of {BACKENDS} or 'auto'"


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run here for tensors on ``device`` (default: CUDA if present, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    return [b for b in BACKENDS if _unavailable_reason(b, device_type) is None]


def _requested_choice(requested: str | None) -> str:
    """The backend asked for: the ``backend=`` argument, else ``KEPLER_BACKEND``, else ``auto``."""
    choice = requested if requested is not None else os.environ.get(ENV_VAR) or "auto"
    return choice.strip().lower()


def resolve_backend(requested: str | None, device: torch.device) -> str:
    """Pick the backend for tensors on ``device``.

    ``requested`` (an op's ``backend=`` argument) wins, then ``KEPLER_BACKEND``, then ``auto``.
    Raises ValueError for an unknown name and RuntimeError for a known backend that cannot serve
    this device here.
    """
    choice = _requested_choice(requested)
    device_type = device.type
    if choice == "auto":
        for backend in AUTO_ORDER.get(device_type, ("reference",)):
            if _unavailable_reason(backend, device_type) is None:
                log.debug("kepler backend auto -> %s for %s tensors", backend, device_type)
                return backend
        return "reference"
    if choice not in BACKENDS:
        source = "backend argument" if requested is not None else ENV_VAR
        raise ValueError(f"unknown {source} {choice!r}; expected 'auto' or one of {BACKENDS}")
    reason = _unavailable_reason(choice, device_type)
    if reason is not None:
        raise RuntimeError(f"backend {choice!r} is not available: {reason}")
    return choice


def compiled_kernel_registered(op: str, device_type: str) -> bool:
    """Whether ``kepler._C`` holds a kernel of ``kepler::<op>`` for ``device_type``.

    A ``kepler._C`` built before the op had kernels (a stale editable build) loads fine but would
    fail on the first call, or does not define the op at all; :func:`choose_backend` treats either
    as an unavailable backend instead.
    """
    if not hasattr(torch.ops.kepler, op):
        return False
    dispatch_key = "CUDA" if device_type == "cuda" else "CPU"
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"kepler::{op}", dispatch_key)


# torch.compile runs this once while tracing and keeps the answer (it logs, which dynamo would not
# trace); a later change of KEPLER_BACKEND does not reach an already compiled function.
@torch.compiler.assume_constant_result
def choose_backend(
    op: str,
    requested: str | None,
    device: torch.device,
    dtype: torch.dtype,
    float64_backends: tuple[str, ...] = ("reference",),
) -> str:
    """The backend that runs op ``kepler::<op>`` on ``dtype`` tensors on ``device``.

    :func:`resolve_backend`, then the two checks every op shares: the compiled backends need the
    op's kernel in ``kepler._C``, and float64 runs only on ``float64_backends``. When a check
    fails, a backend the caller named raises (RuntimeError for a missing kernel, TypeError for the
    dtype) and ``auto`` falls back to ``reference``, logging why at debug level.
    """
    backend = resolve_backend(requested, device)
    if backend in ("cpu", "cuda") and not compiled_kernel_registered(op, device.type):
        reason = f"kepler._C has no {op} kernel for {backend}; rebuild it ({_ext.INSTALL_HINT})"
        if _requested_choice(requested) != "auto":
            raise RuntimeError(f"backend {backend!r} is not available: {reason}")
    elif dtype == torch.float64 and backend not in float64_backends:
        reason = f"it takes float32, bfloat16 or float16, got {dtype}; float64 runs on {float64_backends}"
        if _requested_choice(requested) != "auto":
            raise TypeError(f"backend {backend!r} cannot run {op} on {dtype} inputs: {reason}")
    else:
        return backend
    log.debug("kepler %s: %s; using 'reference'", op, reason)
    return "reference"
