"""Triton kernels for the fused Kepler KL regularizer, and their launchers.

One program per row, looping over the row in ``BLOCK``-wide chunks; fp32 math whatever the input
dtype. Forward passes: (1) mean / M2 (Chan's merge of per-chunk moments), max, min; (2) logsumexp
of ``s``; (3) ``sum p * log(p / q + eps)``. Backward passes: (1) ``sum p``, ``sum p g``, ``sum p s``,
``sum p s g``, ``sum s``; (2) the gradient. The math is documented in ``kepler/ops/kepler_kl.py``.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

# (BLOCK, num_warps) the launcher picks from: the smallest BLOCK that holds the row, else the last.
BLOCK_CONFIGS = ((256, 2), (1024, 4), (4096, 8))
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _log_ratio_eps(log_ratio, log_eps):
    """log(exp(log_ratio) + eps) and exp(log_ratio) / (exp(log_ratio) + eps), stably."""
    diff = log_ratio - log_eps
    e = tl.exp(-tl.abs(diff))
    one_plus = 1.0 + e
    rounded_e = one_plus - 1.0
    # log1p(e) = log(1 + e) * e / ((1 + e) - 1), exact to rounding even for tiny e
    log1p_e = tl.where(rounded_e == 0.0, e, tl.log(one_plus) * (e / tl.where(rounded_e == 0.0, 1.0, rounded_e)))
    log_term = tl.maximum(log_ratio, log_eps) + log1p_e
    share = tl.where(diff >= 0.0, 1.0, e) / one_plus
    return log_term, share


# Runtime ints that may equal 1 are kept as i32 (Triton would otherwise specialize them to constexpr).
_NOT_SPECIALIZED = ["num_cols", "has_eps", "use_std"]


@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _kepler_kl_fwd_kernel(
    x_ptr,
    logq_ptr,
    loss_ptr,
    stats_ptr,
    num_cols,
    stride_xb,
    stride_xm,
    stride_qb,
    stride_qm,
    log_eps,
    has_eps,
    use_std,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xb
    q_row = logq_ptr + row * stride_qb
    cols = tl.arange(0, BLOCK)

    # (1) moments: per-chunk two-pass mean/M2 merged with Chan's update; max and min.
    count = 0.0
    mean = 0.0
    m2 = 0.0
    hi = float("-inf")
    lo = float("inf")
    for start in range(0, num_cols, BLOCK):
        offs = start + cols
        mask = offs < num_cols
        x = tl.load(x_row + offs.to(tl.int64) * stride_xm, mask=mask, other=0.0).to(tl.float32)
        n_chunk = tl.minimum(num_cols - start, BLOCK).to(tl.float32)
        chunk_mean = tl.sum(x, axis=0) / n_chunk
        dev = tl.where(mask, x - chunk_mean, 0.0)
        chunk_m2 = tl.sum(dev * dev, axis=0)
        hi = tl.maximum(hi, tl.max(tl.where(mask, x, float("-inf")), axis=0))
        lo = tl.minimum(lo, tl.min(tl.where(mask, x, float("inf")), axis=0))
        total = count + n_chunk
        delta = chunk_mean - mean
        mean = mean + delta * (n_chunk / total)
        m2 = m2 + chunk_m2 + delta * delta * (count * n_chunk / total)
        count = total

    variance = m2 / tl.maximum(num_cols - 1, 1).to(tl.float32)
    scale = tl.where(use_std != 0, tl.sqrt(variance), variance)
    # One element, all equal, or a zero divisor: s = 0. A NaN scale (NaN row) stays NaN.
    degenerate = (scale == scale) & ((num_cols == 1) | (hi == lo) | (scale == 0.0))
    scale = tl.where(degenerate, 0.0, scale)
    inv_scale = tl.where(degenerate, 0.0, 1.0 / tl.where(degenerate, 1.0, scale))
    shift = (hi - mean) * inv_scale

    # (2) logsumexp of s.
    acc = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, num_cols, BLOCK):
        offs = start + cols
        mask = offs < num_cols
        x = tl.load(x_row + offs.to(tl.int64) * stride_xm, mask=mask, other=0.0).to(tl.float32)
        acc += tl.where(mask, tl.exp((x - mean) * inv_scale - shift), 0.0)
    lse = shift + tl.log(tl.sum(acc, axis=0))

    # (3) sum_i p_i * log(p_i / q_i + eps).
    acc = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, num_cols, BLOCK):
        offs = start + cols
        mask = offs < num_cols
        offs64 = offs.to(tl.int64)
        x = tl.load(x_row + offs64 * stride_xm, mask=mask, other=0.0).to(tl.float32)
        logq = tl.load(q_row + offs64 * stride_qm, mask=mask, other=0.0)
        log_p = (x - mean) * inv_scale - lse
        log_ratio = log_p - logq
        log_term, _ = _log_ratio_eps(log_ratio, log_eps)
        term = tl.where(has_eps != 0, log_term, log_ratio)
        acc += tl.where(mask, tl.exp(log_p) * term, 0.0)

    tl.store(loss_ptr + row, tl.sum(acc, axis=0))
    tl.store(stats_ptr + row * 3 + 0, mean)
    tl.store(stats_ptr + row * 3 + 1, scale)
    tl.store(stats_ptr + row * 3 + 2, lse)


@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _kepler_kl_bwd_kernel(
    grad_loss_ptr,
    x_ptr,
    logq_ptr,
    stats_ptr,
    grad_ptr,
    num_cols,
    stride_xb,
    stride_xm,
    stride_qb,
    stride_qm,
    log_eps,
    has_eps,
    use_std,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xb
    q_row = logq_ptr + row * stride_qb
    grad_row = grad_ptr + row * num_cols
    cols = tl.arange(0, BLOCK)
    grad_loss = tl.load(grad_loss_ptr + row)
    mean = tl.load(stats_ptr + row * 3 + 0)
    scale = tl.load(stats_ptr + row * 3 + 1)
    lse = tl.load(stats_ptr + row * 3 + 2)
    inv_scale = tl.where(scale == 0.0, 0.0, 1.0 / tl.where(scale == 0.0, 1.0, scale))

    # (1) sums over the row; g_i = dL/dp_i = log(r_i + eps) + r_i / (r_i + eps).
    sum_p = tl.zeros((BLOCK,), tl.float32)
    sum_pg = tl.zeros((BLOCK,), tl.float32)
    sum_ps = tl.zeros((BLOCK,), tl.float32)
    sum_psg = tl.zeros((BLOCK,), tl.float32)
    sum_s = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, num_cols, BLOCK):
        offs = start + cols
        mask = offs < num_cols
        offs64 = offs.to(tl.int64)
        x = tl.load(x_row + offs64 * stride_xm, mask=mask, other=0.0).to(tl.float32)
        logq = tl.load(q_row + offs64 * stride_qm, mask=mask, other=0.0)
        s = (x - mean) * inv_scale
        p = tl.where(mask, tl.exp(s - lse), 0.0)
        log_ratio = s - lse - logq
        log_term, share = _log_ratio_eps(log_ratio, log_eps)
        g = tl.where(has_eps != 0, log_term + share, log_ratio + 1.0)
        s = tl.where(mask, s, 0.0)
        sum_p += p
        sum_pg += p * g
        sum_ps += p * s
        sum_psg += p * s * g
        sum_s += s
    total_p = tl.sum(sum_p, axis=0)
    g_mean = tl.sum(sum_pg, axis=0) / total_p
    # S = sum_i d_i s_i with d_i = G p_i (g_i - g_mean) / sum p; see kepler/ops/kepler_kl.py.
    s_dot_d = grad_loss * (tl.sum(sum_psg, axis=0) - g_mean * tl.sum(sum_ps, axis=0)) / total_p
    per_dof = s_dot_d / tl.maximum(num_cols - 1, 1).to(tl.float32)
    live = inv_scale != 0.0  # degenerate rows get a zero gradient
    coef_p = tl.where(live, grad_loss / total_p * inv_scale, 0.0)
    coef_s = tl.where(live, tl.where(use_std != 0, per_dof * inv_scale, 2.0 * per_dof), 0.0)
    s_mean = tl.sum(sum_s, axis=0) / num_cols.to(tl.float32)

    # (2) grad_k = coef_p p_k (g_k - g_mean) - coef_s (s_k - s_mean)
    for start in range(0, num_cols, BLOCK):
        offs = start + cols
        mask = offs < num_cols
        offs64 = offs.to(tl.int64)
        x = tl.load(x_row + offs64 * stride_xm, mask=mask, other=0.0).to(tl.float32)
        logq = tl.load(q_row + offs64 * stride_qm, mask=mask, other=0.0)
        s = (x - mean) * inv_scale
        p = tl.exp(s - lse)
        log_ratio = s - lse - logq
        log_term, share = _log_ratio_eps(log_ratio, log_eps)
        g = tl.where(has_eps != 0, log_term + share, log_ratio + 1.0)
        grad = tl.where(live, coef_p * p * (g - g_mean) - coef_s * (s - s_mean), 0.0)
        tl.store(grad_row + offs64, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def block_config(num_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of ``num_cols`` elements."""
    for block, num_warps in BLOCK_CONFIGS:
        if num_cols <= block:
            return block, num_warps
    return BLOCK_CONFIGS[-1]


def _check(op: str, x: torch.Tensor, prior_logq: torch.Tensor, eps: float) -> None:
    if x.ndim != 2:
        raise ValueError(f"{op}: x must be (B, M), got shape {tuple(x.shape)}")
    if x.dtype not in INPUT_DTYPES:
        raise TypeError(f"{op}: x must be float32, bfloat16 or float16, got {x.dtype}")
    if x.shape[1] == 0:
        raise ValueError(f"{op}: x must have at least one column")
    if prior_logq.ndim != 2 or prior_logq.shape[1] != x.shape[1] or prior_logq.shape[0] not in (1, x.shape[0]):
        raise ValueError(
            f"{op}: prior_logq must be (1, M) or (B, M) for x of shape {tuple(x.shape)}, "
            f"got {tuple(prior_logq.shape)}"
        )
    if prior_logq.dtype != torch.float32:
        raise TypeError(f"{op}: prior_logq must be float32, got {prior_logq.dtype}")
    if prior_logq.device != x.device:
        raise ValueError(f"{op}: prior_logq is on {prior_logq.device} but x is on {x.device}")
    if not eps >= 0.0:
        raise ValueError(f"{op}: eps must be >= 0, got {eps}")


def _launch_args(x: torch.Tensor, prior_logq: torch.Tensor, use_std: bool, eps: float) -> dict:
    block, num_warps = block_config(x.shape[1])
    return dict(
        num_cols=x.shape[1],
        stride_xb=x.stride(0),
        stride_xm=x.stride(1),
        stride_qb=0 if prior_logq.shape[0] == 1 else prior_logq.stride(0),
        stride_qm=prior_logq.stride(1),
        log_eps=math.log(eps) if eps > 0 else 0.0,
        has_eps=int(eps > 0),
        use_std=int(use_std),
        BLOCK=block,
        num_warps=num_warps,
    )


def kepler_kl_triton(
    x: torch.Tensor, prior_logq: torch.Tensor, use_std: bool, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss ``(B,)`` float32 and stats ``(B, 3)`` float32 (mean, scale, logsumexp of s).

    ``x: (B, M)`` float32/bfloat16/float16, any strides; ``prior_logq: (1 | B, M)`` float32.
    """
    _check("kepler_kl_triton", x, prior_logq, eps)
    num_rows = x.shape[0]
    loss = torch.empty(num_rows, dtype=torch.float32, device=x.device)
    stats = torch.empty(num_rows, 3, dtype=torch.float32, device=x.device)
    if num_rows == 0:
        return loss, stats
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _kepler_kl_fwd_kernel[(num_rows,)](
            x, prior_logq, loss, stats, **_launch_args(x, prior_logq, use_std, eps)
        )
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
    _check("kepler_kl_backward_triton", x, prior_logq, eps)
    num_rows = x.shape[0]
    if grad_loss.shape != (num_rows,):
        raise ValueError(f"kepler_kl_backward_triton: grad_loss must be ({num_rows},), got {tuple(grad_loss.shape)}")
    if stats.shape != (num_rows, 3) or stats.dtype != torch.float32:
        raise ValueError(f"kepler_kl_backward_triton: stats must be float32 ({num_rows}, 3), got {stats.dtype} "
                         f"{tuple(stats.shape)}")
    grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if num_rows == 0:
        return grad
    grad_loss = grad_loss.to(torch.float32).contiguous()
    stats = stats.contiguous()
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _kepler_kl_bwd_kernel[(num_rows,)](
            grad_loss, x, prior_logq, stats, grad, **_launch_args(x, prior_logq, use_std, eps)
        )
    return grad
