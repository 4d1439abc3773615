"""Tests of kepler.lattice: the reference lattices."""

import itertools
import math

import numpy as np
import pytest
import torch

from kepler.lattice import LATTICES, Lattice, get_lattice, golay_codewords


# ------------------------------------------------------------------------------------------------
# Lattices
# ------------------------------------------------------------------------------------------------

GENERIC_LATTICES = ["Z1", "Z2", "Z3", "Z5", "A2", "D3", "D4", "E8"]

# Conway & Sloane, SPLAG table 1.2.
KNOWN_PACKING_DENSITIES = {
    "Z3": math.pi / 6,
    "A2": math.pi / math.sqrt(12),
    "D3": math.pi / math.sqrt(18),
    "D4": math.pi**2 / 16,
    "E8": math.pi**4 / 384,
    "Leech": math.pi**12 / math.factorial(12),
}


def _unit_ball_volume(n: int) -> float:
    return math.pi ** (n / 2) / math.gamma(n / 2 + 1)


def _assert_lattice_vectors(lattice: Lattice, points: torch.Tensor) -> None:
    """Points (in unit-minimal-distance scale) have integer coordinates in the generator basis."""
    coefficients = lattice.coefficients(points * math.sqrt(lattice.minimal_norm))
    assert (coefficients - coefficients.round()).abs().max() < 1e-9


def _sorted_oracle(coords: np.ndarray, n: int) -> np.ndarray:
    """Independent order: by squared norm, then lexicographic, on values rounded to 1e-9."""
    keyed = sorted(coords.tolist(), key=lambda x: (round(sum(v * v for v in x), 9), tuple(round(v, 9) for v in x)))
    return np.array(keyed[:n])


def _box(radius: int, dim: int) -> np.ndarray:
    return np.array(list(itertools.product(range(-radius, radius + 1), repeat=dim)), dtype=np.float64)


class TestLatticePoints:
    @pytest.mark.parametrize("name", GENERIC_LATTICES)
    def test_kissing_number_counted_from_points(self, name):
        lattice = get_lattice(name)
        # Two points past the first shell: a missed or duplicated minimal vector changes the count.
        points = lattice.points(lattice.kissing_number + 3)
        norms = points.square().sum(dim=1)
        assert norms[0] == 0
        assert int(torch.isclose(norms, torch.ones_like(norms), rtol=0, atol=1e-12).sum()) == lattice.kissing_number
        assert norms[-1] > 1 + 1e-6
        _assert_lattice_vectors(lattice, points)

    @pytest.mark.parametrize("name", GENERIC_LATTICES)
    def test_unit_minimal_distance(self, name):
        points = get_lattice(name).points(400)
        distances = torch.cdist(points, points)
        distances.fill_diagonal_(math.inf)
        assert abs(distances.min().item() - 1.0) < 1e-12

    @pytest.mark.parametrize("name", GENERIC_LATTICES)
    def test_order_by_norm_then_lexicographic(self, name):
        points = get_lattice(name).points(300)
        keys = [(round(sum(v * v for v in row), 9), tuple(round(v, 9) for v in row)) for row in points.tolist()]
        assert keys == sorted(keys)
        assert len(set(keys)) == len(keys)

    @pytest.mark.parametrize("name", GENERIC_LATTICES)
    def test_deterministic_and_prefix_consistent(self, name):
        lattice = get_lattice(name)
        longer = lattice.points(157)
        assert longer.dtype == torch.float64 and longer.shape == (157, lattice.dim)
        assert torch.equal(lattice.points(157), longer)
        assert torch.equal(lattice.points(61), longer[:61])  # 61 cuts a shell for most of these
        assert lattice.points(0).shape == (0, lattice.dim)

    def test_e8_matches_coordinate_definition(self):
        # E8 = D8 u (D8 + (1/2)^8): integer or half-integer coordinates with an even sum.
        integer = _box(2, 8)
        half = np.array(list(itertools.product([-1.5, -0.5, 0.5, 1.5], repeat=8)))
        candidates = np.concatenate([integer, half])
        members = candidates[np.isclose(candidates.sum(axis=1) % 2, 0) & ((candidates**2).sum(axis=1) <= 4)]
        # Norm <= 4 needs |x_i| <= 2, inside the box: shells 0, 2, 4 complete (1 + 240 + 2160).
        assert len(members) == 2401
        expected = _sorted_oracle(members / math.sqrt(2), 2401)
        np.testing.assert_allclose(get_lattice("E8").points(2401).numpy(), expected, rtol=0, atol=1e-12)

    def test_d4_and_d3_match_checkerboard_definition(self):
        for dim, count in ((4, 1 + 24 + 24 + 96), (3, 1 + 12 + 6 + 24)):
            box = _box(2, dim)
            members = box[(box.sum(axis=1) % 2 == 0) & ((box**2).sum(axis=1) <= 6)]
            assert len(members) == count  # norms 0, 2, 4, 6: complete inside |x_i| <= 2
            expected = _sorted_oracle(members / math.sqrt(2), count)
            np.testing.assert_allclose(get_lattice(f"D{dim}").points(count).numpy(), expected, rtol=0, atol=1e-12)

    def test_a2_matches_hexagonal_coefficient_box(self):
        coefficients = _box(8, 2)
        coords = coefficients @ np.array([[1.0, 0.0], [0.5, math.sqrt(3) / 2]])
        inside = (coords**2).sum(axis=1) <= 16  # |coefficient| <= 8 covers the disc of radius 4
        expected = _sorted_oracle(coords[inside], int(inside.sum()))
        np.testing.assert_allclose(get_lattice("A2").points(int(inside.sum())).numpy(), expected, rtol=0, atol=1e-12)

    def test_large_enumeration_e8(self):
        points = get_lattice("E8").points(65536)
        norms = (points.square().sum(dim=1) * 2).round()  # back to E8's integral norms
        shell_sizes = torch.unique(norms, return_counts=True)[1].tolist()
        # Theta series of E8: 1, 240, 2160, 6720, 17520, 30240, ... (65536 cuts the 6th shell).
        assert shell_sizes == [1, 240, 2160, 6720, 17520, 30240, 65536 - 56881]

    @pytest.mark.parametrize(
        "n, error, match", [(-1, ValueError, "n must be >= 0, got -1"), (2.0, TypeError, "n must be an int, got float")]
    )
    def test_points_errors(self, n, error, match):
        with pytest.raises(error, match=match):
            get_lattice("D4").points(n)


class TestLeech:
    def test_golay_code_weight_distribution(self):
        weights = golay_codewords().sum(axis=1)
        values, counts = np.unique(weights, return_counts=True)
        assert values.tolist() == [0, 8, 12, 16, 24] and counts.tolist() == [1, 759, 2576, 759, 1]

    def test_generator_is_unimodular_with_integral_even_gram(self):
        leech = get_lattice("Lambda24")
        gram = leech.gram
        assert torch.allclose(gram, gram.round(), rtol=0, atol=1e-12)
        assert (gram.diagonal().round() % 2 == 0).all()
        assert abs(torch.linalg.det(gram).item() - 1.0) < 1e-9

    @staticmethod
    def _integer_basis() -> torch.Tensor:
        """The generator in integer coordinates (times sqrt(8)): upper triangular (Hermite form)."""
        basis = (get_lattice("Leech").generator * math.sqrt(8)).round().to(torch.int64)
        assert torch.equal(basis, basis.triu()) and (basis.diagonal() > 0).all()
        return basis

    @staticmethod
    def _is_lattice_vector(basis: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Exact membership of integer vectors x: (m, 24): back-substitution in int64 must divide."""
        residual = x.clone()
        member = torch.ones(x.shape[0], dtype=torch.bool)
        for j in range(24):
            pivot = basis[j, j]
            member &= residual[:, j] % pivot == 0
            coefficient = torch.div(residual[:, j], pivot, rounding_mode="floor")
            residual -= coefficient[:, None] * basis[j]
        return member & (residual == 0).all(dim=1)

    def test_exact_membership_check_rejects_non_lattice_vectors(self):
        basis = self._integer_basis()
        inside = torch.tensor([[-3] + [1] * 23, [8] + [0] * 23, [4, 4] + [0] * 22])
        outside = torch.tensor([[1] * 24, [2, 2] + [0] * 22, [4] + [0] * 23, [-3, -3] + [1] * 22])
        assert self._is_lattice_vector(basis, inside).all()
        assert not self._is_lattice_vector(basis, outside).any()

    def test_minimal_vectors_are_distinct_lattice_vectors_of_minimal_norm(self):
        leech = get_lattice("leech")
        points = leech.points(1 + 196560)
        assert points.shape == (196561, 24)
        assert points[0].abs().max() == 0
        shell = points[1:]
        assert torch.allclose(shell.square().sum(dim=1), torch.ones(196560, dtype=torch.float64), rtol=0, atol=1e-12)
        assert torch.unique(shell, dim=0).shape[0] == 196560
        integer = (shell * math.sqrt(32)).round().to(torch.int64)  # unit scale -> integer coordinates
        assert torch.allclose(integer.double() / math.sqrt(32), shell, rtol=0, atol=1e-12)
        assert self._is_lattice_vector(self._integer_basis(), integer).all()
        assert integer.tolist() == sorted(integer.tolist())  # lexicographic within the shell

    def test_minimal_distance_on_a_subset(self):
        points = get_lattice("Leech").points(3001)
        distances = torch.cdist(points, points)
        distances.fill_diagonal_(math.inf)
        assert abs(distances.min().item() - 1.0) < 1e-12

    def test_points_beyond_first_shell_raise(self):
        with pytest.raises(ValueError, match="Leech points are enumerated up to the first shell: n must be <= 196561"):
            get_lattice("Leech").points(196562)


class TestLatticeFacts:
    @pytest.mark.parametrize("name", sorted(KNOWN_PACKING_DENSITIES))
    def test_packing_density_from_generator(self, name):
        lattice = get_lattice(name)
        assert lattice.packing_density == pytest.approx(KNOWN_PACKING_DENSITIES[name], rel=1e-12)
        # The literature center density agrees with the generator: density = V_n(1) * delta.
        expected_from_center = _unit_ball_volume(lattice.dim) * lattice.center_density
        assert lattice.packing_density == pytest.approx(expected_from_center, rel=1e-12)

    def test_fcc_is_keplers_packing(self):
        fcc = get_lattice("fcc")
        assert fcc is get_lattice("D3")
        assert fcc.packing_density == pytest.approx(math.pi / math.sqrt(18), rel=1e-14)
        assert fcc.packing_density == pytest.approx(0.7404804897, abs=1e-10)

    @pytest.mark.parametrize("n", [1, 2, 7, 12])
    def test_cubic_any_dimension(self, n):
        lattice = get_lattice(f"Z^{n}")
        assert lattice.name == f"Z{n}" and lattice.kissing_number == 2 * n
        assert lattice.packing_density == pytest.approx(_unit_ball_volume(n) / 2**n, rel=1e-12)

    @pytest.mark.parametrize(
        "alias, canonical",
        [
            ("z3", "Z3"),
            ("a2", "A2"),
            ("HEXAGONAL", "A2"),
            ("Fcc", "D3"),
            ("d4", "D4"),
            ("e8", "E8"),
            ("LEECH", "Leech"),
            ("lambda24", "Leech"),
        ],
    )
    def test_names_are_case_insensitive(self, alias, canonical):
        assert get_lattice(alias) is LATTICES[canonical]

    @pytest.mark.parametrize(
        "name, error, match",
        [
            ("E7", ValueError, r"unknown lattice name 'E7'; known: .*Leech"),
            ("Z0", ValueError, "unknown lattice name 'Z0'"),
            (8, TypeError, "name must be a str, got int"),
        ],
    )
    def test_name_errors(self, name, error, match):
        with pytest.raises(error, match=match):
            get_lattice(name)
