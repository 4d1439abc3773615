"""What every Triton launcher in ``kepler.kernels`` shares: dtypes, limits, checks, configs, launch.

A leaf module: it imports torch and nothing from triton or kepler, so ``kepler._backend`` and
``kepler.ops`` can use it without importing triton. Every launcher

* checks its inputs with :func:`check_launchable` (and :func:`check_groups` when grid axis 1
  holds the groups), plus the shape checks its kernel needs to stay in bounds;
* picks its ``<Op>Config`` with :func:`pick_covering`;
* launches through :func:`launch`, which makes the tensors' CUDA device current: Triton launches
  on the current device, so a tensor on ``cuda:1`` while ``cuda:0`` is current would otherwise
  run on the wrong GPU.
"""

from __future__ import annotations

import contextlib
import os
from typing import NamedTuple, Sequence, TypeVar

import torch

# What every Triton (and compiled) kernel takes; float64 (gradcheck, oracles) is the reference's.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Grid axes 1 and 2 are capped at 65535 programs by CUDA; axis 1 holds the group where there is one.
MAX_GROUPS = 65535

Config = TypeVar("Config")


class TileConfig(NamedTuple):
    """Block sizes and launch options of a kernel over (BLOCK_M, BLOCK_N) tiles of pairs whose dot
    products run over D in BLOCK_D chunks (``packing_energy``, ``code_entropy``)."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_D: int
    num_warps: int
    num_stages: int


# 64 x 64 tiles with the D chunk the smallest of 16/32/64 covering D (64 for larger D).
D_CHUNK_CONFIGS = tuple(TileConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_D=block_d, num_warps=4, num_stages=2)
                        for block_d in (16, 32, 64))


def triton_interpreter_on() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def check_launchable(op: str, inputs: dict[str, torch.Tensor]) -> None:
    """The checks every launcher shares, on its tensor arguments by name.

    The first tensor is the op's input: its dtype must be one of ``KERNEL_DTYPES``. Every tensor
    must be on its device, and that device must be CUDA, or the CPU with the interpreter on.
    """
    (first_name, first), *others = inputs.items()
    if first.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{op}: {first_name} must be float32, bfloat16 or float16, got {first.dtype}")
    for name, tensor in others:
        if tensor.device != first.device:
            raise ValueError(f"{op}: {name} is on {tensor.device} but {first_name} is on {first.device}")
    if first.device.type != "cuda" and not triton_interpreter_on():
        raise ValueError(f"{op}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {first.device.type}")


def check_groups(op: str, groups: int) -> None:
    """Refuse more groups than grid axis 1 can hold."""
    if groups > MAX_GROUPS:
        raise ValueError(f"{op}: at most {MAX_GROUPS} groups, got G={groups}")


def check_search_shapes(op: str, z: torch.Tensor, codebook: torch.Tensor) -> None:
    """The checks of a launcher that scores rows against codewords (``nearest_codeword``,
    ``code_entropy``): z (G, N, D), codebook (1 or G, K >= 1, D) of z's dtype, G on one grid axis."""
    if z.dim() != 3 or codebook.dim() != 3:
        raise ValueError(
            f"{op}: expected z (G, N, D) and codebook (Gc, K, D), got {tuple(z.shape)} and {tuple(codebook.shape)}"
        )
    groups, _, dim = z.shape
    code_groups, codes, code_dim = codebook.shape
    if code_dim != dim or code_groups not in (1, groups) or codes == 0:
        raise ValueError(
            f"{op}: codebook {tuple(codebook.shape)} does not fit z {tuple(z.shape)}: need (1 or G, K >= 1, D)"
        )
    if codebook.dtype != z.dtype:
        raise TypeError(f"{op}: z and codebook must share one dtype, got {z.dtype} and {codebook.dtype}")
    check_groups(op, groups)


def pick_covering(configs: Sequence[Config], size: int, block: str) -> Config:
    """The first of ``configs`` (in ascending ``block``) whose ``block`` field covers ``size``, else the last.

    A launcher's ``pick_config`` picks with this from its ``CONFIGS`` (nearest_codeword's first
    narrows them by dtype and row count): the ahead-of-time compile tests sweep sizes through
    ``pick_config`` and build every configuration it can return.
    """
    for config in configs:
        if size <= getattr(config, block):
            return config
    return configs[-1]


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Makes ``device`` the current CUDA device (nothing to do for CPU tensors in the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def fp32_dot_precision(device: torch.device) -> str:
    """``"tf32"`` when PyTorch itself would use TF32 for a float32 matmul on ``device``, else ``"ieee"``.

    The one rule for a kernel's float32 ``tl.dot`` (its ``input_precision``): TF32 only on a real
    GPU when ``torch.get_float32_matmul_precision()`` is not ``"highest"``, the same switch that
    makes a plain PyTorch ``z @ e.T`` use TF32.
    """
    if device.type == "cuda" and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def launch(kernel, grid: tuple[int, ...], *, device: torch.device, **arguments) -> None:
    """``kernel[grid](**arguments)`` on ``device``: the one way a launcher runs a kernel.

    ``arguments`` are the kernel's by name, plus the launch options (``num_warps``,
    ``num_stages``); an ``<Op>Config`` passes its block sizes and options as ``**config._asdict()``.
    """
    with device_guard(device):
        kernel[grid](**arguments)
