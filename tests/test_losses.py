"""Tests of kepler.losses' grid prior (the released KL's prior) and its row layout; the losses
themselves are tested per op (test_kepler_kl.py, test_packing_energy.py)."""

import numpy as np
import pytest
import torch

from kepler.losses import official_grid_prior, prior_row


def _released_grid(sub_dim: int, dim: int) -> np.ndarray:
    """The released construction with its alphabet of 2: np.indices order, tiled side by side."""
    low = np.indices([2] * sub_dim).reshape(sub_dim, -1).T
    return np.tile(low, (1, -(-dim // sub_dim)))[:, :dim]


class TestOfficialGridPrior:
    def test_matches_released_grid_at_the_drawn_start(self):
        prior = official_grid_prior(1024, seed=7)
        start = int(np.random.default_rng(7).integers(0, 2**16 - 1024 + 1))
        expected = _released_grid(16, 64)[start : start + 1024]
        assert prior.shape == (1024, 64) and prior.dtype == torch.float32
        np.testing.assert_array_equal(prior.numpy(), expected)

    @pytest.mark.parametrize("dim, sub_dim", [(7, 3), (5, 5), (2, 4), (12, 4)])
    def test_other_shapes_match_released_grid(self, dim, sub_dim):
        num_codes = 2**sub_dim - 3
        prior = official_grid_prior(num_codes, dim=dim, sub_dim=sub_dim, seed=3)
        start = int(np.random.default_rng(3).integers(0, 4))
        np.testing.assert_array_equal(prior.numpy(), _released_grid(sub_dim, dim)[start : start + num_codes])

    def test_full_grid_is_every_binary_point_once(self):
        prior = official_grid_prior(2**10, dim=10, sub_dim=10, seed=0)
        assert prior.unique(dim=0).shape[0] == 2**10
        assert set(prior.unique().tolist()) == {0.0, 1.0}

    def test_seed_determinism(self):
        assert torch.equal(official_grid_prior(300, seed=11), official_grid_prior(300, seed=11))
        starts = {tuple(official_grid_prior(1, dim=16, seed=s)[0].tolist()) for s in range(8)}
        assert len(starts) > 1  # the seed moves the start

    def test_generator_seed_is_used(self):
        a = official_grid_prior(5, seed=np.random.default_rng(42))
        assert torch.equal(a, official_grid_prior(5, seed=42))

    def test_largest_codebook_is_whole_grid(self):
        prior = official_grid_prior(2**16, seed=None)
        np.testing.assert_array_equal(prior.numpy(), _released_grid(16, 64))

    @pytest.mark.parametrize(
        "kwargs, error, match",
        [
            (dict(num_codes=2**16 + 1), ValueError, r"num_codes must be in \[1, 2\*\*sub_dim = 65536\]"),
            (dict(num_codes=0), ValueError, "num_codes must be in"),
            (dict(num_codes=9, sub_dim=3), ValueError, r"grid has 8 points\), got 9"),
            (dict(num_codes=4, dim=0), ValueError, "dim must be >= 1, got 0"),
            (dict(num_codes=4, sub_dim=0), ValueError, r"sub_dim must be in \[1, 62\], got 0"),
            (dict(num_codes=4, sub_dim=63), ValueError, r"sub_dim must be in \[1, 62\], got 63"),
            (dict(num_codes=4.0), TypeError, "num_codes must be an int, got float"),
            (dict(num_codes=4, dim=True), TypeError, "dim must be an int, got bool"),
        ],
    )
    def test_errors(self, kwargs, error, match):
        with pytest.raises(error, match=match):
            official_grid_prior(**kwargs)


class TestPriorRow:
    def test_crop_is_the_released_crop(self):
        prior = torch.arange(12.0).reshape(3, 4)
        row = prior_row(prior, 7)
        assert torch.equal(row, torch.arange(7.0))
        assert torch.equal(prior_row(prior, 12), torch.arange(12.0))

    def test_longer_rows_tile(self):
        prior = torch.arange(6, dtype=torch.float64).reshape(2, 3)
        row = prior_row(prior, 14)
        assert row.dtype == torch.float64
        assert torch.equal(row, torch.arange(14, dtype=torch.float64) % 6)

    def test_non_contiguous_prior_is_flattened_row_major(self):
        prior = torch.arange(12.0).reshape(4, 3).T  # (3, 4) view, not contiguous
        assert torch.equal(prior_row(prior, 5), prior.contiguous().reshape(-1)[:5])

    @pytest.mark.parametrize(
        "prior, length, error, match",
        [
            (torch.ones(2, 2), 0, ValueError, "length must be >= 1, got 0"),
            (torch.ones(0, 4), 3, ValueError, r"prior must have at least one element, got shape \(0, 4\)"),
            (np.ones(4), 3, TypeError, "prior must be a torch.Tensor, got ndarray"),
            (torch.ones(4), 3.5, TypeError, "length must be an int, got float"),
        ],
    )
    def test_errors(self, prior, length, error, match):
        with pytest.raises(error, match=match):
            prior_row(prior, length)
