"""Finite codes built on exact closest lattice points: Voronoi codes and the Leech shell.

The closest point itself is the op :func:`kepler.ops.closest_lattice_point.closest_lattice_point`
(``Z^n``, ``A2``, ``D3`` = FCC, ``D4``, ``E8``; its spec is
:mod:`kepler.reference.closest_lattice_point`), in the coordinates of
:data:`kepler.lattice.LATTICES`' generators (the lattices' natural scale).

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

import numpy as np
import torch

from kepler.lattice import get_lattice, leech_minimal_vectors
from kepler.ops.closest_lattice_point import closest_lattice_point, lattice_family

__all__ = ["VoronoiCode", "leech_shell"]


class VoronoiCode:
    """The ``q**n`` points of a lattice inside ``a + q V`` (see the module docstring), indexed exactly.

    Args:
        name: a lattice of :data:`kepler.ops.closest_lattice_point.CLOSEST_POINT_LATTICES`.
        q: codes per basis direction, >= 2; the code has ``size = q**n`` points.
        backend: the backend of :meth:`encode`'s closest-point search (see
            :func:`~kepler.ops.closest_lattice_point.closest_lattice_point`).

    Attributes:
        dim: ``n``; size: ``q**n``; generator: ``(n, n)`` float64, rows a basis;
        offset: ``a``, ``(n,)`` float64, ``a_i = 8**-(i+1)``. A lattice point ``y`` lies on the
        boundary of ``a + q V`` only if ``a . v`` is a multiple of 1/2 for a Voronoi-relevant vector
        ``v`` (``y . v`` and ``q (lambda . v + |v|^2 / 2)`` are multiples of 1/2 in these lattices).
        Those vectors have coordinates of magnitude at most 2 (``A2``'s are irrational), so ``a . v``
        is nonzero and below 1/2 in magnitude: no lattice point lies on the boundary.
    """

    def __init__(self, name: str, q: int, backend: str | None = None):
        if isinstance(q, bool) or not isinstance(q, int) or q < 2:
            raise ValueError(f"q must be an int >= 2, got {q!r}")
        lattice_family(name)  # ValueError for a lattice without a closest-point algorithm
        self.backend = backend
        lattice = get_lattice(name)
        self.name = lattice.name
        self.dim = lattice.dim
        self.q = q
        if q**self.dim > 2**62:
            raise ValueError(f"q**n = {q}**{self.dim} codes do not fit int64 indices")
        self.size = q**self.dim
        self.generator = lattice.generator.clone()  # a CPU tensor's clone: on the CPU
        self.inverse = torch.linalg.inv(self.generator)
        # Constants on the CPU (also when a model is built under torch.device("meta")), moved per call.
        self.offset = torch.tensor([8.0 ** -(i + 1) for i in range(self.dim)], dtype=torch.float64, device="cpu")
        # Digit i of an index is basis coordinate i modulo q.
        self.place_values = torch.tensor([q**i for i in range(self.dim)], dtype=torch.int64, device="cpu")

    def __repr__(self) -> str:
        return f"VoronoiCode({self.name!r}, q={self.q})"

    def index(self, points: torch.Tensor) -> torch.Tensor:
        """Lattice points ``(N, n)`` (any float dtype) -> the indices of their cosets mod ``q Lambda``,
        ``(N,)`` int64 in ``[0, q**n)``."""
        coordinates = torch.round(points.to(torch.float64) @ self.inverse.to(points.device))
        digits = torch.remainder(coordinates, self.q).to(torch.int64)
        return digits @ self.place_values.to(points.device)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Vectors ``(N, n)`` (float32, bfloat16, float16, or float64 on the reference backend) ->
        ``(N,)`` int64: the index of each closest point."""
        return self.index(closest_lattice_point(x, self.name, backend=self.backend))

    def decode(self, indices: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Indices ``(N,)`` int64 in ``[0, q**n)`` -> the codewords ``(N, n)`` of ``dtype``, computed in
        float64: the digits' lattice point reduced modulo ``q Lambda`` into ``a + q V``."""
        device = indices.device
        digits = torch.div(indices.unsqueeze(-1), self.place_values.to(device), rounding_mode="floor") % self.q
        point = digits.to(torch.float64) @ self.generator.to(device)
        # float64, so on the reference backend: point - a needs the offset's 3n bits below the point's.
        region_point = closest_lattice_point((point - self.offset.to(device)) / self.q, self.name, backend="reference")
        reduced = point - self.q * region_point
        return reduced.to(dtype)

    def codewords(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Every codeword in index order, ``(q**n, n)``, on the CPU."""
        return self.decode(torch.arange(self.size, device="cpu"), dtype)


@functools.lru_cache(maxsize=1)
def _leech_shell_numpy() -> np.ndarray:
    vectors = leech_minimal_vectors().astype(np.float64)
    return vectors / np.sqrt(32.0)  # every minimal vector has norm 32 in these integer coordinates


def leech_shell(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The Leech lattice's 196560 minimal vectors at unit norm, ``(196560, 24)`` of ``dtype``; row ``i``
    is code ``i`` (the deterministic order of :func:`kepler.lattice.leech_minimal_vectors`)."""
    return torch.from_numpy(_leech_shell_numpy()).to(dtype)
