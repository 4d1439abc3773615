"""What the ops in ``kepler.ops`` share: input dtypes, the input check, registration and the backend switch.

Every op registers the same way (:func:`register_op`) and its ``<Op>Function`` reaches the kernels
through one switch (:func:`registered_op`); see ``kepler/ops/__init__.py`` for the template.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch

from kepler import _ext
from kepler.kernels._common import KERNEL_DTYPES
from kepler.ops import OPS

# What every op's functional accepts: the kernel dtypes, and float64 where choose_backend allows it.
INPUT_DTYPES = KERNEL_DTYPES + (torch.float64,)


def check_input(name: str, value) -> None:
    """The check every functional starts with: ``value`` is a tensor of one of ``INPUT_DTYPES``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in INPUT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {value.dtype}")


def _launcher_module(name: str) -> str:
    """The module of kernel op ``kepler::<name>``'s Triton launcher, from the op inventory."""
    for op in OPS:
        if name in op.registered_ops:
            return op.launcher_module
    raise ValueError(f"kepler::{name} is no kernel op of the op inventory kepler.ops.OPS; add it there first")


def register_op(name: str, schema: str, fake: Callable) -> None:
    """Register ``kepler::<name>``'s fake and the Triton op ``kepler::<name>_triton``.

    Args:
        name: a kernel op of the inventory (``OpRecord.registered_ops`` of :data:`kepler.ops.OPS`),
            e.g. ``"kepler_kl_backward"``; its schema lives in ``csrc/kepler.cpp``, and its fake is
            registered here when ``kepler._C`` is built and defines it (a ``kepler._C`` built before
            the op was added does not: the op then runs on the Triton and reference backends, see
            :func:`kepler._backend.choose_backend`).
        schema: the argument and return list both ops share, e.g. ``"(Tensor y, float t) -> Tensor"``.
        fake: output shapes and dtypes from the inputs' (for ``torch.compile`` and ``opcheck``).

    The Triton launcher ``<name>_triton`` is in the op's ``OpRecord.launcher_module``. It is imported
    on the first call, so ``import kepler`` does not import triton; it is called with the schema's
    argument names as keywords.
    """
    launcher_module = _launcher_module(name)
    if _ext.HAS_CPU_EXT and hasattr(torch.ops.kepler, name):
        torch.library.register_fake(f"kepler::{name}", fake)
    launcher_name = f"{name}_triton"
    argument_names = [argument.name for argument in torch._C.parse_schema(f"kepler::{launcher_name}{schema}").arguments]

    def run_launcher(*args):
        launcher = getattr(importlib.import_module(launcher_module), launcher_name)
        return launcher(**dict(zip(argument_names, args)))

    # custom_op rather than triton_op: triton_op uses the launcher as its own fake implementation,
    # and under TRITON_INTERPRET=1 (how CPU-only CI runs the kernels) wrap_triton hands back the
    # interpreted kernel, which would then run on fake tensors and fail.
    triton_op = torch.library.custom_op(f"kepler::{launcher_name}", run_launcher, mutates_args=(), schema=schema)
    triton_op.register_fake(fake)


def registered_op(name: str, backend: str):
    """The registered op that runs ``kepler::<name>`` on a kernel backend.

    ``torch.ops.kepler.<name>`` for ``"cpu"`` and ``"cuda"`` (the dispatcher routes by the
    tensors' device), ``torch.ops.kepler.<name>_triton`` for ``"triton"``. The ``"reference"``
    backend has no registered op: the functionals run it through plain autograd.
    """
    if backend == "triton":
        return getattr(torch.ops.kepler, f"{name}_triton")
    if backend in ("cpu", "cuda"):
        return getattr(torch.ops.kepler, name)
    raise ValueError(f"no registered op runs kepler::{name} on backend {backend!r}")
