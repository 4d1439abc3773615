"""Triton packing energy: ``_packing_energy_fwd_kernel``, ``_packing_energy_bwd_kernel`` and launchers.

Raw Gaussian-potential energy of points y (G, K, D), as ``kepler.reference.packing_energy_raw_ref``:
``row_lse[g, i] = log sum_{j != i} exp(-t ||y_i - y_j||^2)`` and
``energy[g] = logsumexp_i row_lse[g, i] - log(K (K - 1))``.

Forward: one program takes ``BLOCK_M`` rows of one group and streams the codewords in ``BLOCK_N``
tiles, like flash attention with scores ``-t d_ij`` (diagonal masked) and an online log-sum-exp
per row (in base 2, for ``exp2``); no K x K matrix exists anywhere. Distances are
``||a||^2 + ||b||^2 - 2 a.b`` (``tl.dot`` over D in ``BLOCK_D`` chunks, IEEE float32, clamped at
0), on points shifted by their group mean (``center``, computed by the launcher) so the
cancellation is relative to the codebook's spread, not its offset from the origin. The energy
itself is a logsumexp over the O(G K) row values, done by the launcher in PyTorch.

Backward: ``dE/dy_i = coef_i * (y_i sum_j q_ij - sum_j q_ij y_j)`` with
``q_ij = exp(-t d_ij - row_lse_i)`` (the saved row values make every weight <= 1) and
``coef_i = grad_energy * (-4t) * exp(row_lse_i - energy - log(K(K-1)))`` (O(G K), launcher). A
second pass over the tiles recomputes the distances and accumulates ``q @ y`` for one ``BLOCK_D``
chunk of the output per program (grid axis 2 covers D > BLOCK_D).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kepler.kernels._common import D_CHUNK_CONFIGS, TileConfig, check_groups, check_launchable, launch, pick_covering

LOG2E = 1.4426950408889634
_LOG2E_IN_KERNEL = tl.constexpr(LOG2E)
_LN2_IN_KERNEL = tl.constexpr(0.6931471805599453)


# The launchers' only choices, by the D chunk; the ahead-of-time compile tests build every one of
# them for both kernels. Points are float32 in registers whatever the input dtype (shifted by the
# group mean), so one set serves all.
CONFIGS = D_CHUNK_CONFIGS


def pick_config(D: int) -> TileConfig:
    """The kernel configuration the launchers use for points of ``D`` elements."""
    return pick_covering(CONFIGS, D, "BLOCK_D")


@triton.jit
def _load_centered(y_g, center_g, offs_row, row_mask, offs_d, D, stride_yk, stride_yd):
    """(rows, BLOCK_D) float32 tile of y - center; zero outside the valid rows and D."""
    d_mask = offs_d < D
    mask = row_mask[:, None] & d_mask[None, :]
    ptrs = y_g + offs_row.to(tl.int64)[:, None] * stride_yk + offs_d.to(tl.int64)[None, :] * stride_yd
    points = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    center = tl.load(center_g + offs_d, mask=d_mask, other=0.0)
    return tl.where(mask, points - center[None, :], 0.0)


@triton.jit
def _scores_log2(y_g, center_g, offs_m, offs_n, K, D, neg_t_log2e, stride_yk, stride_yd,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """(BLOCK_M, BLOCK_N) scores -t ||y_i - y_j||^2 * log2(e); -inf on the diagonal and past K."""
    m_mask = offs_m < K
    n_mask = offs_n < K
    dot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    sq_m = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sq_n = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        a = _load_centered(y_g, center_g, offs_m, m_mask, offs_d, D, stride_yk, stride_yd)
        b = _load_centered(y_g, center_g, offs_n, n_mask, offs_d, D, stride_yk, stride_yd)
        dot = tl.dot(a, tl.trans(b), dot, input_precision="ieee")
        sq_m += tl.sum(a * a, axis=1)
        sq_n += tl.sum(b * b, axis=1)
    sq_dist = sq_m[:, None] + sq_n[None, :] - 2.0 * dot
    # Clamp rounding's negatives to 0 but keep NaN (tl.maximum(d, 0.0) would map NaN to 0), as the
    # reference does.
    sq_dist = tl.where(sq_dist < 0.0, 0.0, sq_dist)
    valid = n_mask[None, :] & (offs_m[:, None] != offs_n[None, :])
    return tl.where(valid, sq_dist * neg_t_log2e, float("-inf"))


@triton.jit
def _group_rows(y_ptr, center_ptr, stride_yg, D, BLOCK_M: tl.constexpr):
    """This program's group (grid axis 1), that group's points and centre, and its BLOCK_M rows (axis 0)."""
    group = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    return group, y_ptr + group * stride_yg, center_ptr + group * D, offs_m


@triton.jit
def _packing_energy_fwd_kernel(
    y_ptr, center_ptr, row_lse_ptr,
    K, D, neg_t_log2e,
    stride_yg, stride_yk, stride_yd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    group, y_g, center_g, offs_m = _group_rows(y_ptr, center_ptr, stride_yg, D, BLOCK_M)
    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, K, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        scores = _scores_log2(y_g, center_g, offs_m, offs_n, K, D, neg_t_log2e, stride_yk, stride_yd,
                              BLOCK_M, BLOCK_N, BLOCK_D)
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        # Rows whose tiles so far were all masked keep -inf; exp2(-inf - -inf) would be NaN.
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp2(running_max - safe_max) + tl.sum(tl.exp2(scores - safe_max[:, None]),
                                                                             axis=1)
        running_max = new_max
    row_lse = (running_max + tl.log2(running_sum)) * _LN2_IN_KERNEL
    tl.store(row_lse_ptr + group * K + offs_m, row_lse, mask=offs_m < K)


@triton.jit
def _packing_energy_bwd_kernel(
    y_ptr, center_ptr, row_lse_ptr, coef_ptr, grad_ptr,
    K, D, neg_t_log2e,
    stride_yg, stride_yk, stride_yd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    group, y_g, center_g, offs_m = _group_rows(y_ptr, center_ptr, stride_yg, D, BLOCK_M)
    m_mask = offs_m < K
    offs_out = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    lse_log2 = tl.load(row_lse_ptr + group * K + offs_m, mask=m_mask, other=0.0) * _LOG2E_IN_KERNEL
    weight_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    weighted = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, K, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        scores = _scores_log2(y_g, center_g, offs_m, offs_n, K, D, neg_t_log2e, stride_yk, stride_yd,
                              BLOCK_M, BLOCK_N, BLOCK_D)
        # q_ij <= 1 up to rounding; masked entries give exp2(-inf) = 0.
        q = tl.exp2(tl.minimum(scores - lse_log2[:, None], 0.0))
        weight_sum += tl.sum(q, axis=1)
        cols = _load_centered(y_g, center_g, offs_n, offs_n < K, offs_out, D, stride_yk, stride_yd)
        weighted = tl.dot(q, cols, weighted, input_precision="ieee")
    rows = _load_centered(y_g, center_g, offs_m, m_mask, offs_out, D, stride_yk, stride_yd)
    coef = tl.load(coef_ptr + group * K + offs_m, mask=m_mask, other=0.0)
    grad = coef[:, None] * (rows * weight_sum[:, None] - weighted)
    out_mask = m_mask[:, None] & (offs_out < D)[None, :]
    grad_ptrs = grad_ptr + (group * K + offs_m.to(tl.int64))[:, None] * D + offs_out[None, :]
    tl.store(grad_ptrs, grad.to(grad_ptr.dtype.element_ty), mask=out_mask)


def _check_points(op: str, y: torch.Tensor, t: float) -> None:
    """What both launchers need: y (G, K >= 2, D >= 1) with G on one grid axis, t > 0."""
    if y.dim() != 3:
        raise ValueError(f"{op}: y must be (G, K, D), got shape {tuple(y.shape)}")
    G, K, D = y.shape
    if K < 2:
        raise ValueError(f"{op}: needs K >= 2 codewords, got K={K}")
    if D < 1:
        raise ValueError(f"{op}: needs D >= 1, got D={D}")
    check_groups(op, G)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"{op}: t must be finite and > 0, got {t}")


def _point_arguments(y: torch.Tensor, t: float) -> dict:
    """What both kernels take besides their own pointers (the group centres, sizes, strides, t), and
    the launch options."""
    _, K, D = y.shape
    return dict(
        center_ptr=y.mean(dim=1, dtype=torch.float32).contiguous(),  # the energy is translation invariant
        K=K, D=D,
        neg_t_log2e=-t * LOG2E,
        stride_yg=y.stride(0), stride_yk=y.stride(1), stride_yd=y.stride(2),
        **pick_config(D)._asdict(),
    )  # fmt: skip


def packing_energy_triton(y: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw packing energy of y: (G, K, D) float32/bfloat16/float16, any strides.

    Returns energy (G,) float32 and row_lse (G, K) float32 (see the module docstring).
    """
    op = "packing_energy_triton"
    check_launchable(op, {"y": y})
    _check_points(op, y, t)
    G, K, D = y.shape
    row_lse = torch.empty(G, K, dtype=torch.float32, device=y.device)
    if G > 0:
        grid = (triton.cdiv(K, pick_config(D).BLOCK_M), G)
        launch(
            _packing_energy_fwd_kernel,
            grid,
            device=y.device,
            y_ptr=y, row_lse_ptr=row_lse,
            **_point_arguments(y, t),
        )  # fmt: skip
    energy = torch.logsumexp(row_lse, dim=1) - math.log(K * (K - 1))
    return energy, row_lse


def packing_energy_backward_triton(
    grad_energy: torch.Tensor, y: torch.Tensor, t: float, energy: torch.Tensor, row_lse: torch.Tensor
) -> torch.Tensor:
    """Gradient of ``sum_g grad_energy[g] * energy[g]`` with respect to y: (G, K, D), y's dtype.

    grad_energy, energy: (G,); row_lse: (G, K) float32, as returned by :func:`packing_energy_triton`.
    """
    op = "packing_energy_backward_triton"
    check_launchable(op, {"y": y, "grad_energy": grad_energy, "energy": energy, "row_lse": row_lse})
    _check_points(op, y, t)
    G, K, D = y.shape
    if grad_energy.shape != (G,) or energy.shape != (G,) or row_lse.shape != (G, K):
        raise ValueError(
            f"{op}: expected grad_energy and energy ({G},) and row_lse ({G}, {K}), got {tuple(grad_energy.shape)}, "
            f"{tuple(energy.shape)} and {tuple(row_lse.shape)}"
        )
    grad = torch.empty(G, K, D, dtype=y.dtype, device=y.device)
    if G == 0:
        return grad
    row_lse = row_lse.to(torch.float32).contiguous()
    log_total = energy.to(torch.float32) + math.log(K * (K - 1))
    coef = (grad_energy.to(torch.float32).unsqueeze(1) * (-4.0 * t)) * torch.exp(row_lse - log_total.unsqueeze(1))
    config = pick_config(D)
    grid = (triton.cdiv(K, config.BLOCK_M), G, triton.cdiv(D, config.BLOCK_D))
    launch(
        _packing_energy_bwd_kernel,
        grid,
        device=y.device,
        y_ptr=y, row_lse_ptr=row_lse, coef_ptr=coef.contiguous(), grad_ptr=grad,
        **_point_arguments(y, t),
    )  # fmt: skip
    return grad
