"""Plain-PyTorch reference of the released Kepler KL regularizer: the spec and the test oracle.

The released code (Kepler Codebook, ``KeplerLoss.forward``) flattens each image's quantized latent
to a row, standardizes the row, takes a softmax, does the same to the fixed hypercube prior, and
returns the batch mean of ``sum_i p_i * log(p_i / q_i + 1e-5)``. Its "standardization" divides by
the unbiased *variance*, not the standard deviation; ``mode="official"`` keeps that, ``mode="std"``
divides by the unbiased standard deviation instead.

Degenerate rows (decided here, followed by every backend): a row with a single element (unbiased
variance undefined) or with all elements equal (variance zero) standardizes to all zeros, so its
softmax is uniform; its gradient is zero. A NaN anywhere in a row makes that row's loss NaN.
"""

from __future__ import annotations

import torch

from kepler.ops._common import accumulation_dtype

MODES = ("official", "std")


def standardize_rows(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Standardize each row of ``x: (..., M)``: ``(x - mean) / var`` (official) or ``/ std`` (std).

    The variance is the unbiased one (``M - 1``). Rows with ``M == 1``, with all elements equal or
    whose divisor is zero standardize to zeros (see the module docstring).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    num_cols = x.shape[-1]
    deviation = x - x.mean(dim=-1, keepdim=True)
    variance = deviation.square().sum(dim=-1, keepdim=True) / max(num_cols - 1, 1)
    # amax == amin rather than variance == 0: the mean of a constant row is rounded, so its
    # deviations (and variance) can be tiny but nonzero; NaN rows are never "constant".
    constant = x.amax(dim=-1, keepdim=True) == x.amin(dim=-1, keepdim=True)
    # Masked before sqrt and division so no inf/NaN gradient leaks through torch.where.
    safe_variance = torch.where(constant, torch.ones_like(variance), variance)
    scale = safe_variance if mode == "official" else safe_variance.sqrt()
    constant = constant | (scale == 0)
    safe_scale = torch.where(constant, torch.ones_like(scale), scale)
    return torch.where(constant, torch.zeros_like(deviation), deviation / safe_scale)


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
    p = log_p.exp()
    ratio = torch.exp(log_p - log_q)  # p / q
    return (p * torch.log(ratio + eps)).sum(dim=-1)


def kepler_kl_ref(
    x: torch.Tensor, prior: torch.Tensor, mode: str = "official", eps: float = 1e-5
) -> torch.Tensor:
    """Batch mean of the per-row Kepler KL: ``mean_b sum_i p_bi * log(p_bi / q_bi + eps)``.

    ``x: (B, M)`` latents, one flattened image per row; ``prior: (M,) or (B, M)``. Returns a
    scalar (float32, or float64 for float64 inputs). ``eps = 0`` gives the plain KL(p || q).
    """
    prior_logq = kepler_kl_prior_logq_ref(prior.to(accumulation_dtype(x.dtype)), mode)
    return kepler_kl_rows_ref(x, prior_logq, mode, eps).mean()
