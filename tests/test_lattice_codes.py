"""kepler.lattice_codes: exact closest points against brute force, Voronoi-code bijections, the Leech shell."""

import functools
import math

import pytest
import torch

from kepler.lattice import get_lattice, leech_minimal_vectors
from kepler.lattice_codes import VoronoiCode, leech_shell
from kepler.ops.closest_lattice_point import closest_lattice_point

LATTICES = ["Z2", "Z3", "Z5", "A2", "D3", "D4", "E8"]
# Inputs are drawn with norm below INPUT_RADIUS, so their closest points lie within INPUT_RADIUS plus
# the lattice's covering radius (SPLAG table 1.2, at the lattices' natural scale).
INPUT_RADIUS = 2.0
COVERING_RADIUS = {"A2": 1 / math.sqrt(3), "D3": 1.0, "D4": 1.0, "E8": 1.0}


@functools.lru_cache(maxsize=None)
def enumerated_points(name: str, radius: float) -> torch.Tensor:
    """Every point of the lattice within ``radius`` of the origin, natural scale, float64."""
    lattice = get_lattice(name)
    count = 64
    while True:
        points = lattice.points(count) * math.sqrt(lattice.minimal_norm)
        if points[-1].norm() > radius:
            return points[points.norm(dim=1) <= radius]
        count *= 2


def brute_force_points(name: str) -> torch.Tensor:
    """Every lattice point that can be closest to an input of norm at most ``INPUT_RADIUS``."""
    covering_radius = COVERING_RADIUS.get(name, math.sqrt(get_lattice(name).dim) / 2)
    return enumerated_points(name, INPUT_RADIUS + 1e-3 + covering_radius)


def brute_force_sq_dist(name: str, x: torch.Tensor) -> torch.Tensor:
    """min over enumerated lattice points of ``||x - p||^2`` for ``x: (N, n)`` float64 near the origin."""
    assert x.norm(dim=1).max() <= INPUT_RADIUS + 1e-3
    points = brute_force_points(name)
    return torch.cat([torch.cdist(block, points).square().amin(dim=1) for block in x.split(256)])


def random_inputs(dim: int, count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(count, dim, generator=generator, dtype=torch.float64)
    radii = torch.rand(count, 1, generator=generator, dtype=torch.float64) * INPUT_RADIUS
    return directions / directions.norm(dim=1, keepdim=True) * radii


def boundary_inputs(name: str) -> torch.Tensor:
    """Points where the closest point is not unique: halfway between the origin and each short
    lattice vector, the midpoints of pairs of the shortest vectors, and the holes ``(1/2)^n`` and
    ``(1, 0, ..., 0)`` (deep holes of ``Z^n``, ``D_n`` and ``E8``)."""
    points = brute_force_points(name)
    norms = points.norm(dim=1)
    short = points[(norms > 0) & (norms <= 2.0)]
    shortest = points[(norms > 0) & (norms <= norms[1] + 1e-9)]
    pairs = ((shortest[:, None, :] + shortest[None, :, :]) / 2).reshape(-1, points.shape[1])
    n = points.shape[1]
    holes = [torch.full((1, n), 0.5, dtype=torch.float64), torch.eye(n, dtype=torch.float64)[:1]]
    inputs = torch.cat([short[:: max(1, len(short) // 500)] / 2, pairs[:: max(1, len(pairs) // 500)], *holes])
    return inputs[inputs.norm(dim=1) <= INPUT_RADIUS]


def check_closest(name: str, x: torch.Tensor) -> torch.Tensor:
    """The closest points are lattice points at the brute-force minimum distance; returns them."""
    found = closest_lattice_point(x, name)
    lattice = get_lattice(name)
    coefficients = lattice.coefficients(found)
    assert torch.allclose(coefficients, coefficients.round(), atol=1e-9), "not a lattice point"
    found_sq = (x - found).square().sum(dim=1)
    torch.testing.assert_close(found_sq, brute_force_sq_dist(name, x), rtol=0, atol=1e-9)
    return found


@pytest.mark.parametrize("name", LATTICES)
def test_closest_point_matches_brute_force_on_random_inputs(name):
    check_closest(name, random_inputs(get_lattice(name).dim, 2000, seed=len(name)))


@pytest.mark.parametrize("name", LATTICES)
def test_closest_point_on_voronoi_boundaries_is_at_the_minimum_distance(name):
    x = boundary_inputs(name)
    assert len(x) > 10
    check_closest(name, x)
    # Just off each boundary the closest point is unique: both sides still meet the minimum.
    nudge = random_inputs(x.shape[1], len(x), seed=3) * 1e-6
    check_closest(name, x + nudge)
    check_closest(name, x - nudge)


@pytest.mark.parametrize("name", LATTICES)
def test_closest_point_at_large_norm_is_the_translated_answer(name):
    lattice = get_lattice(name)
    x = torch.cat([random_inputs(lattice.dim, 500, seed=5), boundary_inputs(name)])
    # A lattice point of norm ~1e4: its coefficients in the generator basis are integers.
    far = torch.full((1, lattice.dim), 9973.0, dtype=torch.float64) @ lattice.generator
    assert far.norm() > 1e4
    near = closest_lattice_point(x, name)
    translated = closest_lattice_point(x + far, name)
    torch.testing.assert_close((x + far - translated).square().sum(1), (x - near).square().sum(1), rtol=0, atol=1e-7)
    # float32 at that norm: the answer is a lattice point no further than the rounding of x allows.
    x32 = (x + far).to(torch.float32)
    found32 = closest_lattice_point(x32, name)
    assert found32.dtype == torch.float32
    best = brute_force_sq_dist(name, x32.double() - far)
    # Integral lattices are exact in float32 there; A2's irrational points are float32-rounded
    # (an ulp at 1e4 is 2**-10), which moves a squared distance below 1 by at most ~2 ulps.
    atol = 4 * 2.0**-10 if name == "A2" else 1e-6
    torch.testing.assert_close((x32.double() - found32.double()).square().sum(1), best, rtol=0, atol=atol)


@pytest.mark.parametrize("name", LATTICES)
def test_float32_matches_brute_force_and_half_inputs_are_upcast(name):
    x = random_inputs(get_lattice(name).dim, 1000, seed=7).to(torch.float32)
    found = closest_lattice_point(x, name)
    assert found.dtype == torch.float32 and found.shape == x.shape
    x64 = x.double()
    torch.testing.assert_close((x64 - found.double()).square().sum(1), brute_force_sq_dist(name, x64), rtol=0, atol=1e-5)
    for dtype in (torch.bfloat16, torch.float16):
        half = x.to(dtype)
        assert torch.equal(closest_lattice_point(half, name), closest_lattice_point(half.float(), name))


# ------------------------------------------------------------------------------------ Voronoi codes

VORONOI_CASES = [("Z2", 2), ("Z3", 3), ("Z3", 4), ("A2", 2), ("A2", 3), ("A2", 4), ("D3", 3), ("D4", 2),
                 ("D4", 3), ("D4", 4), ("E8", 2), ("E8", 3)]


@pytest.mark.parametrize("name, q", VORONOI_CASES)
def test_voronoi_code_index_is_a_bijection(name, q):
    code = VoronoiCode(name, q)
    assert code.size == q**code.dim
    codewords = code.codewords(torch.float64)
    assert codewords.shape == (code.size, code.dim)
    # Every index decodes to a distinct lattice point of the region a + qV, which encodes back to it.
    coefficients = get_lattice(name).coefficients(codewords)
    assert torch.allclose(coefficients, coefficients.round(), atol=1e-9)
    assert torch.unique(codewords, dim=0).shape[0] == code.size
    assert torch.equal(code.encode(codewords), torch.arange(code.size))
    assert torch.equal(closest_lattice_point((codewords - code.offset) / q, name), torch.zeros_like(codewords))
    # float32 codewords encode back to their indices too.
    assert torch.equal(code.encode(code.codewords(torch.float32)), torch.arange(code.size))


@pytest.mark.parametrize("name, q", [("D4", 3), ("E8", 2), ("A2", 4)])
def test_voronoi_code_wraps_points_outside_modulo_q_lambda(name, q):
    code = VoronoiCode(name, q)
    lattice = get_lattice(name)
    inside = code.codewords(torch.float64)
    shifts = torch.randint(-5, 6, (code.size, code.dim), generator=torch.Generator().manual_seed(0))
    outside = inside + q * (shifts.double() @ lattice.generator)
    assert torch.equal(code.encode(outside), torch.arange(code.size))
    torch.testing.assert_close(code.decode(code.encode(outside), torch.float64), inside, rtol=0, atol=1e-9)


def test_voronoi_code_encodes_the_closest_point():
    code = VoronoiCode("E8", 4)
    x = random_inputs(8, 2000, seed=11) * 0.5
    decoded = code.decode(code.encode(x), torch.float64)
    # Near the origin (well inside 4V) the codeword is the closest lattice point itself.
    torch.testing.assert_close((x - decoded).square().sum(1), brute_force_sq_dist("E8", x), rtol=0, atol=1e-9)


def test_voronoi_code_errors():
    with pytest.raises(ValueError, match="q must be an int >= 2, got 1"):
        VoronoiCode("E8", 1)
    with pytest.raises(ValueError, match="lattice 'Leech' has no closest-point algorithm"):
        VoronoiCode("Leech", 2)
    with pytest.raises(ValueError, match=r"q\*\*n = 1000\*\*8 codes do not fit int64 indices"):
        VoronoiCode("E8", 1000)


def test_leech_shell_is_the_unit_minimal_vectors():
    shell = leech_shell(torch.float64)
    assert shell.shape == (196560, 24)
    torch.testing.assert_close(shell.norm(dim=1), torch.ones(196560, dtype=torch.float64))
    torch.testing.assert_close(shell * math.sqrt(32), torch.from_numpy(leech_minimal_vectors()).double())
    # Inner products of distinct minimal vectors are +-1/2, +-1/4 or 0 (times the unit norm).
    sample = shell[torch.randperm(196560, generator=torch.Generator().manual_seed(0))[:500]]
    products = (sample @ sample.T) * 4
    torch.testing.assert_close(products, products.round(), rtol=0, atol=1e-12)
    assert set(products.round().unique().tolist()) <= {-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0}
