"""Triton code entropy: forward kernels ``_code_entropy_fwd_kernel`` and ``_code_entropy_mass_kernel``,
backward kernels ``_code_entropy_bwd_rows_kernel`` and ``_code_entropy_bwd_codes_kernel``, and their launchers.

The contract is ``kepler.reference.code_entropy.code_entropy_raw_ref`` (the spec: every numeric rule,
and the gradient formulas). No N x K tensor exists: as in flash attention, every kernel recomputes
its (BLOCK_M, BLOCK_N) tile of scores ``||e'||^2 - 2 z'.e'`` (``tl.dot`` over D in ``BLOCK_D``
chunks, float32 accumulation; ``scale`` is loaded from its tensor, so no scaled copy and no host
sync; bfloat16/float16 tiles are scaled in their own dtype, exact for a power of two).

* ``_code_entropy_fwd_kernel`` (programs over row blocks): an online minimum and, relative to it,
  ``l = sum exp(-t)`` and ``S = sum t exp(-t)`` in base 2. When the minimum drops by ``delta``,
  ``l <- l 2^-delta`` and ``S <- 2^-delta (S + delta l)``, 0 where ``2^-delta`` underflows (never
  ``0 * inf``); a row with a non-finite score gets NaN ``log l`` and ``H``.
* ``_code_entropy_mass_kernel`` (programs over code blocks, each over a run of row tiles): the column
  sums of ``p``. Not atomics from the row programs: each sum is taken in one order fixed by the
  shapes alone (:func:`row_splits`; the launcher adds the splits' partial sums), so the result is
  deterministic on every GPU, with bounded extra memory (:data:`TARGET_PROGRAMS`).
* ``_code_entropy_bwd_rows_kernel`` (row blocks x D chunks): a pass for ``r_n = sum_k p w_k``, then
  ``G`` tile by tile and ``G @ e'``; writes ``r`` (G, N) for the next kernel.
* ``_code_entropy_bwd_codes_kernel`` (code blocks x D chunks, over the row tiles of every group that
  uses the codebook, or a split of them): ``G^T @ z'`` and ``sum_n G``; a shared codebook's group
  sum is taken in the program (deterministic).

float32 dot precision: IEEE by default; TF32 only on a real GPU when
``torch.get_float32_matmul_precision()`` is not ``"highest"`` (``kernels._common.fp32_dot_precision``,
the rule of ``nearest_codeword``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kepler._numerics import effective_inv_temperature
from kepler.kernels._common import (
    D_CHUNK_CONFIGS,
    TileConfig,
    check_launchable,
    check_search_shapes,
    fp32_dot_precision,
    launch,
    pick_covering,
)

LOG2E = 1.4426950408889634
_LOG2E_IN_KERNEL = tl.constexpr(LOG2E)
_LN2_IN_KERNEL = tl.constexpr(0.6931471805599453)
FLOAT32_MAX = torch.finfo(torch.float32).max


# The launchers' only choices, by the D chunk, one set for all four kernels and every dtype; the
# ahead-of-time compile tests build every one of them for each kernel.
CONFIGS = D_CHUNK_CONFIGS


def pick_config(D: int) -> TileConfig:
    """The kernel configuration the launchers use for rows of ``D`` elements."""
    return pick_covering(CONFIGS, D, "BLOCK_D")


# The code-block kernels (code mass, grad_codebook) have one program per BLOCK_N codes, group and D
# chunk: 16 for a 1024-code codebook, a tenth of an H100. They split the rows among up to this many
# programs in all (four waves on 132 SMs), in runs of whole row tiles, and the launcher sums the
# splits' partial results (splits x the output, float32). The split follows from the shapes alone,
# never from the device, so the sums are taken in one order for given shapes: deterministic.
TARGET_PROGRAMS = 528


def row_splits(row_tiles: int, programs: int) -> tuple[int, int]:
    """(splits, tiles per split) for ``row_tiles`` row tiles and ``programs`` programs per split:
    as many splits as keep ``splits * programs`` within :data:`TARGET_PROGRAMS` (at least 1, at most
    one per tile), none of them empty."""
    wanted = max(1, min(row_tiles, TARGET_PROGRAMS // max(programs, 1)))
    tiles_per_split = triton.cdiv(row_tiles, wanted)
    return triton.cdiv(row_tiles, tiles_per_split), tiles_per_split


@triton.jit
def _scores(z_g, e_g, offs_m, offs_n, N, K, D, scale, stride_zn, stride_zd, stride_ek, stride_ed,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """(BLOCK_M, BLOCK_N) float32 scores ``||e'||^2 - 2 z'.e'``; +inf past K (never the minimum,
    weight exactly 0). Rows past N read as zeros (finite scores; the callers mask them)."""
    m_mask = offs_m < N
    n_mask = offs_n < K
    z_rows = z_g + offs_m.to(tl.int64)[:, None] * stride_zn
    e_rows = e_g + offs_n.to(tl.int64)[:, None] * stride_ek
    cols = tl.arange(0, BLOCK_D).to(tl.int64)  # int64: column offsets times a stride pass 2**31
    dots = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    sq_norms = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d_start in range(0, D, BLOCK_D):
        offs_d = d_start + cols
        d_mask = (offs_d < D)[None, :]
        z_chunk = tl.load(z_rows + offs_d[None, :] * stride_zd, mask=m_mask[:, None] & d_mask, other=0.0)
        e_chunk = tl.load(e_rows + offs_d[None, :] * stride_ed, mask=n_mask[:, None] & d_mask, other=0.0)
        if DOT_IN_FP32:
            z_chunk = z_chunk.to(tl.float32)
            e_chunk = e_chunk.to(tl.float32)
        # scale is a power of two: exact in the tiles' own dtype (bfloat16 shares float32's range).
        z_chunk = z_chunk * scale.to(z_chunk.dtype)
        e_chunk = e_chunk * scale.to(e_chunk.dtype)
        dots = tl.dot(z_chunk, tl.trans(e_chunk), dots, input_precision=INPUT_PRECISION)
        e_f32 = e_chunk.to(tl.float32)
        sq_norms += tl.sum(e_f32 * e_f32, axis=1)
    scores = sq_norms[None, :] - 2.0 * dots
    return tl.where(n_mask[None, :], scores, float("inf"))


@triton.jit
def _scaled_tile(x_g, offs_row, row_mask, offs_d, D, scale, stride_row, stride_d):
    """(rows, BLOCK_D) float32 tile of x * scale; zero outside the valid rows and D."""
    mask = row_mask[:, None] & (offs_d < D)[None, :]
    ptrs = x_g + offs_row.to(tl.int64)[:, None] * stride_row + offs_d.to(tl.int64)[None, :] * stride_d
    return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) * scale


@triton.jit
def _log2_p(scores, c_min, log2_l, alpha_log2e):
    """log2 p = -(c - c_min) alpha log2(e) - log2 l, per element of a (BLOCK_M, BLOCK_N) tile."""
    return -(scores - c_min[:, None]) * alpha_log2e - log2_l[:, None]


@triton.jit
def _logit_grads(log2_p, entropy, code_weight, row_weight, coef_s, coef_b):
    """``-N G[n, k] = p (g_s/N (log p + H_n) + g_b/N (w_k - r_n))``, exactly 0 where p is 0 (NaN stays NaN)."""
    p = tl.exp2(log2_p)
    log_p = tl.where(p == 0.0, 0.0, log2_p * _LN2_IN_KERNEL)  # log p may be -inf where p is 0: never 0 * inf
    inner = coef_s * (log_p + entropy[:, None]) + coef_b * (code_weight[None, :] - row_weight[:, None])
    return p * inner


@triton.jit
def _code_entropy_fwd_kernel(
    z_ptr, e_ptr, params_ptr, row_stats_ptr,
    N, K, D,
    stride_zg, stride_zn, stride_zd,
    stride_eg, stride_ek, stride_ed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):  # fmt: skip
    group = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    z_g = z_ptr + group * stride_zg
    e_g = e_ptr + group * stride_eg  # stride_eg is 0 for a codebook shared by all groups
    scale = tl.load(params_ptr)
    alpha_log2e = tl.load(params_ptr + 1)
    c_min = tl.full((BLOCK_M,), float("inf"), dtype=tl.float32)
    l_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)  # sum 2^-u, u = (c - c_min) alpha log2(e)
    u_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)  # sum u 2^-u
    non_finite = tl.zeros((BLOCK_M,), dtype=tl.int32)
    nan_scores = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for n_start in range(0, K, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        scores = _scores(z_g, e_g, offs_m, offs_n, N, K, D, scale, stride_zn, stride_zd, stride_ek, stride_ed,
                         BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION, DOT_IN_FP32)
        is_nan = scores != scores
        # The padding past K is +inf: not counted.
        non_finite += tl.sum(tl.where((offs_n < K)[None, :] & ~(tl.abs(scores) < float("inf")), 1, 0), axis=1)
        nan_scores += tl.sum(tl.where(is_nan, 1, 0), axis=1)
        new_min = tl.minimum(c_min, tl.min(tl.where(is_nan, float("inf"), scores), axis=1))
        # Every earlier u grows by delta (infinite on the first tile, where the sums are still 0).
        delta = (c_min - new_min) * alpha_log2e
        factor = tl.exp2(-delta)
        # Where 2^-delta underflows (delta may be inf) both sums become exactly 0: never 0 * inf.
        delta = tl.where(factor == 0.0, 0.0, delta)
        u_sum = factor * (u_sum + delta * l_sum)
        l_sum = l_sum * factor
        u = (scores - new_min[:, None]) * alpha_log2e
        weights = tl.exp2(-u)
        l_sum += tl.sum(weights, axis=1)
        # u 2^-u is exactly 0 where 2^-u underflows (u may be inf there: never 0 * inf).
        u_sum += tl.sum(tl.where(weights == 0.0, 0.0, u) * weights, axis=1)
        c_min = new_min
    # l == 1 (a saturated row, K == 1) gives log l exactly 0 whatever log2's approximation on the GPU.
    log_l = tl.where(l_sum == 1.0, 0.0, tl.log2(l_sum) * _LN2_IN_KERNEL)
    entropy = log_l + tl.div_rn(u_sum * _LN2_IN_KERNEL, l_sum)
    bad = non_finite > 0
    log_l = tl.where(bad, float("nan"), log_l)
    entropy = tl.where(bad, float("nan"), entropy)
    c_min = tl.where(nan_scores > 0, float("nan"), c_min)
    m_mask = offs_m < N
    stats = row_stats_ptr + (group * N + offs_m) * 3
    tl.store(stats, c_min, mask=m_mask)
    tl.store(stats + 1, log_l, mask=m_mask)
    tl.store(stats + 2, entropy, mask=m_mask)


@triton.jit
def _load_row_stats(row_stats_ptr, group, N, offs_m, m_mask):
    """c_min, log2 l and H of rows offs_m (zeros past N)."""
    stats = row_stats_ptr + (group * N + offs_m) * 3
    c_min = tl.load(stats, mask=m_mask, other=0.0)
    log2_l = tl.load(stats + 1, mask=m_mask, other=0.0) * _LOG2E_IN_KERNEL
    entropy = tl.load(stats + 2, mask=m_mask, other=0.0)
    return c_min, log2_l, entropy


@triton.jit
def _code_entropy_mass_kernel(
    z_ptr, e_ptr, params_ptr, row_stats_ptr, code_mass_ptr,
    N, K, D, tiles_per_split,
    stride_zg, stride_zn, stride_zd,
    stride_eg, stride_ek, stride_ed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):  # fmt: skip
    # Grid axis 0: the code block, then the split of the rows (tiles_per_split row tiles each);
    # code_mass_ptr is (splits, G, K).
    code_blocks = tl.cdiv(K, BLOCK_N)
    split = tl.program_id(0) // code_blocks
    group = tl.program_id(1).to(tl.int64)
    offs_n = (tl.program_id(0) % code_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    z_g = z_ptr + group * stride_zg
    e_g = e_ptr + group * stride_eg
    scale = tl.load(params_ptr)
    alpha_log2e = tl.load(params_ptr + 1)
    mass = tl.zeros((BLOCK_N,), dtype=tl.float32)
    m_first = split * tiles_per_split * BLOCK_M
    for m_start in range(m_first, tl.minimum(m_first + tiles_per_split * BLOCK_M, N), BLOCK_M):
        offs_m = m_start + tl.arange(0, BLOCK_M)
        m_mask = offs_m < N
        scores = _scores(z_g, e_g, offs_m, offs_n, N, K, D, scale, stride_zn, stride_zd, stride_ek, stride_ed,
                         BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION, DOT_IN_FP32)
        c_min, log2_l, _ = _load_row_stats(row_stats_ptr, group, N, offs_m, m_mask)
        p = tl.exp2(_log2_p(scores, c_min, log2_l, alpha_log2e))
        mass += tl.sum(tl.where(m_mask[:, None], p, 0.0), axis=0)
    tl.store(code_mass_ptr + (split.to(tl.int64) * tl.num_programs(1) + group) * K + offs_n, mass, mask=offs_n < K)


@triton.jit
def _code_entropy_bwd_rows_kernel(
    z_ptr, e_ptr, params_ptr, row_stats_ptr, code_weight_ptr, group_coef_ptr, row_weight_ptr, grad_z_ptr,
    N, K, D,
    stride_zg, stride_zn, stride_zd,
    stride_eg, stride_ek, stride_ed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):  # fmt: skip
    group = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < N
    offs_out = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    z_g = z_ptr + group * stride_zg
    e_g = e_ptr + group * stride_eg
    scale = tl.load(params_ptr)
    alpha_log2e = tl.load(params_ptr + 1)
    c_min, log2_l, entropy = _load_row_stats(row_stats_ptr, group, N, offs_m, m_mask)
    weights_g = code_weight_ptr + group * K

    # Pass 1: r_n = sum_k p w_k (terms with p == 0 add 0).
    row_weight = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n_start in range(0, K, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        scores = _scores(z_g, e_g, offs_m, offs_n, N, K, D, scale, stride_zn, stride_zd, stride_ek, stride_ed,
                         BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION, DOT_IN_FP32)
        p = tl.exp2(_log2_p(scores, c_min, log2_l, alpha_log2e))
        code_weight = tl.load(weights_g + offs_n, mask=offs_n < K, other=0.0)
        row_weight += tl.sum(tl.where(p == 0.0, 0.0, p * code_weight[None, :]), axis=1)

    # Pass 2: sum_k (-N G[n, k]) e'_k for this program's chunk of D.
    coef_s = tl.load(group_coef_ptr + group * 2)
    coef_b = tl.load(group_coef_ptr + group * 2 + 1)
    weighted = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n_start in range(0, K, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < K
        scores = _scores(z_g, e_g, offs_m, offs_n, N, K, D, scale, stride_zn, stride_zd, stride_ek, stride_ed,
                         BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION, DOT_IN_FP32)
        code_weight = tl.load(weights_g + offs_n, mask=n_mask, other=0.0)
        grads = _logit_grads(_log2_p(scores, c_min, log2_l, alpha_log2e), entropy, code_weight, row_weight,
                             coef_s, coef_b)
        codes = _scaled_tile(e_g, offs_n, n_mask, offs_out, D, scale, stride_ek, stride_ed)
        weighted = tl.dot(grads, codes, weighted, input_precision=INPUT_PRECISION)

    # grad_z = 2 alpha scale sum_k G e', with weighted = -sum_k G e': alpha, -2 and scale applied
    # one by one, in the reference's order (alpha scale alone may be subnormal).
    grad = ((weighted * tl.load(params_ptr + 2)) * -2.0) * scale
    out_mask = m_mask[:, None] & (offs_out < D)[None, :]
    grad_ptrs = grad_z_ptr + (group * N + offs_m.to(tl.int64))[:, None] * D + offs_out[None, :]
    tl.store(grad_ptrs, grad.to(grad_z_ptr.dtype.element_ty), mask=out_mask)
    tl.store(row_weight_ptr + group * N + offs_m, row_weight, mask=m_mask & (tl.program_id(2) == 0))


@triton.jit
def _code_entropy_bwd_codes_kernel(
    z_ptr, e_ptr, params_ptr, row_stats_ptr, code_weight_ptr, group_coef_ptr, row_weight_ptr, grad_e_ptr,
    N, K, D, groups_per_codebook, tiles_per_split,
    stride_zg, stride_zn, stride_zd,
    stride_eg, stride_ek, stride_ed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
):  # fmt: skip
    # Grid axis 1 is the codebook: group g's own (groups_per_codebook 1) or the shared one (index 0,
    # used by groups 0 .. G - 1), so the groups of this codebook are code_group + i. Its row tiles,
    # group by group, are split in runs of tiles_per_split: grid axis 0 is the code block, then the
    # split; grad_e_ptr is (splits, Gc, K, D).
    code_blocks = tl.cdiv(K, BLOCK_N)
    split = tl.program_id(0) // code_blocks
    code_group = tl.program_id(1).to(tl.int64)
    offs_n = (tl.program_id(0) % code_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < K
    offs_out = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    e_g = e_ptr + code_group * stride_eg
    scale = tl.load(params_ptr)
    alpha_log2e = tl.load(params_ptr + 1)
    weighted = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)  # sum_n (-N G) z'
    grad_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum_n (-N G)
    row_tiles = tl.cdiv(N, BLOCK_M)
    tile_first = split * tiles_per_split
    for tile in range(tile_first, tl.minimum(tile_first + tiles_per_split, groups_per_codebook * row_tiles)):
        i = tile // row_tiles
        group = code_group + i
        z_g = z_ptr + group * stride_zg
        code_weight = tl.load(code_weight_ptr + group * K + offs_n, mask=n_mask, other=0.0)
        coef_s = tl.load(group_coef_ptr + group * 2)
        coef_b = tl.load(group_coef_ptr + group * 2 + 1)
        offs_m = (tile - i * row_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = offs_m < N
        scores = _scores(z_g, e_g, offs_m, offs_n, N, K, D, scale, stride_zn, stride_zd, stride_ek, stride_ed,
                         BLOCK_M, BLOCK_N, BLOCK_D, INPUT_PRECISION, DOT_IN_FP32)
        c_min, log2_l, entropy = _load_row_stats(row_stats_ptr, group, N, offs_m, m_mask)
        row_weight = tl.load(row_weight_ptr + group * N + offs_m, mask=m_mask, other=0.0)
        grads = _logit_grads(_log2_p(scores, c_min, log2_l, alpha_log2e), entropy, code_weight, row_weight,
                             coef_s, coef_b)
        grads = tl.where(m_mask[:, None], grads, 0.0)
        points = _scaled_tile(z_g, offs_m, m_mask, offs_out, D, scale, stride_zn, stride_zd)
        weighted = tl.dot(tl.trans(grads), points, weighted, input_precision=INPUT_PRECISION)
        grad_sum += tl.sum(grads, axis=0)
    # Linear in (weighted, grad_sum): the splits' results add up to the whole.
    codes = _scaled_tile(e_g, offs_n, n_mask, offs_out, D, scale, stride_ek, stride_ed)
    grad = (((weighted - codes * grad_sum[:, None]) * tl.load(params_ptr + 2)) * -2.0) * scale
    out_mask = n_mask[:, None] & (offs_out < D)[None, :]
    code_rows = (split.to(tl.int64) * tl.num_programs(1) + code_group) * K + offs_n.to(tl.int64)
    grad_ptrs = grad_e_ptr + code_rows[:, None] * D + offs_out[None, :]
    tl.store(grad_ptrs, grad.to(grad_e_ptr.dtype.element_ty), mask=out_mask)


def _check_search(
    op: str, z: torch.Tensor, codebook: torch.Tensor, scale: torch.Tensor, inv_temperature: float
) -> None:
    """What every launcher needs: the search shapes (``check_search_shapes``), a 0-d scale and a
    finite inv_temperature > 0."""
    check_search_shapes(op, z, codebook)
    if scale.dim() != 0 or not scale.is_floating_point():
        raise ValueError(
            f"{op}: scale must be a 0-d floating-point tensor, got shape {tuple(scale.shape)} and {scale.dtype}"
        )
    if not (math.isfinite(inv_temperature) and inv_temperature > 0):
        raise ValueError(f"{op}: inv_temperature must be finite and > 0, got {inv_temperature}")


def _parameters(scale: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    """(3,) float32 on the device: ``scale``, ``alpha log2(e)`` and ``alpha``
    (``kepler._numerics.effective_inv_temperature``, the reference's), ``alpha log2(e)`` capped at
    the largest float32 too; tensor ops, no host sync, each rounded once to float32. The kernels
    apply ``alpha`` and ``scale`` to the gradients one after the other, as the reference's autograd
    does: their product can be a float32 subnormal (1e-39 for values near 1e30), which a GPU may
    flush to 0."""
    alpha = effective_inv_temperature(inv_temperature, scale)
    return torch.stack([scale.to(torch.float64), (alpha * LOG2E).clamp_max(FLOAT32_MAX), alpha]).to(torch.float32)


def _search_arguments(z: torch.Tensor, codebook: torch.Tensor, scale: torch.Tensor, inv_temperature: float) -> dict:
    """What every kernel takes besides its own outputs: inputs, parameters, sizes, strides, the dot
    precision, and the configuration (block sizes and launch options)."""
    _, N, D = z.shape
    code_groups, K, _ = codebook.shape
    return dict(
        z_ptr=z, e_ptr=codebook, params_ptr=_parameters(scale, inv_temperature),
        N=N, K=K, D=D,
        stride_zg=z.stride(0), stride_zn=z.stride(1), stride_zd=z.stride(2),
        # 0 for a codebook shared by all groups.
        stride_eg=codebook.stride(0) if code_groups > 1 else 0, stride_ek=codebook.stride(1),
        stride_ed=codebook.stride(2),
        INPUT_PRECISION=fp32_dot_precision(z.device) if z.dtype == torch.float32 else "ieee",
        # The Triton interpreter multiplies bfloat16 dot operands as their raw uint16 bits (triton
        # 3.8, interpreter.py create_dot): give it float32 tiles instead. GPUs take the native path.
        DOT_IN_FP32=z.device.type != "cuda" and z.dtype == torch.bfloat16,
        **pick_config(D)._asdict(),
    )  # fmt: skip


def code_entropy_triton(
    z: torch.Tensor, codebook: torch.Tensor, scale: torch.Tensor, inv_temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row and per-code statistics of the soft code assignments (``kepler::code_entropy``).

    Args:
        z: (G, N, D) float32/bfloat16/float16, any strides.
        codebook: (Gc, K, D) with Gc in {1, G}, z's dtype and device, any strides; K >= 1.
        scale: 0-d float32 tensor on z's device, the power of two of ``search_scale``.
        inv_temperature: 1 / T, finite and > 0.

    Returns:
        row_stats (G, N, 3) float32 (``c_min``, ``log l``, ``H`` per row) and code_mass (G, K)
        float32 (``sum_n p[n, k]``), contiguous. CUDA tensors, or CPU tensors when the Triton
        interpreter is on (``TRITON_INTERPRET=1``).
    """
    op = "code_entropy_triton"
    check_launchable(op, {"z": z, "codebook": codebook, "scale": scale})
    _check_search(op, z, codebook, scale, inv_temperature)
    G, N, D = z.shape
    K = codebook.shape[1]
    row_stats = torch.empty(G, N, 3, dtype=torch.float32, device=z.device)
    if N == 0 or G == 0:
        return row_stats, torch.zeros(G, K, dtype=torch.float32, device=z.device)
    config = pick_config(D)
    arguments = _search_arguments(z, codebook, scale, inv_temperature)
    row_tiles, code_blocks = triton.cdiv(N, config.BLOCK_M), triton.cdiv(K, config.BLOCK_N)
    launch(_code_entropy_fwd_kernel, (row_tiles, G), device=z.device, row_stats_ptr=row_stats, **arguments)
    splits, tiles_per_split = row_splits(row_tiles, code_blocks * G)
    partial_mass = torch.empty(splits, G, K, dtype=torch.float32, device=z.device)
    launch(
        _code_entropy_mass_kernel, (code_blocks * splits, G), device=z.device,
        row_stats_ptr=row_stats, code_mass_ptr=partial_mass, tiles_per_split=tiles_per_split, **arguments,
    )  # fmt: skip
    return row_stats, partial_mass[0] if splits == 1 else partial_mass.sum(dim=0)


def code_entropy_backward_triton(
    grad_per_sample: torch.Tensor,
    grad_batch: torch.Tensor,
    z: torch.Tensor,
    codebook: torch.Tensor,
    scale: torch.Tensor,
    inv_temperature: float,
    row_stats: torch.Tensor,
    code_mass: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``sum_g grad_per_sample[g] per_sample[g] + grad_batch[g] batch[g]``
    (``kepler::code_entropy_backward``).

    grad_per_sample, grad_batch: (G,); z, codebook, scale, inv_temperature as for
    :func:`code_entropy_triton`, and its row_stats (G, N, 3) and code_mass (G, K). Returns grad_z
    (G, N, D) in z's dtype and grad_codebook (Gc, K, D) in the codebook's, contiguous (summed over
    the groups for a shared codebook).
    """
    op = "code_entropy_backward_triton"
    check_launchable(
        op,
        {
            "z": z, "codebook": codebook, "scale": scale, "grad_per_sample": grad_per_sample,
            "grad_batch": grad_batch, "row_stats": row_stats, "code_mass": code_mass,
        },
    )  # fmt: skip
    _check_search(op, z, codebook, scale, inv_temperature)
    G, N, D = z.shape
    code_groups, K, _ = codebook.shape
    if grad_per_sample.shape != (G,) or grad_batch.shape != (G,):
        raise ValueError(
            f"{op}: expected grad_per_sample and grad_batch ({G},), got {tuple(grad_per_sample.shape)} and "
            f"{tuple(grad_batch.shape)}"
        )
    if row_stats.shape != (G, N, 3) or code_mass.shape != (G, K):
        raise ValueError(
            f"{op}: expected row_stats ({G}, {N}, 3) and code_mass ({G}, {K}), got {tuple(row_stats.shape)} and "
            f"{tuple(code_mass.shape)}"
        )
    grad_z = torch.empty(G, N, D, dtype=z.dtype, device=z.device)
    if N == 0 or G == 0 or D == 0:
        return grad_z, torch.zeros(code_groups, K, D, dtype=codebook.dtype, device=z.device)
    row_stats = row_stats.to(torch.float32).contiguous()
    code_mass = code_mass.to(torch.float32)
    # w_k = log code_mass_k - log N; 0 for an unused code (its p are all 0: its w does not matter,
    # and log 0 would make p w = 0 * -inf), NaN kept: a NaN mass (a group with a NaN row) makes the
    # batch entropy and its gradients NaN, as the reference's.
    code_weight = torch.where(code_mass == 0, 0.0, torch.log(code_mass) - math.log(N)).contiguous()
    group_coef = (torch.stack([grad_per_sample, grad_batch], dim=1).to(torch.float32) / N).contiguous()
    row_weight = torch.empty(G, N, dtype=torch.float32, device=z.device)
    config = pick_config(D)
    arguments = dict(
        row_stats_ptr=row_stats, code_weight_ptr=code_weight, group_coef_ptr=group_coef, row_weight_ptr=row_weight,
        **_search_arguments(z, codebook, scale, inv_temperature),
    )  # fmt: skip
    row_tiles, code_blocks, chunks = (
        triton.cdiv(N, config.BLOCK_M), triton.cdiv(K, config.BLOCK_N), triton.cdiv(D, config.BLOCK_D)
    )
    launch(_code_entropy_bwd_rows_kernel, (row_tiles, G, chunks), device=z.device, grad_z_ptr=grad_z, **arguments)
    groups_per_codebook = G if code_groups == 1 else 1
    splits, tiles_per_split = row_splits(groups_per_codebook * row_tiles, code_blocks * code_groups * chunks)
    # One split writes the gradient in its dtype; several write float32 partial gradients, summed here.
    grad_codebook = torch.empty(
        splits, code_groups, K, D, dtype=codebook.dtype if splits == 1 else torch.float32, device=z.device
    )
    launch(
        _code_entropy_bwd_codes_kernel, (code_blocks * splits, code_groups, chunks), device=z.device,
        grad_e_ptr=grad_codebook, groups_per_codebook=groups_per_codebook, tiles_per_split=tiles_per_split,
        **arguments,
    )  # fmt: skip
    return grad_z, grad_codebook[0] if splits == 1 else grad_codebook.sum(dim=0).to(codebook.dtype)
