"""Triton closest lattice point: ``_closest_lattice_point_kernel`` and its launcher.

The closest point of ``Z^n``, ``D_n``, ``A2`` or ``E8`` to every row of ``x: (N, n)``, following the
numerics of :mod:`kepler.reference.closest_lattice_point` to the bit (bar distance ties). One program
takes ``BLOCK_N`` rows as a ``(BLOCK_N, BLOCK_D)`` tile, ``BLOCK_D`` the smallest power of two
holding a row, and the lattice family is a constexpr, so each family compiles to its own
straight-line code. Columns past ``n`` (``Z`` and ``D`` only: ``A2`` and ``E8`` rows fill their
tiles) are masked and loaded as 0: they round to 0 with a residual of 0, so they are even and never
the first of the largest residuals. Everything is float32 in registers whatever the input dtype.

Memory bound: a row is read once and written once (``n`` elements in, ``4 n`` bytes out), with a
few dozen flops per element. A program takes ``BLOCK_N * BLOCK_D = 1024`` elements on 4 warps, 8 per
thread: 4 KB of float32 out and 2-4 KB in, about what a block of PyTorch's own elementwise kernels
moves (128 threads, a few elements each). That is already enough bytes in flight per SM with the
dozen or so such programs an SM holds at once (they need few registers and no shared memory), and
leaves many programs to balance across SMs (1e6 rows of 8 give 7813, about 60 per H100 SM); smaller
programs would pay their start-up more often. When the rows lie packed in memory (``PACKED``:
``n == BLOCK_D`` and strides ``(n, 1)``, the common contiguous ``n = 4`` or ``8``) the tile is
addressed with constants and masked by row only, so its loads and stores compile to vector accesses
(16 bytes wide for float32 rows of 4 and 8, given the 16-byte aligned pointers Triton specializes
on); other layouts take the strided path with a column mask (scalar accesses, still coalesced).

Numerics, as the reference states them:

* Round half to even: ``(|x| + 2**23) - 2**23`` (float32 addition at ``2**23`` has unit spacing
  and rounds ties to even), the sign put back, ``|x| >= 2**23`` (already integral) as it is. libdevice
  ``rint`` would be one instruction on a GPU, but the interpreter cannot run libdevice (triton 3.8).
* ``D_n``: parity is the count of odd rounded coordinates; the coordinate moved is the lowest index
  among the row's largest ``|x - round(x)|`` (max, then min index among the equals), one step
  towards ``x``.
* ``E8``, ``A2``: the second candidate wins only when its squared distance is strictly smaller.
  ``A2``'s spacing is the float32 ``sqrt(3)``; divisions by it are correctly rounded (``tl.div_rn``:
  a float32 ``/`` is approximate on a GPU).
* Floating-point fusion is off for this kernel (``enable_fp_fusion=False``): a fused multiply-add
  would round ``A2``'s ``k * spacing + shift`` once instead of twice, off by an ulp from the
  reference, and would change the sums of squares too.
* A row holding NaN or +-inf gives a NaN row.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kepler._numerics import check_lattice_family
from kepler.kernels._common import check_launchable, launch, pick_covering

# From 2**23 on every float32 is an integer, and adding 2**23 to a smaller magnitude leaves a sum in
# [2**23, 2**24), where float32 has unit spacing: the addition itself rounds half to even.
_EXACT_INTEGERS = tl.constexpr(2.0**23)
# A2's spacing: sqrt(3) rounded to float32 as the reference rounds it (so the literal is exact).
_ROOT3_FLOAT32 = tl.constexpr(torch.tensor(math.sqrt(3.0), dtype=torch.float32).item())

# Elements per program (see the module docstring); the widest row one tile holds.
ELEMENTS_PER_PROGRAM = 1024
MAX_ROW = 1024


class ClosestLatticePointConfig(NamedTuple):
    BLOCK_N: int
    BLOCK_D: int
    num_warps: int = 4
    # Every product and sum rounds on its own, as in the reference (see the module docstring).
    enable_fp_fusion: bool = False


# The launcher's only choices: the smallest BLOCK_D (a power of two) holding a row; the
# ahead-of-time compile tests build every one of them, for every family and both layouts.
CONFIGS = tuple(
    ClosestLatticePointConfig(BLOCK_N=ELEMENTS_PER_PROGRAM // block_d, BLOCK_D=block_d)
    for block_d in (2**power for power in range(MAX_ROW.bit_length()))
)


def pick_config(n: int) -> ClosestLatticePointConfig:
    """The kernel configuration for rows of ``n`` elements (``n <= MAX_ROW``). The same for every
    input dtype: the float32 output is most of the traffic either way."""
    return pick_covering(CONFIGS, n, "BLOCK_D")


@triton.jit
def _round_half_even(x):
    """``rint(x)`` elementwise, float32: the nearest integer, ties to even."""
    magnitude = tl.abs(x)
    rounded = (magnitude + _EXACT_INTEGERS) - _EXACT_INTEGERS
    return tl.where(magnitude < _EXACT_INTEGERS, tl.where(x < 0.0, -rounded, rounded), x)


@triton.jit
def _closest_checkerboard(x, cols, BLOCK_D: tl.constexpr):
    """``D_n``'s closest point to every row of the (rows, BLOCK_D) float32 tile ``x``."""
    rounded = _round_half_even(x)
    residual = x - rounded
    half = rounded * 0.5  # exact; an integer exactly when rounded is even
    odd_count = tl.sum((tl.floor(half) != half).to(tl.int32), axis=1)
    distance = tl.abs(residual)
    largest = tl.max(distance, axis=1)
    # The first index among the largest (tl.argmax does not promise which tie it returns).
    worst = tl.min(tl.where(distance == largest[:, None], cols[None, :], BLOCK_D), axis=1)
    moved = (cols[None, :] == worst[:, None]) & (odd_count % 2 == 1)[:, None]
    return tl.where(moved, rounded + tl.where(residual >= 0.0, 1.0, -1.0), rounded)


@triton.jit
def _closer(x, first, second):
    """Row by row, ``second`` where it is strictly nearer ``x`` than ``first``, else ``first``."""
    first_diff = x - first
    second_diff = x - second
    first_sq = tl.sum(first_diff * first_diff, axis=1)
    second_sq = tl.sum(second_diff * second_diff, axis=1)
    return tl.where((second_sq < first_sq)[:, None], second, first)


@triton.jit
def _closest_lattice_point_kernel(
    x_ptr, out_ptr,
    N, n,
    stride_xn, stride_xd,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PACKED: tl.constexpr, LATTICE: tl.constexpr,
):  # fmt: skip
    """out (N, n) float32, contiguous: the closest point of family ``LATTICE`` to every row of x."""
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    row_mask = offs_n < N
    if PACKED:
        # Rows of exactly BLOCK_D contiguous elements: offsets and mask constant along a row.
        x_offsets = offs_n[:, None] * BLOCK_D + cols[None, :]
        out_offsets = x_offsets
        mask = row_mask[:, None]
    else:
        x_offsets = offs_n[:, None] * stride_xn + cols.to(tl.int64)[None, :] * stride_xd
        out_offsets = offs_n[:, None] * n + cols[None, :]
        mask = row_mask[:, None] & (cols < n)[None, :]
    x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(tl.float32)
    # NaN compares false: a row is finite when every |x| is below inf. Others are worked on as 0
    # (their result is NaN anyway), as the reference does.
    row_finite = tl.max(tl.where(tl.abs(x) < float("inf"), 0, 1), axis=1) == 0
    x = tl.where(row_finite[:, None], x, 0.0)

    if LATTICE == "Z":
        points = _round_half_even(x)
    elif LATTICE == "D":
        points = _closest_checkerboard(x, cols, BLOCK_D)
    elif LATTICE == "E8":
        half_integral = _closest_checkerboard(x - 0.5, cols, BLOCK_D) + 0.5
        points = _closer(x, _closest_checkerboard(x, cols, BLOCK_D), half_integral)
    else:  # A2: the rectangular lattice Z x sqrt(3) Z and its translate by half a spacing
        spacing = tl.where(cols == 0, 1.0, _ROOT3_FLOAT32)[None, :]
        shift = spacing * 0.5
        rectangular = _round_half_even(tl.div_rn(x, spacing)) * spacing
        shifted = _round_half_even(tl.div_rn(x - shift, spacing)) * spacing + shift
        points = _closer(x, rectangular, shifted)

    points = tl.where(row_finite[:, None], points, float("nan"))
    tl.store(out_ptr + out_offsets, points, mask=mask)


def closest_lattice_point_triton(x: torch.Tensor, lattice: str) -> torch.Tensor:
    """Closest point of lattice family ``lattice`` to every row of ``x`` with the Triton kernel.

    Args:
        x: (N, n) float32/bfloat16/float16, any strides; ``1 <= n <= MAX_ROW``, and ``n`` must be
            2 for ``"A2"`` and 8 for ``"E8"``.
        lattice: ``"Z"`` (``Z^n``), ``"D"`` (``D_n``), ``"A2"`` or ``"E8"``.

    Returns:
        (N, n) float32, contiguous: the lattice points, NaN rows where ``x``'s row is not finite.

    CUDA tensors, or CPU tensors when the Triton interpreter is on (``TRITON_INTERPRET=1``).
    """
    op = "closest_lattice_point_triton"
    check_launchable(op, {"x": x})
    if x.dim() != 2 or x.shape[1] < 1:
        raise ValueError(f"{op}: x must be (N, n) with n >= 1, got shape {tuple(x.shape)}")
    check_lattice_family(op, lattice, x.shape)
    N, n = x.shape
    if n > MAX_ROW:
        raise ValueError(f"{op}: {lattice} takes rows of at most {MAX_ROW} here, got x of shape {tuple(x.shape)}")

    out = torch.empty(N, n, dtype=torch.float32, device=x.device)
    if N == 0:
        return out
    config = pick_config(n)
    launch(
        _closest_lattice_point_kernel,
        (triton.cdiv(N, config.BLOCK_N),),
        device=x.device,
        x_ptr=x, out_ptr=out,
        N=N, n=n,
        stride_xn=x.stride(0), stride_xd=x.stride(1),
        PACKED=n == config.BLOCK_D and x.stride() == (n, 1),
        LATTICE=lattice,
        **config._asdict(),
    )  # fmt: skip
    return out
