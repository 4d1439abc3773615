"""Tests of kepler.metrics against brute-force float64 computations."""

import math

import pytest
import torch

from conftest import backend_params
from kepler.lattice import get_lattice
from kepler.metrics import PackingReport, bits_per_position, effective_bits, nearest_neighbor_distances, packing_report


def _nn_oracle(codebook: torch.Tensor) -> torch.Tensor:
    """Brute force in float64 with exact differences (no ||a||^2 - 2ab + ||b||^2 cancellation)."""
    codes = codebook.to(torch.float64)
    distances = torch.cdist(codes, codes, compute_mode="donot_use_mm_for_euclid_dist")
    distances.fill_diagonal_(math.inf)
    return distances.amin(dim=1)


def _data_oracle(data: torch.Tensor, codebook: torch.Tensor) -> tuple[float, float]:
    """(covering radius, mean squared quantization error) in float64."""
    distances = torch.cdist(data.double(), codebook.double(), compute_mode="donot_use_mm_for_euclid_dist")
    nearest = distances.amin(dim=1)
    return nearest.max().item(), nearest.square().mean().item()


def _codebooks(num_codes: int, dim: int, dtype=torch.float64):
    """Gaussian, clustered with duplicates, and integer-grid codebooks (ties on cell boundaries)."""
    gaussian = torch.randn(num_codes, dim, dtype=dtype)
    clustered = torch.randn(num_codes, dim, dtype=dtype) * 1e-3 + torch.randint(0, 3, (num_codes, 1)).to(dtype)
    clustered[-1] = clustered[0]
    grid = torch.randint(-3, 4, (num_codes, dim)).to(dtype)
    return {"gaussian": gaussian, "clustered": clustered, "grid": grid}


SHAPES = [(2, 1), (2, 3), (7, 1), (13, 2), (101, 3), (97, 5), (64, 17), (300, 2)]


class TestNearestNeighborDistances:
    @pytest.mark.parametrize("num_codes, dim", SHAPES)
    def test_matches_bruteforce_float64(self, num_codes, dim):
        for name, codebook in _codebooks(num_codes, dim).items():
            result = nearest_neighbor_distances(codebook)
            assert result.dtype == torch.float64 and result.shape == (num_codes,)
            torch.testing.assert_close(result, _nn_oracle(codebook), rtol=0, atol=1e-12, msg=name)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("num_codes, dim", [(101, 3), (97, 5)])
    def test_low_precision_inputs(self, num_codes, dim, dtype):
        codebook = torch.randn(num_codes, dim).to(dtype)
        # Same (rounded) codewords in float64; the search runs in float32.
        torch.testing.assert_close(
            nearest_neighbor_distances(codebook), _nn_oracle(codebook), rtol=1e-5, atol=1e-6
        )

    def test_grouped_is_per_group(self):
        codebook = torch.randn(3, 50, 2, dtype=torch.float64)
        result = nearest_neighbor_distances(codebook)
        assert result.shape == (3, 50)
        for group in range(3):
            torch.testing.assert_close(result[group], _nn_oracle(codebook[group]), rtol=0, atol=1e-12)

    def test_non_contiguous_codebook(self):
        storage = torch.randn(3, 200, dtype=torch.float64)
        codebook = storage.T[::2]  # (100, 3), strided
        assert not codebook.is_contiguous()
        torch.testing.assert_close(nearest_neighbor_distances(codebook), _nn_oracle(codebook), rtol=0, atol=1e-12)

    @pytest.mark.parametrize("shape", [(50, 50), (20, 20, 20)])
    def test_full_integer_grid_has_unit_spacing(self, shape):
        # Every codeword sits on a cell boundary of some grid pass: ties everywhere.
        codebook = torch.cartesian_prod(*[torch.arange(n, dtype=torch.float64) for n in shape])
        assert torch.equal(nearest_neighbor_distances(codebook), torch.ones(codebook.shape[0], dtype=torch.float64))

    def test_large_codebook_without_a_k_by_k_matrix(self):
        num_codes = 65536
        codebook = torch.rand(num_codes, 3)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            result = nearest_neighbor_distances(codebook)
        largest_allocation = max(event.cpu_memory_usage for event in prof.events())
        # A (K, K) float32 matrix would be 16 GiB; the search stays far below even a (K, K / 64) one.
        assert 0 < largest_allocation < num_codes * num_codes * 4 // 64
        rows = torch.randperm(num_codes)[:300]
        distances = torch.cdist(codebook[rows].double(), codebook.double(), compute_mode="donot_use_mm_for_euclid_dist")
        distances[torch.arange(300), rows] = math.inf
        torch.testing.assert_close(result[rows], distances.amin(dim=1), rtol=1e-5, atol=1e-7)

    @pytest.mark.parametrize(
        "codebook, error, match",
        [
            (torch.randn(1, 3), ValueError, "codebook needs K >= 2 codewords for nearest-neighbour distances, got K=1"),
            (torch.randn(2, 0, 3), ValueError, "got K=0"),
            (torch.randn(5), ValueError, r"codebook must be \(K, d\) or \(G, K, d\), got shape \(5,\)"),
            (torch.randn(2, 2, 2, 2), ValueError, r"got shape \(2, 2, 2, 2\)"),
            (torch.randn(4, 0), ValueError, "codebook must have d >= 1 features, got d=0"),
            (torch.ones(4, 2, dtype=torch.int64), TypeError, "must be a floating point tensor, got torch.int64"),
            (torch.tensor([[0.0], [math.nan]]), ValueError, r"codebook must be finite \(it holds NaN or inf\)"),
            ([[0.0], [1.0]], TypeError, "codebook must be a torch.Tensor, got list"),
        ],
    )
    def test_errors(self, codebook, error, match):
        with pytest.raises(error, match=match):
            nearest_neighbor_distances(codebook)


class TestPackingReport:
    def test_values_match_bruteforce(self):
        codebook = torch.randn(61, 3, dtype=torch.float64)
        data = torch.randn(89, 3, dtype=torch.float64) * 2
        report = packing_report(codebook, data)
        nn = _nn_oracle(codebook)
        covering, quantization = _data_oracle(data, codebook)
        assert report.num_codes == 61 and report.dim == 3
        assert report.min_nn_distance.item() == pytest.approx(nn.min().item(), abs=1e-12)
        assert report.mean_nn_distance.item() == pytest.approx(nn.mean().item(), abs=1e-12)
        assert report.packing_radius.item() == pytest.approx(nn.min().item() / 2, abs=1e-12)
        assert report.nn_distance_cv.item() == pytest.approx((nn.std(correction=0) / nn.mean()).item(), abs=1e-12)
        assert report.covering_radius.item() == pytest.approx(covering, abs=1e-12)
        assert report.mean_quantization_error.item() == pytest.approx(quantization, abs=1e-12)

    @pytest.mark.parametrize("name, count", [("A2", 7), ("D3", 13), ("D4", 25), ("E8", 241), ("Z3", 7)])
    def test_lattice_first_shell_is_perfectly_regular(self, name, count):
        # The origin and its first shell: every point is at distance exactly 1 from a neighbour
        # (the origin from all of them; a minimal vector from the origin and its closest peers).
        codebook = get_lattice(name).points(count)
        report = packing_report(codebook)
        assert report.min_nn_distance.item() == pytest.approx(1.0, abs=1e-12)
        assert report.mean_nn_distance.item() == pytest.approx(1.0, abs=1e-12)
        assert report.packing_radius.item() == pytest.approx(0.5, abs=1e-12)
        assert report.nn_distance_cv.item() == pytest.approx(0.0, abs=1e-12)

    def test_shell_data_is_covered_at_known_radius(self):
        # Data at the midpoints between the origin and each minimal vector of D3: distance 1/2.
        codebook = get_lattice("fcc").points(13)
        data = codebook[1:] / 2
        report = packing_report(codebook, data)
        assert report.covering_radius.item() == pytest.approx(0.5, abs=1e-12)
        assert report.mean_quantization_error.item() == pytest.approx(0.25, abs=1e-12)

    def test_grouped(self):
        codebook = torch.randn(4, 37, 2, dtype=torch.float64)
        data = torch.randn(4, 53, 2, dtype=torch.float64)
        report = packing_report(codebook, data)
        assert report.min_nn_distance.shape == (4,)
        for group in range(4):
            single = packing_report(codebook[group], data[group])
            for field in ("min_nn_distance", "mean_nn_distance", "nn_distance_cv", "covering_radius",
                          "mean_quantization_error"):
                assert getattr(report, field)[group].item() == pytest.approx(getattr(single, field).item(), abs=1e-12)
            covering, quantization = _data_oracle(data[group], codebook[group])
            assert report.covering_radius[group].item() == pytest.approx(covering, abs=1e-12)
            assert report.mean_quantization_error[group].item() == pytest.approx(quantization, abs=1e-12)

    @pytest.mark.parametrize("backend", backend_params("cpu"))
    def test_data_search_on_each_backend(self, backend):
        codebook = torch.randn(40, 5)
        data = torch.randn(67, 5)
        report = packing_report(codebook, data, backend=backend)
        covering, quantization = _data_oracle(data, codebook)
        assert report.covering_radius.item() == pytest.approx(covering, rel=1e-5)
        assert report.mean_quantization_error.item() == pytest.approx(quantization, rel=1e-5)

    def test_to_dict(self):
        plain = packing_report(torch.randn(10, 2)).to_dict()
        assert plain["covering_radius"] is None and plain["mean_quantization_error"] is None
        assert isinstance(plain["min_nn_distance"], float) and plain["num_codes"] == 10
        grouped = packing_report(torch.randn(2, 10, 2), torch.randn(2, 5, 2)).to_dict()
        assert isinstance(grouped["covering_radius"], list) and len(grouped["covering_radius"]) == 2
        assert set(grouped) == {field for field in PackingReport.__dataclass_fields__}

    def test_duplicated_codebook_has_nan_cv(self):
        report = packing_report(torch.zeros(3, 2))
        assert report.min_nn_distance.item() == 0 and math.isnan(report.nn_distance_cv.item())

    @pytest.mark.parametrize(
        "codebook, data, error, match",
        [
            (torch.randn(5, 3), torch.randn(2, 4, 3), ValueError, r"data must be \(N, d\) for a \(K, d\) codebook"),
            (torch.randn(5, 3), torch.randn(4, 2), ValueError, "data has d=2 features but codebook has d=3"),
            (torch.randn(2, 5, 3), torch.randn(3, 4, 3), ValueError, "data has G=3 groups but codebook has G=2"),
            (torch.randn(5, 3), torch.randn(0, 3), ValueError, "data must hold at least one row, got N=0"),
            (torch.randn(5, 3), torch.randn(4, 3, dtype=torch.float64), TypeError,
             "data and codebook must have the same dtype, got torch.float64 and torch.float32"),
            (torch.randn(5, 3), [[0.0, 0.0, 0.0]], TypeError, "data must be a torch.Tensor, got list"),
            (torch.randn(1, 3), torch.randn(4, 3), ValueError, "codebook needs K >= 2"),
        ],
    )
    def test_errors(self, codebook, data, error, match):
        with pytest.raises(error, match=match):
            packing_report(codebook, data)


def test_bits_per_position():
    assert bits_per_position(4096, 1) == 12.0
    assert bits_per_position(8, 4) == 12.0
    assert bits_per_position(16, 3) == 12.0
    assert bits_per_position(1024, 4) == 40.0
    with pytest.raises(ValueError, match="tokens_per_position >= 1, got 8 and 0"):
        bits_per_position(8, 0)


def test_effective_bits_sums_per_partition_entropy():
    # partition 0: two codes equally often (1 bit); partition 1: one code (0 bits);
    # partition 2: 1/2, 1/4, 1/4 (1.5 bits)
    counts = [[3, 3, 0, 0], [5, 0, 0, 0], [2, 1, 1, 0]]
    assert effective_bits(counts) == pytest.approx(2.5)
    assert effective_bits([[0, 0]]) == 0.0
