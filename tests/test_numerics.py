"""kepler/_numerics.py: the accumulation dtype, the exact power-of-two scale, the lattice families."""

import math

import pytest
import torch

from kepler._numerics import (
    FAMILY_ROW_LENGTH, LATTICE_FAMILIES, accumulation_dtype, check_lattice_family, power_of_two_below,
)
from kepler.lattice import get_lattice
from kepler.ops.closest_lattice_point import CLOSEST_POINT_LATTICES, lattice_family


def test_accumulation_dtype():
    assert accumulation_dtype(torch.float64) == torch.float64
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert accumulation_dtype(dtype) == torch.float32


def test_power_of_two_below():
    largest = torch.tensor([0.0, 3.0, 7.99, 8.0, 9.0, 1e30, math.inf, math.nan])
    expected = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.5, 2.0 ** (3 - 100), 1.0, 1.0])  # 1e30 ~ 0.79 * 2**100
    scale = power_of_two_below(largest, 3)
    assert torch.equal(scale, expected)
    scaled = largest[3:6] * scale[3:6]
    assert bool(((scaled >= 4.0) & (scaled < 8.0)).all())


def test_check_lattice_family():
    for family in LATTICE_FAMILIES:
        check_lattice_family("op", family, (5, FAMILY_ROW_LENGTH.get(family, 3)))
    with pytest.raises(ValueError, match="op: lattice must be one of Z, D, A2, E8, got 'D4'"):
        check_lattice_family("op", "D4", (5, 4))
    with pytest.raises(ValueError, match=r"op: E8 takes rows of 8, got x of shape \(5, 7\)"):
        check_lattice_family("op", "E8", (5, 7))
    with pytest.raises(ValueError, match=r"op: A2 takes rows of 2, got x of shape \(5, 3\)"):
        check_lattice_family("op", "A2", (5, 3))


@pytest.mark.parametrize("name", [name.replace("<n>", "5") for name in CLOSEST_POINT_LATTICES])
def test_every_closest_point_lattice_maps_to_a_family_of_its_dimension(name):
    family, dim = lattice_family(name)
    assert dim == get_lattice(name).dim
    check_lattice_family("lattice_family", family, (1, dim))
