"""Plain-PyTorch closest lattice point: the spec, the test oracle (in float64) and the last fallback.

The closest point of a lattice to every row of ``x: (N, n)``, by the exact algorithms of Conway &
Sloane (*Sphere Packings, Lattices and Groups*, ch. 20), in the coordinates of
:data:`kepler.lattice.LATTICES`' generators (the lattices' natural scale). The kernels take the
lattice as one of four families (:data:`kepler._numerics.LATTICE_FAMILIES`), the row length being ``n``:

* ``"Z"``, the cubic lattice ``Z^n``: round every coordinate.
* ``"D"``, the checkerboard lattice ``D_n`` (integer vectors with an even sum; ``D3`` is FCC, Kepler's
  packing): round; if an odd number of coordinates are odd, move the coordinate that rounding moved
  furthest one step the other way.
* ``"E8"`` (``n = 8``), ``E8 = D8 u (D8 + (1/2)^8)``: the closer of the two cosets' closest points.
* ``"A2"`` (``n = 2``, basis ``(1, 0)``, ``(1/2, sqrt(3)/2)``): the union of the rectangular lattice
  ``Z x sqrt(3) Z`` and its translate by ``(1/2, sqrt(3)/2)``; rounding is exact in a rectangular
  lattice, so the closer of the two roundings is the closest point.

Numerics every backend follows (so that they agree to the bit, bar distance ties):

* Computed in float32 (float64 for float64 inputs); bfloat16/float16 inputs are upcast first. The
  result has that dtype.
* Rounding is to the nearest integer, ties to even (``torch.round``, ``nearbyint``, ``rint``).
* ``D_n``'s parity is the count of odd rounded coordinates (not their sum, which float32 would round
  past ``2**24``); the coordinate moved is the first of largest ``|x - round(x)|``, one step towards
  ``x`` (up when ``x - round(x) >= 0``).
* ``E8`` and ``A2``: the second candidate (the half-integral coset, the shifted rectangle) wins only
  when its squared distance is strictly smaller. Distances are float32 sums of squares in any order,
  so at an exact tie, or within rounding of one, backends may return different points: both are at
  the minimum distance.
* ``A2`` uses the float32 rounding of ``sqrt(3)`` as its spacing (the shift is exactly half of it)
  and divides by it with correct rounding.
* A row holding NaN or +-inf gives a row of NaN.

Exact (the true closest point) while every ``|coordinate|`` is below ``2**21``: ``x - round(x)`` and
``x - 1/2`` are exact there. Not differentiable: the closest point is piecewise constant.
"""

from __future__ import annotations

import math

import torch

from kepler._numerics import accumulation_dtype, check_lattice_family

_ROOT3 = math.sqrt(3.0)


def _closest_checkerboard(x: torch.Tensor) -> torch.Tensor:
    """``D_n``: ``(N, n) -> (N, n)``, finite ``x``."""
    rounded = torch.round(x)
    residual = x - rounded
    worst = residual.abs().argmax(dim=-1, keepdim=True)  # the first of the largest
    step = torch.where(residual.gather(-1, worst) >= 0, 1.0, -1.0).to(x.dtype)
    odd_count = torch.remainder(rounded, 2.0).sum(dim=-1, keepdim=True)
    odd = torch.remainder(odd_count, 2.0) != 0
    return rounded.scatter_add(-1, worst, step * odd)


def _closer(x: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Row-wise, whichever of ``first`` and ``second`` is nearer ``x`` (``first`` on a tie)."""
    first_sq = (x - first).square().sum(dim=-1, keepdim=True)
    second_sq = (x - second).square().sum(dim=-1, keepdim=True)
    return torch.where(second_sq < first_sq, second, first)


def _closest_e8(x: torch.Tensor) -> torch.Tensor:
    integral = _closest_checkerboard(x)
    half_integral = _closest_checkerboard(x - 0.5) + 0.5
    return _closer(x, integral, half_integral)


def _closest_a2(x: torch.Tensor) -> torch.Tensor:
    spacing = x.new_tensor([1.0, _ROOT3])
    shift = spacing / 2
    rectangular = torch.round(x / spacing) * spacing
    shifted = torch.round((x - shift) / spacing) * spacing + shift
    return _closer(x, rectangular, shifted)


_CLOSEST = {"Z": torch.round, "D": _closest_checkerboard, "E8": _closest_e8, "A2": _closest_a2}


def closest_lattice_point_ref(x: torch.Tensor, lattice: str) -> torch.Tensor:
    """The closest point of lattice family ``lattice`` to every row of ``x``.

    Args:
        x: (N, n), any floating dtype; n must be 2 for ``"A2"`` and 8 for ``"E8"``.
        lattice: one of :data:`kepler._numerics.LATTICE_FAMILIES`.

    Returns:
        (N, n) float32 (float64 for float64 ``x``): lattice points, NaN rows where ``x``'s row is
        not finite. Not differentiable (computed on ``x.detach()``).
    """
    check_lattice_family("closest_lattice_point_ref", lattice, x.shape)
    rows = x.detach().to(accumulation_dtype(x.dtype))
    finite = torch.isfinite(rows).all(dim=-1, keepdim=True)
    points = _CLOSEST[lattice](torch.where(finite, rows, 0.0))
    return torch.where(finite, points, math.nan)
