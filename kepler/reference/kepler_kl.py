"""Plain-PyTorch reference of the released Kepler KL regularizer: the spec and the test oracle.

The released code (Kepler Codebook, ``KeplerLoss.forward``) flattens each image's quantized latent
to a row, standardizes the row, takes a softmax, does the same to the fixed hypercube prior, and
returns the batch mean of ``sum_i p_i * log(p_i / q_i + 1e-5)``. Its "standardization" divides by
the unbiased *variance*, not the standard deviation; ``mode="official"`` keeps that, ``mode="std"``
divides by the unbiased standard deviation instead.

Degenerate rows (decided here, followed by every backend): a row with a single element (unbiased
variance undefined) or with all elements equal (variance zero) standardizes to all zeros, so its
softmax is uniform; its gradient is zero. A NaN or an infinity anywhere in a row makes that row's
loss NaN. Any other row's divisor is at least ``2**MIN_DIVISOR_EXPONENT`` (below).
"""

from __future__ import annotations

import torch

from kepler._numerics import accumulation_dtype

MODES = ("official", "std")
# Smallest divisor (variance or std) of a row that is not constant: 2**-126, float32's smallest
# normal number, so that the float32 kernels' 1 / divisor is finite. Only rows whose values differ
# by less than ~1e-19 reach it; their softmax saturates either way, so the loss is the same as
# with the exact divisor, and the gradient (~1 / divisor, past float32's range) is taken at it.
MIN_DIVISOR_EXPONENT = -126


def standardize_rows(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Standardize each row of ``x: (..., M)``: ``(x - mean) / var`` (official) or ``/ std`` (std).

    The variance is the unbiased one (``M - 1``). Rows with ``M == 1`` or all elements equal
    standardize to zeros; other rows' divisors are floored at ``2**MIN_DIVISOR_EXPONENT`` (see
    the module docstring).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    num_cols = x.shape[-1]
    # Each row is first multiplied by the power of two 2**-k that brings its largest finite |value|
    # into [0.5, 1) (exact), and official mode's result by 2**-k again (x = 2**k y gives
    # (x - mean) / var = 2**-k (y - mean) / var): squares of values near 1e19 overflow float32 and
    # those of values near 1e-20 lose their digits in its subnormals (issue 15's magnitudes).
    largest = torch.nan_to_num(x.detach(), nan=0.0, posinf=0.0, neginf=0.0).abs().amax(dim=-1, keepdim=True)
    # The exponent is kept at or above -126 so that 2**-k is a float32 number.
    exponent = torch.frexp(largest).exponent.clamp_min(-126)
    unscale = torch.ldexp(torch.ones_like(largest), -exponent)
    x = x * unscale
    deviation = x - x.mean(dim=-1, keepdim=True)
    variance = deviation.square().sum(dim=-1, keepdim=True) / max(num_cols - 1, 1)
    # amax == amin rather than variance == 0: the mean of a constant row is rounded, so its
    # deviations (and variance) can be tiny but nonzero; NaN rows are never "constant".
    # A row of one infinity repeated is not constant: inf - inf is undefined, its loss NaN.
    high = x.amax(dim=-1, keepdim=True)
    constant = (high == x.amin(dim=-1, keepdim=True)) & high.isfinite()
    # Masked before sqrt and division so no inf/NaN gradient leaks through torch.where.
    safe_variance = torch.where(constant, torch.ones_like(variance), variance)
    scale = safe_variance if mode == "official" else safe_variance.sqrt()
    # The divisor is at least MIN_DIVISOR at x's scale (2**-k here: 2**-2k for a variance).
    floor = torch.ldexp(torch.ones_like(largest), MIN_DIVISOR_EXPONENT - (2 if mode == "official" else 1) * exponent)
    safe_scale = torch.where(constant, torch.ones_like(scale), torch.maximum(scale, floor))
    standardized = deviation / safe_scale * (unscale if mode == "official" else 1.0)
    return torch.where(constant, torch.zeros_like(deviation), standardized)


def kepler_kl_prior_logq_ref(prior: torch.Tensor, mode: str = "official") -> torch.Tensor:
    """``log_softmax`` of the standardized prior ``prior: (M,) or (B, M)``, in the prior's dtype."""
    return torch.log_softmax(standardize_rows(prior, mode), dim=-1)


def kepler_kl_rows_ref(
    x: torch.Tensor, prior_logq: torch.Tensor, mode: str = "official", eps: float = 1e-5
) -> torch.Tensor:
    """Per-row loss ``(B,)`` for ``x: (B, M)`` and ``prior_logq: (M,) or (B, M)`` (log q).

    Computed in float32 for float32/bfloat16/float16 inputs and in float64 for float64 inputs.
    """
    acc_dtype = accumulation_dtype(x.dtype)
    log_p = torch.log_softmax(standardize_rows(x.to(acc_dtype), mode), dim=-1)
    log_q = prior_logq.to(acc_dtype)
    # log(p / q + eps) as logaddexp(log p - log q, log eps): p / q overflows where q is tiny, and
    # with eps = 0 a saturated softmax (p = 0) would give 0 * log(0) = NaN instead of its limit 0.
    log_eps = torch.tensor(float(eps), dtype=acc_dtype, device=x.device).log()
    return (log_p.exp() * torch.logaddexp(log_p - log_q, log_eps)).sum(dim=-1)


def kepler_kl_ref(
    x: torch.Tensor, prior: torch.Tensor, mode: str = "official", eps: float = 1e-5
) -> torch.Tensor:
    """Batch mean of the per-row Kepler KL: ``mean_b sum_i p_bi * log(p_bi / q_bi + eps)``.

    ``x: (B, M)`` latents, one flattened image per row; ``prior: (M,) or (B, M)``. Returns a
    scalar (float32, or float64 for float64 inputs). ``eps = 0`` gives the plain KL(p || q).
    """
    prior_logq = kepler_kl_prior_logq_ref(prior.to(accumulation_dtype(x.dtype)), mode)
    return kepler_kl_rows_ref(x, prior_logq, mode, eps).mean()
