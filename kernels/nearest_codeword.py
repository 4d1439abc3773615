"""Triton nearest-codeword search: ``_code_sq_norms_kernel``, ``_nearest_codeword_kernel`` and their launcher.

First ``_code_sq_norms_kernel`` writes every codeword's ``||e||^2`` (float32, upcast in registers)
once per call, instead of every search program recomputing them for every code tile. Then one
search program takes ``BLOCK_N`` rows of one group and scans the codebook in ``BLOCK_K`` tiles.
Each tile's scores ``||e||^2 - 2 z . e`` come from ``tl.dot`` with float32 accumulation
(bfloat16/float16 tiles go to the tensor cores as they are; nothing is copied to float32 in
memory). When D fits one ``BLOCK_D`` chunk (``ONE_D_CHUNK``) z's tile is loaded once and stays
resident while the code tiles stream past (the code loop is the one the compiler pipelines);
otherwise each code tile loops over D in ``BLOCK_D`` chunks. A running (min, argmin) per row is
merged tile by tile with a strict ``<`` while k grows, so ties keep the lowest index; non-finite
scores, and the padding past K (norm ``+inf``), count as ``+inf``; a row without any finite score
keeps index 0. Indices are int32 in the per-score work and int64 once per row at the end. The
winner's distance is then recomputed exactly as ``sum((z - e)**2)`` in float32.

float32 dot precision: IEEE float32 (``"ieee"``) by default; TF32 (``"tf32"``) only on a real GPU
when ``torch.get_float32_matmul_precision()`` is not ``"highest"``, the same switch that makes a
plain PyTorch ``z @ e.T`` use TF32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kepler.kernels._common import check_launchable, check_search_shapes, fp32_dot_precision, launch, pick_covering


class NearestCodewordConfig(NamedTuple):
    BLOCK_N: int
    BLOCK_K: int
    BLOCK_D: int
    ONE_D_CHUNK: bool  # D <= BLOCK_D: z's tile stays resident over the code loop
    num_warps: int
    num_stages: int


class CodeSqNormsConfig(NamedTuple):
    BLOCK_K: int
    BLOCK_D: int
    num_warps: int
    num_stages: int


# From this many rows (over all groups) the search takes 128-row programs on 8 warps: each code
# tile is then read once per 128 rows, and rows / 128 programs still give a 132-SM H100 about two
# waves. Fewer rows take 64-row programs on 4 warps, twice as many programs.
MANY_ROWS = 32768


def _configs(block_n: int, block_k: int, num_warps: int) -> tuple[NearestCodewordConfig, ...]:
    """One family: D in one resident chunk of 16/32/64 (the code loop pipelined three deep), then
    D > 64 in 64-wide chunks (the D loop pipelined two deep: it holds z's chunk too)."""
    resident = tuple(
        NearestCodewordConfig(block_n, block_k, block_d, True, num_warps=num_warps, num_stages=3) for block_d in (16, 32, 64)
    )
    return resident + (resident[-1]._replace(ONE_D_CHUNK=False, num_stages=2),)


# The launcher's only choices, by dtype, row count and D; the ahead-of-time compile tests build
# every one of them. 16-bit tiles are half the size of float32 ones, so they afford wider code tiles.
_FAMILIES = {
    (True, False): _configs(block_n=64, block_k=64, num_warps=4),  # (float32, many rows)
    (True, True): _configs(block_n=128, block_k=64, num_warps=8),
    (False, False): _configs(block_n=64, block_k=128, num_warps=4),
    (False, True): _configs(block_n=128, block_k=128, num_warps=8),
}
CONFIGS = tuple(config for family in _FAMILIES.values() for config in family)
# The norms kernel reads K * D elements once: one configuration serves every D.
SQ_NORMS_CONFIG = CodeSqNormsConfig(BLOCK_K=64, BLOCK_D=64, num_warps=4, num_stages=2)


def pick_config(rows: int, D: int, dtype: torch.dtype) -> NearestCodewordConfig:
    """The search configuration for ``rows`` rows (G * N) of ``D`` elements of ``dtype``."""
    family = _FAMILIES[dtype == torch.float32, rows >= MANY_ROWS]
    config = pick_covering(family[:-1], D, "BLOCK_D")
    return config if D <= config.BLOCK_D else family[-1]


@triton.jit
def _code_sq_norms_kernel(
    e_ptr, sq_norms_ptr,
    K, D,
    stride_eg, stride_ek, stride_ed,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """sq_norms (Gc, K) float32, contiguous: ``sum(e[g, k]**2)`` over D, summed in float32."""
    group = tl.program_id(1).to(tl.int64)
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    code_mask = offs_k < K
    e_rows = e_ptr + group * stride_eg + offs_k.to(tl.int64)[:, None] * stride_ek
    cols = tl.arange(0, BLOCK_D).to(tl.int64)
    sq_norms = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for d_start in range(0, D, BLOCK_D):
        offs_d = d_start + cols
        mask = code_mask[:, None] & (offs_d < D)[None, :]
        e_tile = tl.load(e_rows + offs_d[None, :] * stride_ed, mask=mask, other=0.0).to(tl.float32)
        sq_norms += tl.sum(e_tile * e_tile, axis=1)
    tl.store(sq_norms_ptr + group * K + offs_k, sq_norms, mask=code_mask)


@triton.jit
def _nearest_codeword_kernel(
    z_ptr, e_ptr, code_sq_norms_ptr, indices_ptr, sq_dist_ptr,
    N, K, D,
    stride_zg, stride_zn, stride_zd,
    stride_eg, stride_ek, stride_ed, stride_normg,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, ONE_D_CHUNK: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    group = tl.program_id(1).to(tl.int64)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_n < N
    z_rows = z_ptr + group * stride_zg + offs_n[:, None] * stride_zn  # (BLOCK_N, 1)
    # stride_eg and stride_normg are 0 for a codebook shared by all groups.
    e_group = e_ptr + group * stride_eg
    sq_norms_group = code_sq_norms_ptr + group * stride_normg
    arange_k = tl.arange(0, BLOCK_K)
    cols = tl.arange(0, BLOCK_D).to(tl.int64)  # int64: column offsets times a stride pass 2**31

    if ONE_D_CHUNK:
        chunk_mask = (cols < D)[None, :]
        z_tile = tl.load(z_rows + cols[None, :] * stride_zd, mask=row_mask[:, None] & chunk_mask, other=0.0)
        if DOT_IN_FP32:
            z_tile = z_tile.to(tl.float32)

    best_score = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
    best_index = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for k_start in range(0, K, BLOCK_K):
        offs_k = k_start + arange_k  # int32: K < 2**31
        code_mask = offs_k < K
        e_rows = e_group + offs_k.to(tl.int64)[:, None] * stride_ek  # (BLOCK_K, 1)
        if ONE_D_CHUNK:
            e_tile = tl.load(e_rows + cols[None, :] * stride_ed, mask=code_mask[:, None] & chunk_mask, other=0.0)
            if DOT_IN_FP32:
                e_tile = e_tile.to(tl.float32)
            dots = tl.dot(z_tile, tl.trans(e_tile), input_precision=INPUT_PRECISION)
        else:
            dots = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            for d_start in range(0, D, BLOCK_D):
                offs_d = d_start + cols
                d_mask = (offs_d < D)[None, :]
                z_chunk = tl.load(z_rows + offs_d[None, :] * stride_zd, mask=row_mask[:, None] & d_mask, other=0.0)
                e_chunk = tl.load(e_rows + offs_d[None, :] * stride_ed, mask=code_mask[:, None] & d_mask, other=0.0)
                if DOT_IN_FP32:
                    # Exact: a product of two bfloat16 values fits a float32 mantissa.
                    z_chunk = z_chunk.to(tl.float32)
                    e_chunk = e_chunk.to(tl.float32)
                dots = tl.dot(z_chunk, tl.trans(e_chunk), dots, input_precision=INPUT_PRECISION)
        # The padding past K gets norm +inf, so a score that never wins, like a non-finite one.
        code_sq_norms = tl.load(sq_norms_group + offs_k, mask=code_mask, other=float("inf"))
        scores = code_sq_norms[None, :] - 2.0 * dots
        scores = tl.where(tl.abs(scores) < float("inf"), scores, float("inf"))  # NaN, +-inf -> +inf
        tile_best = tl.min(scores, axis=1)
        # Lowest k among the tile's minima (tl.argmin does not promise which tie it returns).
        tile_index = tl.min(tl.where(scores == tile_best[:, None], offs_k[None, :], K), axis=1)
        improved = tile_best < best_score
        best_score = tl.where(improved, tile_best, best_score)
        best_index = tl.where(improved, tile_index, best_index)

    # Exact distance to the winner; best_index is always in [0, K), so the gather stays in bounds.
    best_index = best_index.to(tl.int64)
    winner_rows = e_group + best_index[:, None] * stride_ek
    if ONE_D_CHUNK:
        mask = row_mask[:, None] & chunk_mask
        e_tile = tl.load(winner_rows + cols[None, :] * stride_ed, mask=mask, other=0.0).to(tl.float32)
        diff = z_tile.to(tl.float32) - e_tile
        sq_dist = tl.sum(diff * diff, axis=1)
    else:
        sq_dist = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for d_start in range(0, D, BLOCK_D):
            offs_d = d_start + cols
            mask = row_mask[:, None] & (offs_d < D)[None, :]
            z_chunk = tl.load(z_rows + offs_d[None, :] * stride_zd, mask=mask, other=0.0).to(tl.float32)
            e_chunk = tl.load(winner_rows + offs_d[None, :] * stride_ed, mask=mask, other=0.0).to(tl.float32)
            diff = z_chunk - e_chunk
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
    check_search_shapes(op, z, codebook)
    G, N, D = z.shape
    code_groups, K, _ = codebook.shape

    indices = torch.empty(G, N, dtype=torch.int64, device=z.device)
    sq_dist = torch.empty(G, N, dtype=torch.float32, device=z.device)
    if N == 0 or G == 0:
        return indices, sq_dist
    stride_eg = codebook.stride(0) if code_groups > 1 else 0
    code_sq_norms = torch.empty(code_groups, K, dtype=torch.float32, device=z.device)
    launch(
        _code_sq_norms_kernel,
        (triton.cdiv(K, SQ_NORMS_CONFIG.BLOCK_K), code_groups),
        device=z.device,
        e_ptr=codebook, sq_norms_ptr=code_sq_norms,
        K=K, D=D,
        stride_eg=stride_eg, stride_ek=codebook.stride(1), stride_ed=codebook.stride(2),
        **SQ_NORMS_CONFIG._asdict(),
    )  # fmt: skip
    config = pick_config(G * N, D, z.dtype)
    launch(
        _nearest_codeword_kernel,
        (triton.cdiv(N, config.BLOCK_N), G),
        device=z.device,
        z_ptr=z, e_ptr=codebook, code_sq_norms_ptr=code_sq_norms, indices_ptr=indices, sq_dist_ptr=sq_dist,
        N=N, K=K, D=D,
        stride_zg=z.stride(0), stride_zn=z.stride(1), stride_zd=z.stride(2),
        stride_eg=stride_eg, stride_ek=codebook.stride(1), stride_ed=codebook.stride(2),
        stride_normg=K if code_groups > 1 else 0,
        INPUT_PRECISION=fp32_dot_precision(z.device) if z.dtype == torch.float32 else "ieee",
        # The Triton interpreter multiplies bfloat16 dot operands as their raw uint16 bits (triton
        # 3.8, interpreter.py create_dot): give it float32 tiles instead. GPUs take the native path.
        DOT_IN_FP32=z.device.type != "cuda" and z.dtype == torch.bfloat16,
        **config._asdict(),
    )  # fmt: skip
    return indices, sq_dist
