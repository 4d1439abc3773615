"""Plain-PyTorch reference of the Gaussian-potential packing energy: the spec and the test oracle.

For a codebook of K codewords c_i in R^d,

    E = log( 1/(K(K-1)) * sum_{i != j} exp(-t * ||c_i - c_j||^2 / s^2) )

With ``normalize=True`` the codebook is first centred (c - mean over K) and s^2 is its mean squared
norm, so E is invariant to translating and scaling the codebook (it cannot be lowered by
inflating it); with ``normalize=False`` s^2 = 1 and no centring. Lower E means codewords spread
more evenly: minimizing it drives toward dense packings.

The reference builds the full (G, K, K) matrix (and a (G, K, K, d) difference tensor), so it is
meant for small K; the fused kernels never materialize it.
"""

from __future__ import annotations

import math

import torch

from kepler._numerics import accumulation_dtype, power_of_two_below

# Floor of s^2 with normalize=True. A codebook whose codewords all coincide (up to rounding) has
# s^2 ~ 0; dividing by it would blow the points up to rounding noise. With the floor such a
# codebook maps to (near) zero points, E = log(1) = 0 and the gradient is finite (zero for exactly
# equal codewords). 1e-20 keeps the backward of 1/sqrt(s^2) (~ s^-3) finite in float32 while
# leaving any codebook with a spread above 1e-10 untouched.
MIN_SPREAD_SQ = 1e-20


def _scale_below(values: torch.Tensor, exponent: int) -> torch.Tensor:
    """``values: (G, K, d)`` with each group divided by the power of two that brings its largest
    ``|value|`` into ``[2**(exponent - 1), 2**exponent)`` when it reaches ``2**exponent`` (else 1);
    without a branch, so torch.compile traces it. The factor is a constant to autograd."""
    largest = values.detach().abs().amax(dim=(-2, -1), keepdim=True)
    return values * power_of_two_below(largest, exponent)


def normalize_codebook(codebook: torch.Tensor, normalize: bool) -> torch.Tensor:
    """The points whose raw energy is the packing energy of ``codebook``.

    codebook: (G, K, d) float. With ``normalize`` returns (c - mean_K c) / s with
    s^2 = max(mean_K ||c - mean||^2, MIN_SPREAD_SQ) (computed without overflow for any finite
    codebook), in float32 (float64 for float64 input);
    without it returns ``codebook`` unchanged (kernels upcast low-precision inputs themselves).
    Differentiable by autograd; O(G K d).
    """
    if not normalize:
        return codebook
    points = codebook.to(accumulation_dtype(codebook.dtype))
    # The sum over K overflows float32 near its range and the squared norms past ~1e19 (s^2 = inf
    # maps every point to 0, E = 0). E is invariant to scaling, so before each step the values are
    # divided by a power of two where needed; exact in floating point. Once centred they are
    # brought below 1, so that s^2 and its s^-3 backward stay normal floats, while the floor
    # MIN_SPREAD_SQ is untouched: a group scaled down has s^2 >= 0.25 / K.
    points = _scale_below(points, 100)
    centred = _scale_below(points - points.mean(dim=-2, keepdim=True), 0)
    spread_sq = centred.square().sum(dim=-1).mean(dim=-1, keepdim=True)
    return centred * torch.rsqrt(spread_sq.clamp_min(MIN_SPREAD_SQ)).unsqueeze(-1)


def packing_energy_raw_ref(y: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw energy of the points ``y``: the contract of the ``kepler::packing_energy`` op.

    y: (G, K, d) float, K >= 2. Returns energy (G,) and row_lse (G, K), in float32 (float64 for
    float64 y): row_lse[g, i] = log sum_{j != i} exp(-t ||y_i - y_j||^2) and
    energy[g] = log( 1/(K(K-1)) sum_{i != j} exp(-t ||y_i - y_j||^2) ).
    """
    num_codewords = y.shape[-2]
    points = y.to(accumulation_dtype(y.dtype))
    diff = points.unsqueeze(-2) - points.unsqueeze(-3)  # (G, K, K, d): y_i - y_j
    scores = -t * diff.square().sum(dim=-1)
    diagonal = torch.eye(num_codewords, dtype=torch.bool, device=y.device)
    scores = scores.masked_fill(diagonal, float("-inf"))
    row_lse = torch.logsumexp(scores, dim=-1)
    energy = torch.logsumexp(row_lse, dim=-1) - math.log(num_codewords * (num_codewords - 1))
    return energy, row_lse


def packing_energy_ref(codebook: torch.Tensor, t: float = 1.0, normalize: bool = True) -> torch.Tensor:
    """Packing energy of ``codebook``: (K, d) -> scalar, (G, K, d) -> (G,) (one per sub-codebook).

    Float32 result (float64 for float64 input). Arguments are assumed valid (see
    :func:`kepler.losses.packing_energy` for the checked public API).
    """
    grouped = codebook if codebook.dim() == 3 else codebook.unsqueeze(0)
    energy, _ = packing_energy_raw_ref(normalize_codebook(grouped, normalize), t)
    return energy if codebook.dim() == 3 else energy[0]
