"""Closest lattice point: op registration and the checked functional.

Math and numerics: :mod:`kepler.reference.closest_lattice_point` (the spec). The closest point is
piecewise constant, so the op has no backward and no ``<Op>Function``: the functional runs the
registered op on ``x.detach()`` and its result does not require grad (the quantizers pass gradients
straight through, or through the rotation trick, themselves).

Backends (see ``kepler._backend``):

* ``reference``: ``closest_lattice_point_ref`` (the only one taking float64).
* ``cpu`` / ``cuda``: ``torch.ops.kepler.closest_lattice_point`` from ``kepler._C``.
* ``triton``: ``torch.ops.kepler.closest_lattice_point_triton`` (``kepler.kernels.closest_lattice_point``).

The registered op takes ``x: (N, n)`` and the lattice family (``"Z"``, ``"D"``, ``"A2"``, ``"E8"``);
the functional takes a lattice name and any leading dimensions. The op has a fake implementation,
so ``torch.compile(fullgraph=True)`` traces through it.
"""

from __future__ import annotations

import torch

from kepler import _backend
from kepler.lattice import get_lattice
from kepler.ops._common import check_input, register_op, registered_op
from kepler.reference.closest_lattice_point import closest_lattice_point_ref


def _closest_lattice_point_fake(x: torch.Tensor, lattice: str) -> torch.Tensor:
    """Shape and dtype of the op's output: (N, n) float32."""
    return x.new_empty(x.shape, dtype=torch.float32)


register_op(
    "closest_lattice_point",
    "(Tensor x, str lattice) -> Tensor",
    _closest_lattice_point_fake,
)

# The family (kepler._numerics.LATTICE_FAMILIES) of every named lattice of kepler.lattice that has a
# closest-point algorithm here; the cubic lattices Z<n> are family "Z".
_NAMED_LATTICE_FAMILY = {"A2": "A2", "D3": "D", "D4": "D", "E8": "E8"}

CLOSEST_POINT_LATTICES = ("Z<n>", *_NAMED_LATTICE_FAMILY)
"""Lattices with an exact closest-point algorithm here (names as :func:`kepler.lattice.get_lattice`)."""


def lattice_family(name: str) -> tuple[str, int]:
    """The kernels' family (``"Z"``, ``"D"``, ``"A2"``, ``"E8"``) and dimension ``n`` of lattice ``name``
    (any name :func:`kepler.lattice.get_lattice` takes). ValueError for a lattice without a
    closest-point algorithm here (the Leech lattice: use its shell, :func:`kepler.lattice_codes.leech_shell`)."""
    lattice = get_lattice(name)
    if lattice.name in _NAMED_LATTICE_FAMILY:
        return _NAMED_LATTICE_FAMILY[lattice.name], lattice.dim
    if lattice.name == f"Z{lattice.dim}":
        return "Z", lattice.dim
    raise ValueError(
        f"lattice {name!r} has no closest-point algorithm here; lattices with one: {', '.join(CLOSEST_POINT_LATTICES)}"
    )


def closest_lattice_point(x: torch.Tensor, lattice: str, *, backend: str | None = None) -> torch.Tensor:
    """The closest point of ``lattice`` to every row of ``x``, in the lattice generator's scale.

    Args:
        x: (..., n), float32, bfloat16 or float16 (float64 runs on the reference backend only), any
            strides; ``n`` is the lattice's dimension.
        lattice: a lattice of :data:`CLOSEST_POINT_LATTICES` by any name
            :func:`kepler.lattice.get_lattice` takes (``"E8"``, ``"D4"``, ``"fcc"``, ``"A2"``, ``"Z3"``, ...).
        backend: ``'reference'``, ``'cpu'``, ``'cuda'``, ``'triton'`` or ``'auto'``; default
            ``KEPLER_BACKEND`` or ``'auto'`` (see ``kepler.available_backends``).

    Returns:
        (..., n) float32 (float64 for float64 ``x``): the lattice points (exact while every
        ``|coordinate|`` is below ``2**21``; at a tie, either closest point), NaN rows where a row of
        ``x`` is not finite. Does not require grad. Numerics: :mod:`kepler.reference.closest_lattice_point`.
    """
    check_input("x", x)
    family, n = lattice_family(lattice)
    if x.dim() == 0 or x.shape[-1] != n:
        raise ValueError(f"x must be (..., {n}) for lattice {lattice!r}, got shape {tuple(x.shape)}")
    rows = x.detach().reshape(-1, n)
    chosen = _backend.choose_backend("closest_lattice_point", backend, x.device, x.dtype)
    if chosen == "reference":
        points = closest_lattice_point_ref(rows, family)
    else:
        points = registered_op("closest_lattice_point", chosen)(rows, family)
    return points.reshape(x.shape)
