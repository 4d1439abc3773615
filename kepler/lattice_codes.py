"""Exact closest lattice points and the finite codes built on them (Voronoi codes, the Leech shell).

Closest points (Conway & Sloane, *Sphere Packings, Lattices and Groups*, ch. 20), each exact and
vectorized over the rows of ``x: (N, n)``, in the coordinates of :data:`kepler.lattice.LATTICES`'
generators (the lattices' natural scale, not unit minimal distance):

* ``Z^n``: round every coordinate.
* ``D_n`` (``D3`` = FCC, ``D4``; integer vectors with an even sum): round; if the sum is odd, round
  the coordinate that rounding moved furthest the other way.
* ``E8 = D8 u (D8 + (1/2)^8)``: the closer of the two cosets' closest points.
* ``A2`` (rows ``(1, 0)`` and ``(1/2, sqrt(3)/2)``): the union of the rectangular lattice
  ``Z x sqrt(3) Z`` and its translate by ``(1/2, sqrt(3)/2)``; rounding is exact in a rectangular
  lattice, so the closer of the two cosets' roundings is the closest point.

Ties (a point equidistant from two lattice points) go to either; the distance is the minimum.
Computed in float32 (float64 for float64 inputs; bfloat16/float16 are upcast by
:func:`closest_point`); exact in float32 for coordinates of magnitude below ``2**21`` (the
coordinate sums that decide ``D_n``'s parity stay integers float32 holds).

:class:`VoronoiCode` (Conway & Sloane, "A fast encoding method for lattice codes and quantizers",
1983) is a finite code of ``q**n`` lattice points: those of ``Lambda`` inside ``a + q V``, with ``V``
the Voronoi cell of the origin and ``a`` a small offset that keeps every lattice point off that
region's boundary. A lattice point's index is its coordinates in the generator basis modulo ``q``,
read as ``n`` base-``q`` digits (coordinate ``i`` is digit ``i``, least significant first); decoding
an index takes the point those digits make and reduces it modulo ``q Lambda`` into the region:
``y - q * closest((y - a) / q)``. Encoding a vector is its closest point's index, so a vector
outside the region maps to the codeword of its closest point's coset (it wraps around).

:func:`leech_shell` is the spherical code of the Leech lattice's 196560 minimal vectors, at unit
norm: all have the same norm, so the nearest one is the one of largest inner product, which
:func:`kepler.nearest_codeword` finds without a ``(N, 196560)`` matrix.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np
import torch

from kepler.lattice import get_lattice, leech_minimal_vectors

__all__ = ["CLOSEST_POINT_LATTICES", "VoronoiCode", "closest_point", "closest_point_function", "leech_shell"]

_ROOT3 = math.sqrt(3.0)


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def closest_point_cubic(x: torch.Tensor) -> torch.Tensor:
    """Closest point of ``Z^n``: ``(N, n) -> (N, n)``."""
    return torch.round(x)


def closest_point_checkerboard(x: torch.Tensor) -> torch.Tensor:
    """Closest point of ``D_n`` (integer vectors with an even sum): ``(N, n) -> (N, n)``."""
    rounded = torch.round(x)
    residual = x - rounded
    worst = residual.abs().argmax(dim=-1, keepdim=True)
    # Rounding the worst coordinate the other way changes the sum by one and costs the least.
    step = torch.where(residual.gather(-1, worst) >= 0, 1.0, -1.0).to(x.dtype)
    odd = torch.remainder(rounded.sum(dim=-1, keepdim=True), 2.0) != 0
    return rounded.scatter_add(-1, worst, step * odd)


def _closer(x: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Row-wise, whichever of ``first`` and ``second`` is nearer ``x`` (``first`` on a tie)."""
    first_sq = (x - first).square().sum(dim=-1, keepdim=True)
    second_sq = (x - second).square().sum(dim=-1, keepdim=True)
    return torch.where(second_sq < first_sq, second, first)


def closest_point_e8(x: torch.Tensor) -> torch.Tensor:
    """Closest point of ``E8 = D8 u (D8 + (1/2)^8)``: ``(N, 8) -> (N, 8)``."""
    integral = closest_point_checkerboard(x)
    half_integral = closest_point_checkerboard(x - 0.5) + 0.5
    return _closer(x, integral, half_integral)


def closest_point_a2(x: torch.Tensor) -> torch.Tensor:
    """Closest point of ``A2`` (basis ``(1, 0)``, ``(1/2, sqrt(3)/2)``): ``(N, 2) -> (N, 2)``."""
    spacing = x.new_tensor([1.0, _ROOT3])
    shift = x.new_tensor([0.5, _ROOT3 / 2])
    rectangular = torch.round(x / spacing) * spacing
    shifted = torch.round((x - shift) / spacing) * spacing + shift
    return _closer(x, rectangular, shifted)


_CLOSEST_POINTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "A2": closest_point_a2,
    "D3": closest_point_checkerboard,
    "D4": closest_point_checkerboard,
    "E8": closest_point_e8,
}
CLOSEST_POINT_LATTICES = ("Z<n>", *_CLOSEST_POINTS)
"""Lattices with an exact closest-point algorithm here (names as :func:`kepler.lattice.get_lattice`)."""


def closest_point_function(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The closest-point function of the lattice ``name`` (any name :func:`~kepler.lattice.get_lattice`
    takes, of a lattice in :data:`CLOSEST_POINT_LATTICES`); it takes and returns ``(N, n)`` float32
    or float64. ValueError naming the lattices that have one otherwise."""
    lattice = get_lattice(name)
    if lattice.name in _CLOSEST_POINTS:
        return _CLOSEST_POINTS[lattice.name]
    if lattice.name == f"Z{lattice.dim}":
        return closest_point_cubic
    raise ValueError(
        f"lattice {name!r} has no closest-point algorithm here; lattices with one: {', '.join(CLOSEST_POINT_LATTICES)}"
    )


def closest_point(name: str, x: torch.Tensor) -> torch.Tensor:
    """The closest point of lattice ``name`` to every row of ``x: (..., n)``, in the generator's scale.

    Any floating dtype (computed in float32, float64 for float64); returns ``x``'s shape and dtype.
    Not differentiable (the closest point is piecewise constant).
    """
    function = closest_point_function(name)
    n = get_lattice(name).dim
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() == 0 or x.shape[-1] != n:
        raise ValueError(f"x must be (..., {n}) for lattice {name!r}, got shape {tuple(x.shape)}")
    rows = x.detach().reshape(-1, n).to(_working_dtype(x.dtype))
    return function(rows).reshape(x.shape).to(x.dtype)


class VoronoiCode:
    """The ``q**n`` points of a lattice inside ``a + q V`` (see the module docstring), indexed exactly.

    Args:
        name: a lattice of :data:`CLOSEST_POINT_LATTICES`.
        q: codes per basis direction, >= 2; the code has ``size = q**n`` points.

    Attributes:
        dim: ``n``; size: ``q**n``; generator: ``(n, n)`` float64, rows a basis;
        offset: ``a``, ``(n,)`` float64, ``a_i = 8**-(i+1)``. A lattice point ``y`` lies on the
        boundary of ``a + q V`` only if ``a . v`` is a multiple of 1/2 for a Voronoi-relevant vector
        ``v`` (``y . v`` and ``q (lambda . v + |v|^2 / 2)`` are multiples of 1/2 in these lattices).
        Those vectors have coordinates of magnitude at most 2 (``A2``'s are irrational), so ``a . v``
        is nonzero and below 1/2 in magnitude: no lattice point lies on the boundary.
    """

    def __init__(self, name: str, q: int):
        if isinstance(q, bool) or not isinstance(q, int) or q < 2:
            raise ValueError(f"q must be an int >= 2, got {q!r}")
        self.closest = closest_point_function(name)
        lattice = get_lattice(name)
        self.name = lattice.name
        self.dim = lattice.dim
        self.q = q
        if q**self.dim > 2**62:
            raise ValueError(f"q**n = {q}**{self.dim} codes do not fit int64 indices")
        self.size = q**self.dim
        self.generator = lattice.generator.clone()
        self.inverse = torch.linalg.inv(self.generator)
        self.offset = torch.tensor([8.0 ** -(i + 1) for i in range(self.dim)], dtype=torch.float64)
        # Digit i of an index is basis coordinate i modulo q.
        self.place_values = torch.tensor([q**i for i in range(self.dim)], dtype=torch.int64)

    def __repr__(self) -> str:
        return f"VoronoiCode({self.name!r}, q={self.q})"

    def index(self, points: torch.Tensor) -> torch.Tensor:
        """Lattice points ``(N, n)`` (any float dtype) -> the indices of their cosets mod ``q Lambda``,
        ``(N,)`` int64 in ``[0, q**n)``."""
        coordinates = torch.round(points.to(torch.float64) @ self.inverse.to(points.device))
        digits = torch.remainder(coordinates, self.q).to(torch.int64)
        return digits @ self.place_values.to(points.device)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Vectors ``(N, n)`` (float32 or float64) -> ``(N,)`` int64: the index of each closest point."""
        return self.index(self.closest(x))

    def decode(self, indices: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Indices ``(N,)`` int64 in ``[0, q**n)`` -> the codewords ``(N, n)`` of ``dtype``, computed in
        float64: the digits' lattice point reduced modulo ``q Lambda`` into ``a + q V``."""
        device = indices.device
        digits = torch.div(indices.unsqueeze(-1), self.place_values.to(device), rounding_mode="floor") % self.q
        point = digits.to(torch.float64) @ self.generator.to(device)
        reduced = point - self.q * self.closest((point - self.offset.to(device)) / self.q)
        return reduced.to(dtype)

    def codewords(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Every codeword in index order, ``(q**n, n)``."""
        return self.decode(torch.arange(self.size), dtype)


@functools.lru_cache(maxsize=1)
def _leech_shell_numpy() -> np.ndarray:
    vectors = leech_minimal_vectors().astype(np.float64)
    return vectors / np.sqrt(32.0)  # every minimal vector has norm 32 in these integer coordinates


def leech_shell(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The Leech lattice's 196560 minimal vectors at unit norm, ``(196560, 24)`` of ``dtype``; row ``i``
    is code ``i`` (the deterministic order of :func:`kepler.lattice.leech_minimal_vectors`)."""
    return torch.from_numpy(_leech_shell_numpy()).to(dtype)
