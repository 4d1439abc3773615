"""Reference lattices: :class:`Lattice` and :func:`get_lattice`, the classic dense packings (cubic
``Z^n``, hexagonal ``A2``, face-centred cubic ``D3`` -- Kepler's packing --, ``D4``, ``E8``, Leech
``Lambda24``, built from the Golay code) with their generator matrices, literature facts and the
points nearest the origin, for use as codebook initialisations and as known answers in tests and
metrics. (The released code's grid prior, which only its KL loss uses, is :mod:`kepler.losses`.)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Callable

import numpy as np
import torch

__all__ = [
    "LATTICES",
    "Lattice",
    "cubic_lattice",
    "get_lattice",
    "golay_code_basis",
    "golay_codewords",
    "leech_minimal_vectors",
]


@dataclasses.dataclass(frozen=True, eq=False)
class Lattice:
    """A lattice given by a generator matrix, with facts from Conway & Sloane (SPLAG, table 1.2).

    Attributes:
        name: canonical name (``"Z3"``, ``"A2"``, ``"D3"``, ``"D4"``, ``"E8"``, ``"Leech"``, ...).
        dim: dimension ``n``.
        generator: (n, n) float64 tensor; its rows are a basis, lattice points are ``c @ generator``
            for integer row vectors ``c``.
        minimal_norm: squared length of the shortest nonzero vector, in the generator's scale.
        kissing_number: number of vectors of minimal norm (literature value).
        center_density: ``r**n / sqrt(det Gram)`` with packing radius ``r = sqrt(minimal_norm)/2``
            (literature value; :attr:`packing_density` is computed from the generator instead).
        gram_scale: a positive integer ``s`` with ``s * Gram`` integral, so norms and the order of
            :meth:`points` are decided in exact integer arithmetic.
        first_shell: for lattices too large for the generic enumeration (Leech), a function
            returning the ``kissing_number`` minimal vectors as a float64 array in the generator's
            scale; :meth:`points` then serves the origin and this shell only.
    """

    name: str
    dim: int
    generator: torch.Tensor
    minimal_norm: float
    kissing_number: int
    center_density: float
    gram_scale: int = 1
    first_shell: Callable[[], np.ndarray] | None = dataclasses.field(default=None, repr=False)

    @property
    def gram(self) -> torch.Tensor:
        """(n, n) float64 Gram matrix ``generator @ generator.T``."""
        return self.generator @ self.generator.T

    @functools.cached_property
    def _integral_gram(self) -> np.ndarray:
        scaled = self.gram.numpy() * self.gram_scale
        integral = np.rint(scaled)
        if not np.allclose(scaled, integral, rtol=0, atol=1e-9):
            raise ValueError(f"{self.name}: gram_scale {self.gram_scale} does not make the Gram matrix integral")
        return integral.astype(np.int64)

    @property
    def covolume(self) -> float:
        """Volume of a fundamental cell, ``sqrt(det Gram)``."""
        return math.sqrt(abs(float(np.linalg.det(self.gram.numpy()))))

    @property
    def packing_radius(self) -> float:
        """Radius of the balls of the packing: half the minimal distance, ``sqrt(minimal_norm) / 2``."""
        return math.sqrt(self.minimal_norm) / 2

    @property
    def packing_density(self) -> float:
        """Fraction of space covered by the balls: ``V_n(r) / sqrt(det Gram)``, ``r`` the packing radius.

        ``V_n(r) = pi**(n/2) r**n / Gamma(n/2 + 1)`` is the volume of the n-ball of radius ``r``.
        """
        n = self.dim
        ball_volume = math.pi ** (n / 2) * self.packing_radius**n / math.gamma(n / 2 + 1)
        return ball_volume / self.covolume

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """Coordinates of points ``x: (m, n)`` in the generator basis, ``x @ generator^-1`` (float64).

        Integral (up to rounding) exactly when the points are lattice points in the generator's scale.
        """
        x = torch.as_tensor(x, dtype=torch.float64)
        return torch.linalg.solve(self.generator.T, x.T).T

    def points(self, n: int) -> torch.Tensor:
        """The ``n`` lattice points nearest the origin, scaled to unit minimal distance.

        Ordered by norm, ties broken lexicographically on the coordinates (ascending), so the
        origin comes first and the result is deterministic; a shell cut by ``n`` keeps its
        lexicographically smallest points. Points are enumerated Fincke-Pohst style (coefficient
        vectors inside a growing ball, one coordinate at a time, vectorized), with norms compared
        exactly through the integral Gram matrix.

        Args:
            n: number of points, >= 0. For lattices enumerated through :attr:`first_shell` (Leech),
                at most ``1 + kissing_number``.

        Returns:
            (n, dim) float64 tensor: lattice points divided by ``sqrt(minimal_norm)``.
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
            raise TypeError(f"n must be an int, got {type(n).__name__}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if self.first_shell is not None:
            if n > 1 + self.kissing_number:
                raise ValueError(
                    f"{self.name} points are enumerated up to the first shell: n must be <= "
                    f"{1 + self.kissing_number}, got {n}"
                )
            shell = self.first_shell()
            coords = np.concatenate([np.zeros((1, self.dim)), shell[_lexicographic_order(shell)]])[:n]
        else:
            coords = self._nearest_points(n)
        return torch.from_numpy(np.ascontiguousarray(coords / math.sqrt(self.minimal_norm)))

    def _nearest_points(self, n: int) -> np.ndarray:
        """Generic enumeration: (n, dim) coordinates of the n nearest points, in the generator's scale."""
        if n == 0:
            return np.zeros((0, self.dim))
        # First guess: the ball holding about n points by volume (at least the first shell); it
        # grows until it holds n points. Whole shells are enumerated, so ties at the cut are
        # decided by the lexicographic order, not by where the ball happened to end.
        scaled_norm = self.minimal_norm * self.gram_scale
        radius = (n * self.covolume * math.gamma(self.dim / 2 + 1) / math.pi ** (self.dim / 2)) ** (1 / self.dim)
        bound = max(radius * radius * self.gram_scale, scaled_norm)
        while True:
            coefficients, norms = _integer_points_in_ball(self._integral_gram, int(bound))
            if coefficients.shape[0] >= n:
                break
            bound = bound * 1.5 + scaled_norm
        coords = coefficients.astype(np.float64) @ self.generator.numpy()
        order = _lexicographic_order(coords, primary=norms)
        return coords[order[:n]]


def _integer_points_in_ball(integral_gram: np.ndarray, bound: int) -> tuple[np.ndarray, np.ndarray]:
    """Every integer row vector ``c`` with ``c @ integral_gram @ c <= bound``: (m, n) int64, and
    their exact norms ``c @ integral_gram @ c``: (m,) int64.

    Fincke-Pohst: with ``integral_gram = R^T R`` (R upper triangular), ``c G c^T = sum_i R_ii^2 (c_i +
    sum_{j>i} R_ij/R_ii c_j)^2``; coordinates are fixed from the last to the first, each over the
    integer interval that keeps the partial sum inside the ball, all partial vectors of a level at
    once. The float bounds are widened slightly and the result filtered exactly in integers.
    """
    n = integral_gram.shape[0]
    upper = np.linalg.cholesky(integral_gram.astype(np.float64)).T
    diag_sq = np.diag(upper) ** 2
    mu = upper / np.diag(upper)[:, None]
    slack = 1e-9 * max(bound, 1)
    coefficients = np.zeros((1, n), dtype=np.int64)
    partial = np.zeros(1)
    for i in range(n - 1, -1, -1):
        centre = coefficients[:, i + 1 :] @ mu[i, i + 1 :] if i + 1 < n else np.zeros(len(partial))
        half_width = np.sqrt(np.maximum(bound - partial + slack, 0.0) / diag_sq[i])
        low = np.ceil(-centre - half_width).astype(np.int64)
        high = np.floor(-centre + half_width).astype(np.int64)
        counts = np.maximum(high - low + 1, 0)
        parent = np.repeat(np.arange(len(partial)), counts)
        offset = np.arange(len(parent)) - np.repeat(np.cumsum(counts) - counts, counts)
        coefficients = coefficients[parent]
        coefficients[:, i] = low[parent] + offset
        partial = partial[parent] + diag_sq[i] * (coefficients[:, i] + centre[parent]) ** 2
    norms = ((coefficients @ integral_gram) * coefficients).sum(axis=1)
    inside = norms <= bound
    return coefficients[inside], norms[inside]


def _tolerant_ranks(values: np.ndarray, tolerance: float = 1e-9) -> np.ndarray:
    """Integer ranks of ``values`` where values closer than ``tolerance`` (rounding noise) tie."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    new_group = np.concatenate([[0], (np.diff(sorted_values) > tolerance).astype(np.int64)])
    ranks = np.empty(len(values), dtype=np.int64)
    ranks[order] = np.cumsum(new_group)
    return ranks


def _lexicographic_order(coords: np.ndarray, primary: np.ndarray | None = None) -> np.ndarray:
    """Indices sorting ``coords: (m, n)`` by ``primary`` (if given), then lexicographically."""
    keys = [_tolerant_ranks(coords[:, j]) for j in range(coords.shape[1] - 1, -1, -1)]
    if primary is not None:
        keys.append(primary)
    return np.lexsort(keys)


def cubic_lattice(n: int) -> Lattice:
    """The cubic lattice ``Z^n``: identity generator, minimal norm 1, kissing number ``2n``."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"the cubic lattice needs a dimension n >= 1, got {n!r}")
    return Lattice(
        name=f"Z{n}",
        dim=int(n),
        generator=torch.eye(int(n), dtype=torch.float64),
        minimal_norm=1.0,
        kissing_number=2 * int(n),
        center_density=2.0**-n,
    )


def _d_lattice_generator(n: int) -> torch.Tensor:
    """Basis of the checkerboard lattice ``D_n`` (integer vectors with even sum), SPLAG ch. 4."""
    generator = torch.zeros(n, n, dtype=torch.float64)
    generator[0, :2] = torch.tensor([-1.0, -1.0])
    for i in range(1, n):
        generator[i, i - 1], generator[i, i] = 1.0, -1.0
    return generator


def _e8_generator() -> torch.Tensor:
    """Basis of ``E8 = D8 u (D8 + (1/2)^8)`` (SPLAG ch. 4): minimal norm 2, det 1."""
    generator = torch.zeros(8, 8, dtype=torch.float64)
    generator[0, 0] = 2.0
    for i in range(1, 7):
        generator[i, i - 1], generator[i, i] = -1.0, 1.0
    generator[7] = 0.5
    return generator


# Generator polynomial 1 + x^2 + x^4 + x^5 + x^6 + x^10 + x^11 of the cyclic binary Golay code of
# length 23; appending a parity bit gives the extended Golay code (length 24, dimension 12, minimum
# weight 8, weights 0, 8, 12, 16, 24 with counts 1, 759, 2576, 759, 1).
_GOLAY_POLYNOMIAL_EXPONENTS = (0, 2, 4, 5, 6, 10, 11)


def golay_code_basis() -> np.ndarray:
    """(12, 24) int64 basis of the extended binary Golay code (cyclic construction plus parity)."""
    basis = np.zeros((12, 24), dtype=np.int64)
    for shift in range(12):
        for exponent in _GOLAY_POLYNOMIAL_EXPONENTS:
            basis[shift, shift + exponent] = 1
    basis[:, 23] = basis[:, :23].sum(axis=1) % 2
    return basis


def golay_codewords() -> np.ndarray:
    """(4096, 24) int64: every codeword of the extended binary Golay code, in binary-counting order."""
    messages = (np.arange(4096)[:, None] >> np.arange(12)) & 1
    return messages @ golay_code_basis() % 2


def _integer_row_basis(generators: np.ndarray) -> np.ndarray:
    """A basis (Hermite normal form rows) of the integer lattice spanned by the rows of ``generators``."""
    rows = [[int(v) for v in row] for row in generators]
    num_cols = len(rows[0])
    pivots = []  # (row, column)
    top = 0
    for col in range(num_cols):
        # Euclid on column `col` among the unreduced rows until one nonzero entry is left.
        while True:
            nonzero = [i for i in range(top, len(rows)) if rows[i][col] != 0]
            if not nonzero:
                break
            smallest = min(nonzero, key=lambda i: abs(rows[i][col]))
            rows[top], rows[smallest] = rows[smallest], rows[top]
            pivot = rows[top][col]
            for i in range(top + 1, len(rows)):
                quotient = rows[i][col] // pivot
                if quotient:
                    rows[i] = [a - quotient * b for a, b in zip(rows[i], rows[top])]
            if all(rows[i][col] == 0 for i in range(top + 1, len(rows))):
                break
        if top < len(rows) and rows[top][col] != 0:
            if rows[top][col] < 0:
                rows[top] = [-a for a in rows[top]]
            pivots.append((top, col))
            top += 1
    # Reduce the entries above each pivot so they stay small.
    for row, col in pivots:
        for above in range(row):
            quotient = rows[above][col] // rows[row][col]
            if quotient:
                rows[above] = [a - quotient * b for a, b in zip(rows[above], rows[row])]
    return np.array(rows[:top], dtype=np.int64)


# The Leech lattice in integer coordinates (SPLAG ch. 4, scaled by sqrt(8)): x in Z^24 with all
# x_i of one parity m, sum(x) = 4m (mod 8), and for each residue a the set {i : x_i = a (mod 4)}
# a Golay-code set. It is spanned by 2c (c in a Golay basis), 4e_1 + 4e_i, 8e_1 and (-3, 1^23).
def _leech_integer_basis() -> np.ndarray:
    identity = np.eye(24, dtype=np.int64)
    spanning = np.concatenate(
        [
            2 * golay_code_basis(),
            4 * (identity[0] + identity[1:]),
            8 * identity[:1],
            np.array([[-3] + [1] * 23], dtype=np.int64),
        ]
    )
    return _integer_row_basis(spanning)


def leech_minimal_vectors() -> np.ndarray:
    """The 196560 minimal vectors of the Leech lattice in integer coordinates (norm 32 = 8 * 4).

    Built from the Golay code instead of a generic search (too slow in 24 dimensions):

    * shape ``(+-2^8, 0^16)`` on the 759 octads with an even number of minus signs: 759 * 2^7;
    * shape ``(-+3, +-1^23)``: ``(1 - 2c) * (1 - 4 e_p)`` for the 4096 codewords ``c`` and the 24
      positions ``p`` of the 3: 24 * 2^12;
    * shape ``(+-4^2, 0^22)``: any two positions, any signs: 276 * 4.

    Returns:
        (196560, 24) int64 array, in no particular order.
    """
    codewords = golay_codewords()
    octads = codewords[codewords.sum(axis=1) == 8]
    even_signs = np.array([s for s in np.ndindex(*(2,) * 8) if sum(s) % 2 == 0], dtype=np.int64)
    support = np.nonzero(octads)[1].reshape(len(octads), 8)
    shape2 = np.zeros((len(octads), len(even_signs), 24), dtype=np.int64)
    rows = np.arange(len(octads))[:, None, None]
    signs = np.arange(len(even_signs))[None, :, None]
    shape2[rows, signs, support[:, None, :]] = 2 * (1 - 2 * even_signs)[None, :, :]

    base = 1 - 4 * np.eye(24, dtype=np.int64)  # row p: (1, ..., -3 at p, ..., 1)
    shape3 = (1 - 2 * codewords)[None, :, :] * base[:, None, :]

    pairs = np.array([(i, j) for i in range(24) for j in range(i + 1, 24)])
    sign_pairs = np.array([(1, 1), (1, -1), (-1, 1), (-1, -1)])
    shape4 = np.zeros((len(pairs), 4, 24), dtype=np.int64)
    shape4[np.arange(len(pairs))[:, None], :, pairs[:, 0:1]] = 4 * sign_pairs[None, :, 0]
    shape4[np.arange(len(pairs))[:, None], :, pairs[:, 1:2]] = 4 * sign_pairs[None, :, 1]
    return np.concatenate([shape2.reshape(-1, 24), shape3.reshape(-1, 24), shape4.reshape(-1, 24)])


def _leech_lattice() -> Lattice:
    return Lattice(
        name="Leech",
        dim=24,
        generator=torch.from_numpy(_leech_integer_basis().astype(np.float64) / math.sqrt(8)),
        minimal_norm=4.0,
        kissing_number=196560,
        center_density=1.0,
        first_shell=lambda: leech_minimal_vectors() / math.sqrt(8),
    )


LATTICES: dict[str, Lattice] = {
    "Z2": cubic_lattice(2),
    "Z3": cubic_lattice(3),
    "A2": Lattice(
        name="A2",
        dim=2,
        generator=torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2]], dtype=torch.float64),
        minimal_norm=1.0,
        kissing_number=6,
        center_density=1 / (2 * math.sqrt(3)),
        gram_scale=2,
    ),
    "D3": Lattice(
        name="D3",
        dim=3,
        generator=_d_lattice_generator(3),
        minimal_norm=2.0,
        kissing_number=12,
        center_density=1 / (4 * math.sqrt(2)),
    ),
    "D4": Lattice(
        name="D4", dim=4, generator=_d_lattice_generator(4), minimal_norm=2.0, kissing_number=24, center_density=1 / 8
    ),
    "E8": Lattice(
        name="E8", dim=8, generator=_e8_generator(), minimal_norm=2.0, kissing_number=240, center_density=1 / 16
    ),
    "Leech": _leech_lattice(),
}
"""The named lattices by canonical name; :func:`get_lattice` also takes aliases and any ``Z<n>``."""

_ALIASES = {"fcc": "D3", "hexagonal": "A2", "lambda24": "Leech", "leech": "Leech"}
_CUBIC_NAME = re.compile(r"z\^?(\d+)")


def get_lattice(name: str) -> Lattice:
    """A lattice by name, case-insensitive.

    Accepts ``"A2"`` (or ``"hexagonal"``), ``"D3"`` (or ``"fcc"``, Kepler's face-centred cubic
    packing), ``"D4"``, ``"E8"``, ``"Leech"`` (or ``"Lambda24"``) and the cubic lattices ``"Z<n>"``
    / ``"Z^<n>"`` for any ``n >= 1``.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    key = name.strip().lower()
    canonical = {lattice_name.lower(): lattice_name for lattice_name in LATTICES}
    if key in canonical:
        return LATTICES[canonical[key]]
    if key in _ALIASES:
        return LATTICES[_ALIASES[key]]
    cubic = _CUBIC_NAME.fullmatch(key)
    if cubic and int(cubic.group(1)) >= 1:
        return cubic_lattice(int(cubic.group(1)))
    known = sorted(set(LATTICES) | set(_ALIASES) | {"Z<n>"})
    raise ValueError(f"unknown lattice name {name!r}; known: {', '.join(known)}")
