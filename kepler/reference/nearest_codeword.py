"""Plain-PyTorch nearest-codeword search: the spec, the test oracle (in float64) and the last fallback.

Numerics every backend follows:

* Search score ``||e_k||^2 - 2 z . e_k`` (``||z||^2`` is the same for every ``k`` and is dropped),
  accumulated in float32 (float64 for float64 inputs); bfloat16/float16 inputs are upcast first.
* When the largest ``|value|`` of ``z`` and the codebook reaches ``2**32``, both are first
  multiplied by the power of two that brings it into ``[2**31, 2**32)`` (:func:`search_scale`):
  beyond ~1e19 the float32 score overflows and would pick a wrong index. The argmin is invariant
  to a common positive scaling and a power of two scales exactly (bar values it flushes below
  float32's smallest subnormal, which cannot move a score).
* The smallest score wins; ties go to the lowest index.
* Non-finite scores (NaN, +-inf) never win: they count as ``+inf``. A row without any finite
  score gets index 0.
* The winner's distance is then recomputed exactly as ``sum((z - e_idx)**2)`` in the accumulation
  dtype, so it does not suffer the cancellation of the search score (and is NaN/inf for a row
  that holds NaN/inf, or inf where the distance itself does not fit the dtype).
"""

from __future__ import annotations

import torch

from kepler._numerics import accumulation_dtype, power_of_two_below

# Below 2**32 every |value| is searched as it is: ||e||^2 - 2 z.e stays under 2**66 * D, finite in
# float32 for any D below 2**61.
_MAX_UNSCALED_EXPONENT = 32

# Rows of z scored per step, so the (rows, K) score matrix stays near 64 MiB in float32 whatever N is.
_SCORE_ELEMENTS_PER_STEP = 1 << 24


def _largest_magnitude(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """max |x| over the finite values of x, as a 0-d ``dtype`` tensor. NaN/inf are read as 0: one
    of them must not switch the scaling off for every other row (a finite row near float32's range
    would then overflow its scores and get a wrong index). nan_to_num + aminmax costs ~0.5% of a
    search on the CPU (16384 x 1024 x 32); masking with ``where`` would cost ~35%."""
    low, high = torch.aminmax(torch.nan_to_num(x.detach(), nan=0.0, posinf=0.0, neginf=0.0))
    return torch.maximum(-low, high).to(dtype)


def search_scale(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The power of two that ``z`` and ``codebook`` are multiplied by before the search.

    0-d tensor of the accumulation dtype: 1 while every ``|value|`` is below ``2**32``, else the
    power of two that brings the largest into ``[2**31, 2**32)``. Computed without a branch, so
    torch.compile traces it; NaN and inf do not count (the finite values decide it).
    """
    acc_dtype = accumulation_dtype(z.dtype)
    largest = _largest_magnitude(codebook, acc_dtype)
    if z.numel():  # the extrema of an empty tensor are an error
        largest = torch.maximum(largest, _largest_magnitude(z, acc_dtype))
    return power_of_two_below(largest, _MAX_UNSCALED_EXPONENT)


def winner_rows(codebook: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The codewords ``indices`` picked, and where they sit in ``codebook`` seen as one table.

    Args:
        codebook: (Gc, K, D) with Gc in {1, G}: shared by every group, or one codebook per group.
        indices: (G, N) int64 in ``[0, K)``.

    Returns:
        flat_index: (G * N,) int64, rows of ``codebook.reshape(Gc * K, D)``.
        winners: (G, N, D), ``codebook``'s dtype; differentiable with respect to ``codebook``.
    """
    code_groups, num_codes, dim = codebook.shape
    groups, rows = indices.shape
    flat_index = indices
    if code_groups > 1:
        flat_index = indices + torch.arange(groups, device=indices.device).unsqueeze(1) * num_codes
    flat_index = flat_index.reshape(-1)
    return flat_index, codebook.reshape(code_groups * num_codes, dim)[flat_index].view(groups, rows, dim)


def nearest_codeword_ref(z: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the nearest codeword of every row of ``z`` and its exact squared distance.

    Args:
        z: (N, D) or (G, N, D) floating point.
        codebook: (K, D), shared by every group, or (G, K, D), one codebook per group; same dtype
            and device as ``z``. K >= 1.

    Returns:
        indices: (N,) or (G, N) int64, in ``[0, K)``; not differentiable.
        sq_dist: same shape, float32 (float64 for float64 inputs), ``||z - codebook[indices]||^2``;
            differentiable with respect to ``z`` and ``codebook`` by autograd (the search itself
            runs without it).

    Inputs are assumed valid (the functional ``kepler.nearest_codeword`` checks them).
    """
    grouped = z.dim() == 3
    z3 = z if grouped else z.unsqueeze(0)
    codebook3 = codebook if codebook.dim() == 3 else codebook.unsqueeze(0)
    groups, rows, _ = z3.shape
    num_codes = codebook3.shape[1]
    acc_dtype = accumulation_dtype(z.dtype)

    indices = torch.zeros(groups, rows, dtype=torch.int64, device=z.device)
    rows_per_step = max(1, _SCORE_ELEMENTS_PER_STEP // num_codes)
    with torch.no_grad():
        scale = search_scale(z3, codebook3)
        for g in range(groups):
            codes = codebook3[g if codebook3.shape[0] > 1 else 0].to(acc_dtype) * scale
            code_sq_norms = (codes * codes).sum(dim=1)
            for start in range(0, rows, rows_per_step):
                block = z3[g, start : start + rows_per_step].to(acc_dtype) * scale
                scores = code_sq_norms - 2.0 * (block @ codes.T)
                # torch.argmin would pick a NaN as the minimum: non-finite scores must never win.
                scores = torch.where(torch.isfinite(scores), scores, torch.inf)
                # argmin returns the first minimum: ties (and all-inf rows -> 0) go to the lowest index.
                indices[g, start : start + rows_per_step] = scores.argmin(dim=1)

    _, winners = winner_rows(codebook3.to(acc_dtype), indices)
    sq_dist = ((z3.to(acc_dtype) - winners) ** 2).sum(dim=-1)
    if not grouped:
        return indices[0], sq_dist[0]
    return indices, sq_dist
