"""Triton nearest-codeword search: ``_nearest_codeword_kernel`` and its launcher.

One program takes ``BLOCK_N`` rows of one group and scans the codebook in ``BLOCK_K`` tiles.
Each tile's scores ``||e||^2 - 2 z . e`` come from ``tl.dot`` over D in ``BLOCK_D`` chunks with
float32 accumulation (bfloat16/float16 tiles go to the tensor cores as they are and are upcast
only in registers; nothing is copied to float32 in memory). A running (min, argmin) per row is
merged tile by tile with a strict ``<`` while k grows, so ties keep the lowest index; non-finite
scores count as ``+inf``, and a row without any finite score keeps index 0. The winner's
distance is then recomputed exactly as ``sum((z - e)**2)`` in float32.

float32 dot precision: IEEE float32 (``"ieee"``) by default; TF32 (``"tf32"``) only on a real GPU
when ``torch.get_float32_matmul_precision()`` is not ``"highest"``, the same switch that makes a
plain PyTorch ``z @ e.T`` use TF32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kepler.kernels._common import check_groups, check_launchable, launch, pick_covering


class NearestCodewordConfig(NamedTuple):
    BLOCK_N: int
    BLOCK_K: int
    BLOCK_D: int
    num_warps: int
    num_stages: int


# The launcher's only choices, by the D chunk (the smallest of 16/32/64 that covers D, 64 for
# larger D) and the input width; the ahead-of-time compile tests build every one of them.
# 16-bit tiles are half the size of float32 ones, so they afford wider codebook tiles.
_FLOAT32_CONFIGS = tuple(
    NearestCodewordConfig(BLOCK_N=64, BLOCK_K=64, BLOCK_D=block_d, num_warps=4, num_stages=2) for block_d in (16, 32, 64)
)
_16_BIT_CONFIGS = tuple(config._replace(BLOCK_K=128) for config in _FLOAT32_CONFIGS)
CONFIGS = _FLOAT32_CONFIGS + _16_BIT_CONFIGS


def pick_config(D: int, dtype: torch.dtype) -> NearestCodewordConfig:
    """The kernel configuration the launcher uses for rows of ``D`` elements of ``dtype``."""
    return pick_covering(_FLOAT32_CONFIGS if dtype == torch.float32 else _16_BIT_CONFIGS, D, "BLOCK_D")


def fp32_dot_precision(device: torch.device) -> str:
    """``"tf32"`` when PyTorch itself would use TF32 for a float32 matmul on ``device``, else ``"ieee"``."""
    if device.type == "cuda" and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


@triton.jit
def _nearest_codeword_kernel(
    z_ptr, e_ptr, indices_ptr, sq_dist_ptr,
    N, K, D,
    stride_zg, stride_zn, stride_zd,
    stride_eg, stride_ek, stride_ed,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    group = tl.program_id(1).to(tl.int64)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_n < N
    z_rows = z_ptr + group * stride_zg + offs_n[:, None] * stride_zn  # (BLOCK_N, 1)
    e_group = e_ptr + group * stride_eg  # stride_eg is 0 for a codebook shared by all groups
    arange_k = tl.arange(0, BLOCK_K)
    arange_d = tl.arange(0, BLOCK_D)

    best_score = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
    best_index = tl.zeros((BLOCK_N,), dtype=tl.int64)
    for k_start in range(0, K, BLOCK_K):
        offs_k = k_start + arange_k.to(tl.int64)
        code_mask = offs_k < K
        e_rows = e_group + offs_k[:, None] * stride_ek  # (BLOCK_K, 1)
        dots = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        code_sq_norms = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for d_start in range(0, D, BLOCK_D):
            offs_d = d_start + arange_d
            d_mask = offs_d < D
            z_tile = tl.load(z_rows + offs_d.to(tl.int64)[None, :] * stride_zd, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
            e_tile = tl.load(e_rows + offs_d.to(tl.int64)[None, :] * stride_ed, mask=code_mask[:, None] & d_mask[None, :], other=0.0)
            e_f32 = e_tile.to(tl.float32)
            if DOT_IN_FP32:
                # Exact: a product of two bfloat16 values fits a float32 mantissa.
                z_tile = z_tile.to(tl.float32)
                e_tile = e_f32
            dots = tl.dot(z_tile, tl.trans(e_tile), dots, input_precision=INPUT_PRECISION)
            code_sq_norms += tl.sum(e_f32 * e_f32, axis=1)
        scores = code_sq_norms[None, :] - 2.0 * dots
        # Non-finite scores (NaN, +-inf) and the padding past K never win.
        finite = tl.abs(scores) < float("inf")
        scores = tl.where(finite & code_mask[None, :], scores, float("inf"))
        tile_best = tl.min(scores, axis=1)
        # Lowest k among the tile's minima (tl.argmin does not promise which tie it returns).
        tile_index = tl.min(tl.where(scores == tile_best[:, None], offs_k[None, :], K), axis=1)
        improved = tile_best < best_score
        best_score = tl.where(improved, tile_best, best_score)
        best_index = tl.where(improved, tile_index, best_index)

    # Exact distance to the winner; best_index is always in [0, K), so the gather stays in bounds.
    winner_rows = e_group + best_index[:, None] * stride_ek
    sq_dist = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d_start in range(0, D, BLOCK_D):
        offs_d = d_start + arange_d
        mask = row_mask[:, None] & (offs_d < D)[None, :]
        z_tile = tl.load(z_rows + offs_d.to(tl.int64)[None, :] * stride_zd, mask=mask, other=0.0).to(tl.float32)
        e_tile = tl.load(winner_rows + offs_d.to(tl.int64)[None, :] * stride_ed, mask=mask, other=0.0).to(tl.float32)
        diff = z_tile - e_tile
        sq_dist += tl.sum(diff * diff, axis=1)

    out_offsets = group * N + offs_n
    tl.store(indices_ptr + out_offsets, best_index, mask=row_mask)
    tl.store(sq_dist_ptr + out_offsets, sq_dist, mask=row_mask)


def nearest_codeword_triton(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codeword of every row of ``z`` with the Triton kernel.

    Args:
        z: (G, N, D) float32/bfloat16/float16, any strides.
        codebook: (Gc, K, D) with Gc in {1, G}, same dtype and device as ``z``, any strides; K >= 1.

    Returns:
        indices (G, N) int64 and sq_dist (G, N) float32, contiguous.

    CUDA tensors, or CPU tensors when the Triton interpreter is on (``TRITON_INTERPRET=1``).
    """
    op = "nearest_codeword_triton"
    check_launchable(op, {"z": z, "codebook": codebook})
    if z.dim() != 3 or codebook.dim() != 3:
        raise ValueError(
            f"{op}: expected z (G, N, D) and codebook (Gc, K, D), got {tuple(z.shape)} and {tuple(codebook.shape)}"
        )
    G, N, D = z.shape
    code_groups, K, code_dim = codebook.shape
    if code_dim != D or code_groups not in (1, G) or K == 0:
        raise ValueError(
            f"{op}: codebook {tuple(codebook.shape)} does not fit z {tuple(z.shape)}: need (1 or G, K >= 1, D)"
        )
    if codebook.dtype != z.dtype:
        raise TypeError(f"{op}: z and codebook must share one dtype, got {z.dtype} and {codebook.dtype}")
    check_groups(op, G)

    indices = torch.empty(G, N, dtype=torch.int64, device=z.device)
    sq_dist = torch.empty(G, N, dtype=torch.float32, device=z.device)
    if N == 0 or G == 0:
        return indices, sq_dist
    config = pick_config(D, z.dtype)
    launch(
        _nearest_codeword_kernel,
        (triton.cdiv(N, config.BLOCK_N), G),
        device=z.device,
        z_ptr=z, e_ptr=codebook, indices_ptr=indices, sq_dist_ptr=sq_dist,
        N=N, K=K, D=D,
        stride_zg=z.stride(0), stride_zn=z.stride(1), stride_zd=z.stride(2),
        stride_eg=codebook.stride(0) if code_groups > 1 else 0, stride_ek=codebook.stride(1), stride_ed=codebook.stride(2),
        INPUT_PRECISION=fp32_dot_precision(z.device) if z.dtype == torch.float32 else "ieee",
        # The Triton interpreter multiplies bfloat16 dot operands as their raw uint16 bits (triton
        # 3.8, interpreter.py create_dot): give it float32 tiles instead. GPUs take the native path.
        DOT_IN_FP32=z.device.type != "cuda" and z.dtype == torch.bfloat16,
        **config._asdict(),
    )  # fmt: skip
    return indices, sq_dist
