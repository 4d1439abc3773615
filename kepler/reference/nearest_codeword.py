"""Plain-PyTorch nearest-codeword search: the spec, the test oracle (in float64) and the last fallback.

Numerics every backend follows:

* Search score ``||e_k||^2 - 2 z . e_k`` (``||z||^2`` is the same for every ``k`` and is dropped),
  accumulated in float32 (float64 for float64 inputs); bfloat16/float16 inputs are upcast first.
* The smallest score wins; ties go to the lowest index.
* Non-finite scores (NaN, +-inf) never win: they count as ``+inf``. A row without any finite
  score gets index 0.
* The winner's distance is then recomputed exactly as ``sum((z - e_idx)**2)`` in the accumulation
  dtype, so it does not suffer the cancellation of the search score (and is NaN/inf for a row
  that holds NaN/inf).
"""

from __future__ import annotations

import torch

# Rows of z scored per step, so the (rows, K) score matrix stays near 64 MiB in float32 whatever N is.
_SCORE_ELEMENTS_PER_STEP = 1 << 24


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def nearest_codeword_ref(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest codeword of every row of ``z`` and its exact squared distance.

    Args:
        z: (N, D) or (G, N, D) floating point.
        codebook: (K, D), shared by every group, or (G, K, D), one codebook per group; same dtype
            and device as ``z``. K >= 1.

    Returns:
        indices: (N,) or (G, N) int64, in ``[0, K)``.
        sq_dist: same shape, float32 (float64 for float64 inputs), ``||z - codebook[indices]||^2``.

    Inputs are assumed valid (the functional ``kepler.nearest_codeword`` checks them). No autograd:
    gradients come from ``NearestCodewordFunction``.
    """
    grouped = z.dim() == 3
    z3 = z if grouped else z.unsqueeze(0)
    codebook3 = codebook if codebook.dim() == 3 else codebook.unsqueeze(0)
    groups, rows, _ = z3.shape
    num_codes = codebook3.shape[1]
    acc_dtype = _accumulation_dtype(z.dtype)

    indices = torch.zeros(groups, rows, dtype=torch.int64, device=z.device)
    sq_dist = torch.empty(groups, rows, dtype=acc_dtype, device=z.device)
    rows_per_step = max(1, _SCORE_ELEMENTS_PER_STEP // num_codes)
    with torch.no_grad():
        for g in range(groups):
            codes = codebook3[g if codebook3.shape[0] > 1 else 0].to(acc_dtype)
            code_sq_norms = (codes * codes).sum(dim=1)
            for start in range(0, rows, rows_per_step):
                block = z3[g, start : start + rows_per_step].to(acc_dtype)
                scores = code_sq_norms - 2.0 * (block @ codes.T)
                # torch.argmin would pick a NaN as the minimum: non-finite scores must never win.
                scores = torch.where(torch.isfinite(scores), scores, torch.inf)
                # argmin returns the first minimum: ties (and all-inf rows -> 0) go to the lowest index.
                best = scores.argmin(dim=1)
                indices[g, start : start + rows_per_step] = best
                sq_dist[g, start : start + rows_per_step] = ((block - codes[best]) ** 2).sum(dim=1)

    if not grouped:
        return indices[0], sq_dist[0]
    return indices, sq_dist
