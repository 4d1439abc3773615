"""Triton kernels for the fused Kepler KL regularizer, and their launchers.

One program per row of ``x: (B, M)``, looping over the row in ``BLOCK_M``-wide chunks; fp32 math
whatever the input dtype. Forward passes: (1) mean / M2 (Chan's merge of per-chunk moments), max,
min; (2) logsumexp of ``u = s - max s``; (3) ``sum p * log(p / q + eps)``. Backward passes: (1) ``sum p``,
``sum p g``, ``sum p u``, ``sum p u g``, ``sum u``; (2) the gradient. The math is documented in
``kepler/ops/kepler_kl.py``.

Square roots and divisions are correctly rounded (``tl.sqrt_rn``, ``tl.div_rn``), as PyTorch's
are: on a GPU a plain ``tl.sqrt`` or float32 ``/`` is approximate (up to 2 ulp; the interpreter
never shows it, the AOT tests check the PTX).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kepler.kernels._common import check_launchable, launch, pick_covering


class KeplerKLConfig(NamedTuple):
    BLOCK_M: int
    num_warps: int


# The launchers' only choices: the smallest BLOCK_M that holds the row, else the last; the
# ahead-of-time compile tests build every one of them.
CONFIGS = (
    KeplerKLConfig(BLOCK_M=256, num_warps=2),
    KeplerKLConfig(BLOCK_M=1024, num_warps=4),
    KeplerKLConfig(BLOCK_M=4096, num_warps=8),
)


def pick_config(M: int) -> KeplerKLConfig:
    """The kernel configuration the launchers use for rows of ``M`` elements."""
    return pick_covering(CONFIGS, M, "BLOCK_M")


@triton.jit
def _log_ratio_eps(log_ratio, log_eps):
    """log(exp(log_ratio) + eps) and exp(log_ratio) / (exp(log_ratio) + eps), stably."""
    diff = log_ratio - log_eps
    e = tl.exp(-tl.abs(diff))
    one_plus = 1.0 + e
    rounded_e = one_plus - 1.0
    # log1p(e) = log(1 + e) * e / ((1 + e) - 1), exact to rounding even for tiny e
    log1p_e = tl.where(rounded_e == 0.0, e, tl.log(one_plus) * tl.div_rn(e, tl.where(rounded_e == 0.0, 1.0, rounded_e)))
    log_term = tl.maximum(log_ratio, log_eps) + log1p_e
    share = tl.div_rn(tl.where(diff >= 0.0, 1.0, e), one_plus)
    return log_term, share


@triton.jit
def _program_row(x_ptr, logq_ptr, stride_xb, stride_qb):
    """This program's row (grid axis 0) and where that row of x and of log q starts."""
    row = tl.program_id(0).to(tl.int64)
    return row, x_ptr + row * stride_xb, logq_ptr + row * stride_qb


@triton.jit
def _load_chunk(row_ptr, start, M, stride, BLOCK_M: tl.constexpr):
    """Offsets, mask and float32 values (0 past M) of the ``BLOCK_M`` elements of a row from ``start``."""
    offs = start + tl.arange(0, BLOCK_M)
    mask = offs < M
    values = tl.load(row_ptr + offs.to(tl.int64) * stride, mask=mask, other=0.0).to(tl.float32)
    return offs, mask, values


@triton.jit
def _chunk_terms(x, logq, hi, inv_scale, lse, log_eps):
    """Per element of a chunk: ``u = s - max s``, ``p = softmax(s)``, ``log r`` with ``r = p / q``,
    ``log(r + eps)`` and ``r / (r + eps)``; ``lse`` is the logsumexp of ``u``."""
    u = (x - hi) * inv_scale
    log_p = u - lse
    log_ratio = log_p - logq
    log_term, share = _log_ratio_eps(log_ratio, log_eps)
    return u, tl.exp(log_p), log_ratio, log_term, share


# Runtime ints that may equal 1 are kept as i32 (Triton would otherwise specialize them to constexpr).
_NOT_SPECIALIZED = ["M", "has_eps", "use_std"]
# Smallest divisor of a non-degenerate row: fp32's smallest normal number (see the fwd kernel).
MIN_SCALE = tl.constexpr(2.0**-126)


@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _kepler_kl_fwd_kernel(
    x_ptr, logq_ptr, loss_ptr, stats_ptr,
    M,
    stride_xb, stride_xm, stride_qb, stride_qm,
    log_eps, has_eps, use_std,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    row, x_row, q_row = _program_row(x_ptr, logq_ptr, stride_xb, stride_qb)

    # (1) moments: per-chunk two-pass mean/M2 merged with Chan's update; max and min. In float64:
    # squared deviations of values near 1e19 overflow fp32 and those near 1e-20 sink into its
    # subnormals (one memory-bound pass, so the float64 arithmetic costs little).
    count = tl.full((), 0.0, tl.float64)
    mean = tl.full((), 0.0, tl.float64)
    m2 = tl.full((), 0.0, tl.float64)
    hi = float("-inf")
    lo = float("inf")
    for start in range(0, M, BLOCK_M):
        _, mask, x = _load_chunk(x_row, start, M, stride_xm, BLOCK_M)
        x_wide = x.to(tl.float64)
        n_chunk = tl.minimum(M - start, BLOCK_M).to(tl.float64)
        chunk_mean = tl.sum(x_wide, axis=0) / n_chunk
        dev = tl.where(mask, x_wide - chunk_mean, 0.0)
        chunk_m2 = tl.sum(dev * dev, axis=0)
        hi = tl.maximum(hi, tl.max(tl.where(mask, x, float("-inf")), axis=0))
        lo = tl.minimum(lo, tl.min(tl.where(mask, x, float("inf")), axis=0))
        total = count + n_chunk
        delta = chunk_mean - mean
        mean = mean + delta * (n_chunk / total)
        m2 = m2 + chunk_m2 + delta * delta * (count * n_chunk / total)
        count = total

    variance = m2 / tl.maximum(M - 1, 1).to(tl.float64)
    scale = tl.where(use_std != 0, tl.sqrt(variance), variance).to(tl.float32)
    # One element or all equal: s = 0. A NaN scale (NaN row) stays NaN. Any other row's divisor is
    # floored at fp32's smallest normal number, so that 1 / scale stays finite (the reference's
    # MIN_DIVISOR_EXPONENT says why).
    degenerate = (scale == scale) & ((M == 1) | (hi == lo))
    scale = tl.where(degenerate, 0.0, tl.where(scale < MIN_SCALE, MIN_SCALE, scale))  # NaN stays NaN
    inv_scale = tl.where(degenerate, 0.0, tl.div_rn(1.0, tl.where(degenerate, 1.0, scale)))

    # (2) logsumexp of u = s - max s = (x - hi) * inv_scale. Never s = (x - mean) * inv_scale: in
    # official mode |s| ~ 1 / scale (1e10 for x ~ 1e-10), and s - logsumexp(s) loses the O(1)
    # log-probabilities to s's rounding (worse with the FMA contraction of `s * inv - shift` on a
    # GPU). u is exactly 0 at the max, its error relative to |u| where exp(u) is ~0.
    acc = tl.zeros((BLOCK_M,), tl.float32)
    for start in range(0, M, BLOCK_M):
        _, mask, x = _load_chunk(x_row, start, M, stride_xm, BLOCK_M)
        acc += tl.where(mask, tl.exp((x - hi) * inv_scale), 0.0)
    lse = tl.log(tl.sum(acc, axis=0))

    # (3) sum_i p_i * log(p_i / q_i + eps).
    acc = tl.zeros((BLOCK_M,), tl.float32)
    for start in range(0, M, BLOCK_M):
        _, mask, x = _load_chunk(x_row, start, M, stride_xm, BLOCK_M)
        _, _, logq = _load_chunk(q_row, start, M, stride_qm, BLOCK_M)
        _, p, log_ratio, log_term, _ = _chunk_terms(x, logq, hi, inv_scale, lse, log_eps)
        term = tl.where(has_eps != 0, log_term, log_ratio)
        acc += tl.where(mask, p * term, 0.0)

    tl.store(loss_ptr + row, tl.sum(acc, axis=0))
    tl.store(stats_ptr + row * 3 + 0, hi)
    tl.store(stats_ptr + row * 3 + 1, scale)
    tl.store(stats_ptr + row * 3 + 2, lse)


@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _kepler_kl_bwd_kernel(
    grad_loss_ptr, x_ptr, logq_ptr, stats_ptr, grad_ptr,
    M,
    stride_xb, stride_xm, stride_qb, stride_qm,
    log_eps, has_eps, use_std,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    row, x_row, q_row = _program_row(x_ptr, logq_ptr, stride_xb, stride_qb)
    grad_row = grad_ptr + row * M
    grad_loss = tl.load(grad_loss_ptr + row)
    hi = tl.load(stats_ptr + row * 3 + 0)
    scale = tl.load(stats_ptr + row * 3 + 1)
    lse = tl.load(stats_ptr + row * 3 + 2)
    inv_scale = tl.where(scale == 0.0, 0.0, tl.div_rn(1.0, tl.where(scale == 0.0, 1.0, scale)))
    # The sums below take s as u - pivot (S and s_k - s_mean do not change), pivot near the
    # p-weighted mean of u so that sum p s g - g_mean sum p s does not cancel away a large offset:
    # lse - log M (that mean for a uniform p) while lse > log(M) / 2 (p spread out), else 0 (p on
    # a few elements near u = 0; exactly 0 keeps S exactly 0 for a one-hot p, as in the reference).
    log_cols = tl.log(M.to(tl.float32))
    # Below 2**-20 * log M, lse - log M is rounding noise of lse (p uniform to rounding, u all near
    # 0, e.g. x ~ 1e19 in official mode), far larger than the spread of u: 0 is as near the mean.
    spread = (lse > 0.5 * log_cols) & (tl.abs(lse - log_cols) > 2.0**-20 * log_cols)
    pivot = tl.where(spread, lse - log_cols, 0.0)

    # (1) sums over the row; g_i = dL/dp_i = log(r_i + eps) + r_i / (r_i + eps).
    sum_p = tl.zeros((BLOCK_M,), tl.float32)
    sum_pg = tl.zeros((BLOCK_M,), tl.float32)
    sum_ps = tl.zeros((BLOCK_M,), tl.float32)
    sum_psg = tl.zeros((BLOCK_M,), tl.float32)
    sum_s = tl.zeros((BLOCK_M,), tl.float32)
    for start in range(0, M, BLOCK_M):
        _, mask, x = _load_chunk(x_row, start, M, stride_xm, BLOCK_M)
        _, _, logq = _load_chunk(q_row, start, M, stride_qm, BLOCK_M)
        u, p, log_ratio, log_term, share = _chunk_terms(x, logq, hi, inv_scale, lse, log_eps)
        s = u - pivot
        p = tl.where(mask, p, 0.0)
        g = tl.where(has_eps != 0, log_term + share, log_ratio + 1.0)
        s = tl.where(mask, s, 0.0)
        sum_p += p
        sum_pg += p * g
        sum_ps += p * s
        sum_psg += p * s * g
        sum_s += s
    total_p = tl.sum(sum_p, axis=0)
    g_mean = tl.div_rn(tl.sum(sum_pg, axis=0), total_p)
    # S = sum_i d_i s_i with d_i = G p_i (g_i - g_mean) / sum p; see kepler/ops/kepler_kl.py. Taken
    # over u instead of s: as sum_i d_i = 0, S and s_k - s_mean are the same.
    s_dot_d = tl.div_rn(grad_loss * (tl.sum(sum_psg, axis=0) - g_mean * tl.sum(sum_ps, axis=0)), total_p)
    per_dof = tl.div_rn(s_dot_d, tl.maximum(M - 1, 1).to(tl.float32))
    live = inv_scale != 0.0  # degenerate rows get a zero gradient
    coef_p = tl.where(live, tl.div_rn(grad_loss, total_p) * inv_scale, 0.0)
    coef_s = tl.where(live, tl.where(use_std != 0, per_dof * inv_scale, 2.0 * per_dof), 0.0)
    s_mean = tl.div_rn(tl.sum(sum_s, axis=0), M.to(tl.float32))

    # (2) grad_k = coef_p p_k (g_k - g_mean) - coef_s (s_k - s_mean)
    for start in range(0, M, BLOCK_M):
        offs, mask, x = _load_chunk(x_row, start, M, stride_xm, BLOCK_M)
        _, _, logq = _load_chunk(q_row, start, M, stride_qm, BLOCK_M)
        u, p, log_ratio, log_term, share = _chunk_terms(x, logq, hi, inv_scale, lse, log_eps)
        s = u - pivot
        g = tl.where(has_eps != 0, log_term + share, log_ratio + 1.0)
        grad = tl.where(live, coef_p * p * (g - g_mean) - coef_s * (s - s_mean), 0.0)
        tl.store(grad_row + offs.to(tl.int64), grad.to(grad_ptr.dtype.element_ty), mask=mask)


def _check_shapes(op: str, x: torch.Tensor, prior_logq: torch.Tensor) -> None:
    """What both kernels need to stay in bounds and read the right types (the user-facing checks
    are the functional's, ``kepler.losses.kepler_kl``)."""
    if x.ndim != 2:
        raise ValueError(f"{op}: x must be (B, M), got shape {tuple(x.shape)}")
    if prior_logq.ndim != 2 or prior_logq.shape[1] != x.shape[1] or prior_logq.shape[0] not in (1, x.shape[0]):
        raise ValueError(
            f"{op}: prior_logq must be (1, M) or (B, M) for x of shape {tuple(x.shape)}, got {tuple(prior_logq.shape)}"
        )
    if prior_logq.dtype != torch.float32:
        raise TypeError(f"{op}: prior_logq must be float32, got {prior_logq.dtype}")


def _row_arguments(x: torch.Tensor, prior_logq: torch.Tensor, use_std: bool, eps: float) -> dict:
    """The arguments both kernels take after their pointers, and their launch options."""
    M = x.shape[1]
    return dict(
        M=M,
        stride_xb=x.stride(0), stride_xm=x.stride(1),
        stride_qb=0 if prior_logq.shape[0] == 1 else prior_logq.stride(0), stride_qm=prior_logq.stride(1),
        log_eps=math.log(eps) if eps > 0 else 0.0, has_eps=int(eps > 0), use_std=int(use_std),
        **pick_config(M)._asdict(),
    )  # fmt: skip


def kepler_kl_triton(
    x: torch.Tensor, prior_logq: torch.Tensor, use_std: bool, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss ``(B,)`` float32 and stats ``(B, 3)`` float32 (max, scale, logsumexp of u = (x - max) / scale).

    ``x: (B, M)`` float32/bfloat16/float16, any strides; ``prior_logq: (1 | B, M)`` float32.
    """
    op = "kepler_kl_triton"
    check_launchable(op, {"x": x, "prior_logq": prior_logq})
    _check_shapes(op, x, prior_logq)
    B = x.shape[0]
    loss = torch.empty(B, dtype=torch.float32, device=x.device)
    stats = torch.empty(B, 3, dtype=torch.float32, device=x.device)
    if B == 0:
        return loss, stats
    launch(
        _kepler_kl_fwd_kernel,
        (B,),
        device=x.device,
        x_ptr=x, logq_ptr=prior_logq, loss_ptr=loss, stats_ptr=stats,
        **_row_arguments(x, prior_logq, use_std, eps),
    )  # fmt: skip
    return loss, stats


def kepler_kl_backward_triton(
    grad_loss: torch.Tensor,
    x: torch.Tensor,
    prior_logq: torch.Tensor,
    stats: torch.Tensor,
    use_std: bool,
    eps: float,
) -> torch.Tensor:
    """``dL/dx: (B, M)`` in x's dtype (contiguous) for ``L = sum_b grad_loss[b] * loss[b]``."""
    op = "kepler_kl_backward_triton"
    check_launchable(op, {"x": x, "prior_logq": prior_logq, "grad_loss": grad_loss, "stats": stats})
    _check_shapes(op, x, prior_logq)
    B = x.shape[0]
    if grad_loss.shape != (B,):
        raise ValueError(f"{op}: grad_loss must be ({B},), got {tuple(grad_loss.shape)}")
    if stats.shape != (B, 3) or stats.dtype != torch.float32:
        raise ValueError(f"{op}: stats must be float32 ({B}, 3), got {stats.dtype} {tuple(stats.shape)}")
    grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if B == 0:
        return grad
    launch(
        _kepler_kl_bwd_kernel,
        (B,),
        device=x.device,
        grad_loss_ptr=grad_loss.to(torch.float32).contiguous(), x_ptr=x, logq_ptr=prior_logq,
        stats_ptr=stats.contiguous(), grad_ptr=grad,
        **_row_arguments(x, prior_logq, use_std, eps),
    )  # fmt: skip
    return grad
