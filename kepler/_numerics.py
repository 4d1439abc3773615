"""The numeric rules and contracts an op's layers share: its reference, its kernels and its functional.

A bottom module: it imports torch and nothing of kepler, so that ``kepler/reference`` (the spec) and
``kepler/kernels`` (leaves) can use it without importing the layers above them.

* :func:`accumulation_dtype`: the dtype every op sums in and returns float results in.
* :func:`power_of_two_below`: the exact scale factor that keeps large values from overflowing.
* :func:`effective_inv_temperature`: the logit factor of scores taken at such a scale.
* The closest-point lattice families (:data:`LATTICE_FAMILIES`, :data:`FAMILY_ROW_LENGTH`,
  :func:`check_lattice_family`): what ``kepler::closest_lattice_point`` takes as its ``lattice``
  argument on every backend (``csrc/closest_lattice_point/closest_lattice_point_checks.h`` is the
  C++ copy of the same rule and message).
"""

from __future__ import annotations

import torch

LATTICE_FAMILIES = ("Z", "D", "A2", "E8")
"""The lattice families of ``kepler::closest_lattice_point``: ``Z^n`` and ``D_n`` for the row
length ``n``, ``A2`` and ``E8``."""

FAMILY_ROW_LENGTH = {"A2": 2, "E8": 8}
"""The row length of each fixed-dimension family (``Z`` and ``D`` take rows of any length >= 1)."""


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are taken (and float results returned) in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def power_of_two_below(largest: torch.Tensor, exponent: int) -> torch.Tensor:
    """The exact scale factor for values whose largest ``|value|`` is ``largest``: 1 while
    ``largest < 2**exponent``, else the power of two that brings it into
    ``[2**(exponent - 1), 2**exponent)``. Same shape and dtype as ``largest``; computed without a
    branch, so torch.compile traces it (NaN and inf leave it at 1)."""
    excess = (torch.frexp(largest).exponent - exponent).clamp_min(0)
    return torch.ldexp(torch.ones_like(largest), -excess)


def effective_inv_temperature(inv_temperature: float, scale: torch.Tensor) -> torch.Tensor:
    """``alpha = inv_temperature / scale**2`` as a 0-d float64 tensor, capped at the largest finite
    value of ``scale``'s dtype: the logit factor of scores taken on inputs multiplied by ``scale`` (a
    power of two, so the division is exact until the cap), as ``code_entropy`` uses it on every
    backend. In float64 because ``scale**2`` underflows float32 for inputs past ~1e19; without a
    branch or a host sync, so torch.compile traces it and a GPU launcher does not wait."""
    wide = scale.to(torch.float64)
    return (inv_temperature / (wide * wide)).clamp_max(torch.finfo(scale.dtype).max)


def check_lattice_family(op: str, lattice: str, x_shape: tuple[int, ...]) -> None:
    """ValueError, its message starting with ``op``, unless ``lattice`` is one of
    :data:`LATTICE_FAMILIES` and takes rows of ``x_shape[-1]`` elements (``x: (N, n)``)."""
    if lattice not in LATTICE_FAMILIES:
        raise ValueError(f"{op}: lattice must be one of {', '.join(LATTICE_FAMILIES)}, got {lattice!r}")
    row_length = FAMILY_ROW_LENGTH.get(lattice, x_shape[-1])
    if x_shape[-1] != row_length:
        raise ValueError(f"{op}: {lattice} takes rows of {row_length}, got x of shape {tuple(x_shape)}")
