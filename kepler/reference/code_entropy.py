"""Plain-PyTorch code entropy: the spec, the test oracle (in float64) and the last fallback.

For rows ``z_n`` and codewords ``e_k`` the soft assignment is ``p[n] = softmax_k(-||z_n - e_k||^2 / T)``
and the op returns two entropies (natural log):

* ``per_sample = mean_n H(p[n])``: low when each row is confidently assigned;
* ``batch = H(mean_n p[n])``: high when the codes are used uniformly.

Numerics every backend follows (the kernels compute the same quantities tile by tile, never an
N x K matrix; this reference builds it and is meant for small N x K):

* The score is the search score of ``nearest_codeword``, ``c[n, k] = ||e_k||^2 - 2 z_n . e_k``
  (``||z_n||^2`` is common to a row and cancels in the softmax and in both gradients), accumulated
  in float32 (float64 for float64 inputs), on ``z`` and the codebook multiplied by the exact power
  of two ``scale`` of :func:`kepler.reference.nearest_codeword.search_scale` (1 while every
  ``|value|`` is below ``2**32``), so ``c`` cannot overflow. The logits are
  ``-(c[n, k] - c_min[n]) * alpha`` with ``c_min[n] = min_k c[n, k]`` and
  ``alpha = inv_temperature / scale**2`` (computed in float64), capped at the largest finite value
  of the accumulation dtype (an infinite ``alpha`` would make the winner's logit ``0 * inf``): exactly the logits of
  the inputs at their own scale, up to that cap, where the assignment is one-hot anyway.
* Per row: ``l = sum_k exp(-t_k)`` with ``t_k = (c_k - c_min) * alpha >= 0``, so ``1 <= l <= K``,
  and ``H = log l + (sum_k t_k exp(-t_k)) / l``. A term whose ``exp(-t_k)`` is 0 adds exactly 0
  (never ``0 * inf``): a saturated row (one code wins by far) has entropy exactly 0, a row tied
  between ``m`` codes exactly ``log m`` (up to rounding).
* ``code_mass[k] = sum_n p[n, k]`` with ``p[n, k] = exp(-t_nk - log l_n)``, and
  ``batch = log N - (1 / N) sum_k code_mass[k] log code_mass[k]`` (``0 log 0 = 0``).
* A row with a non-finite score (NaN or inf in its ``z`` row, or anywhere in the codebook) has
  NaN entropy and NaN ``p``: NaN propagates to both results and both gradients.
* ``N == 0`` gives ``per_sample = batch = 0`` (an empty batch adds nothing to a loss) and zero
  gradients.

Gradients, with ``g_s`` and ``g_b`` the incoming gradients of the two results, ``w_k = log
code_mass[k] - log N`` and ``r_n = sum_k p[n, k] w_k``: the gradient of the logit ``s[n, k]`` is

    G[n, k] = -(p[n, k] / N) * (g_s * (log p[n, k] + H_n) + g_b * (w_k - r_n))

(0 where ``p[n, k] == 0``), and through ``s = -alpha * c`` with ``c`` at the scaled inputs:
``grad_z[n] = 2 alpha scale sum_k G[n, k] e'_k`` and
``grad_e[k] = 2 alpha scale (sum_n G[n, k] z'_n - e'_k sum_n G[n, k])`` (``'`` = multiplied by
``scale``). This reference obtains them by autograd through the formulas above; the kernels'
backward computes exactly these sums.
"""

from __future__ import annotations

import math

import torch

from kepler._numerics import accumulation_dtype, effective_inv_temperature
from kepler.reference.nearest_codeword import search_scale

ROW_STATS = ("c_min", "log_l", "entropy")
"""The per-row values the kernel op saves for its backward, in this order along the last axis of
``row_stats (G, N, 3)``."""


def code_entropy_raw_ref(
    z: torch.Tensor, codebook: torch.Tensor, scale: torch.Tensor, inv_temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The contract of the kernel op ``kepler::code_entropy``, by autograd-able PyTorch.

    Args:
        z: (G, N, D) floating point.
        codebook: (Gc, K, D) with Gc in {1, G}; z's dtype and device. K >= 1.
        scale: 0-d tensor of the accumulation dtype on z's device, a power of two
            (``search_scale(z, codebook)``).
        inv_temperature: 1 / T, finite and > 0.

    Returns (accumulation dtype: float32, float64 for float64 inputs):
        row_stats: (G, N, 3), per row (:data:`ROW_STATS`): ``c_min``, ``log l``, ``H``.
        code_mass: (G, K), ``sum_n p[n, k]``.
    """
    acc_dtype = accumulation_dtype(z.dtype)
    points = z.to(acc_dtype) * scale
    codes = codebook.to(acc_dtype) * scale
    scores = (codes * codes).sum(dim=-1).unsqueeze(-2) - 2.0 * (points @ codes.transpose(-1, -2))  # (G, N, K)
    finite_row = torch.isfinite(scores).all(dim=-1, keepdim=True)
    c_min = scores.detach().amin(dim=-1, keepdim=True)
    alpha = effective_inv_temperature(inv_temperature, scale).to(acc_dtype)
    shifted = (scores - c_min) * alpha  # t >= 0
    weights = torch.exp(-shifted)
    visible = weights > 0
    # t * exp(-t) is exactly 0 where exp(-t) underflows (t may be inf there: never 0 * inf).
    l_sum = weights.sum(dim=-1, keepdim=True)
    weighted_t = torch.where(visible, torch.where(visible, shifted, 0.0) * weights, 0.0).sum(dim=-1, keepdim=True)
    nan = torch.full((), float("nan"), dtype=acc_dtype, device=z.device)
    log_l = torch.where(finite_row, torch.log(l_sum), nan)
    entropy = torch.where(finite_row, log_l + weighted_t / l_sum, nan)
    code_mass = torch.where(finite_row, weights / l_sum, nan).sum(dim=-2)
    return torch.cat([c_min.expand_as(log_l), log_l, entropy], dim=-1), code_mass


def entropies(row_stats: torch.Tensor, code_mass: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_sample`` and ``batch`` (each (G,)) from the op's ``row_stats (G, N, 3)`` and
    ``code_mass (G, K)``: ``mean_n H_n`` and ``log N - (1 / N) sum_k mass_k log mass_k``; both 0
    for N = 0. O(G (N + K)); differentiable (the reference backend runs autograd through it)."""
    rows = row_stats.shape[-2]
    per_sample = row_stats[..., 2].sum(dim=-1) / max(rows, 1)
    # Masses that are exactly 0 add 0, with a zero (not NaN) gradient; a NaN mass stays NaN.
    unused = code_mass == 0
    mass_log_mass = torch.where(unused, 0.0, code_mass * torch.log(torch.where(unused, 1.0, code_mass)))
    batch = math.log(max(rows, 1)) - mass_log_mass.sum(dim=-1) / max(rows, 1)
    return per_sample, batch


def code_entropy_ref(
    z: torch.Tensor, codebook: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean per-row entropy and entropy of the mean of the soft code assignments.

    Args:
        z: (N, D) or (G, N, D) floating point.
        codebook: (K, D), shared by every group, or (G, K, D); z's dtype and device. K >= 1.
        temperature: T, finite and > 0 (``1 / T`` finite).

    Returns:
        per_sample, batch: 0-d for (N, D) ``z``, (G,) for grouped ``z``; float32 (float64 for
        float64 inputs); differentiable with respect to ``z`` and ``codebook`` by autograd.

    Inputs are assumed valid (the functional ``kepler.losses.code_entropy`` checks them).
    """
    grouped = z.dim() == 3
    z3 = z if grouped else z.unsqueeze(0)
    codebook3 = codebook if codebook.dim() == 3 else codebook.unsqueeze(0)
    row_stats, code_mass = code_entropy_raw_ref(z3, codebook3, search_scale(z3, codebook3), 1.0 / temperature)
    per_sample, batch = entropies(row_stats, code_mass)
    if grouped:
        return per_sample, batch
    return per_sample[0], batch[0]
