"""kepler.metrics.generative: the Fréchet distance, precision and recall and the Inception Score as
plain functions of features, each against a hand computation or an independent float64 one."""

import logging

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

from kepler.metrics import feature_statistics, frechet_distance, inception_score, precision_recall
from kepler.metrics.generative import split_inception_scores

# ------------------------------------------------------------------ Fréchet distance


def _psd_root(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def _frechet_by_eigenvalues(mu1, sigma1, mu2, sigma2) -> float:
    """The oracle: tr sqrtm(sigma1 sigma2) as the trace of the root of the symmetric
    sigma1^1/2 sigma2 sigma1^1/2 (same eigenvalues), by eigh rather than scipy's sqrtm."""
    root1 = _psd_root(sigma1)
    cross = _psd_root(root1 @ sigma2 @ root1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(cross))


def _random_features(seed: int, n: int, dim: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(dim, dim)) * 0.5 + np.eye(dim)
    return rng.normal(size=(n, dim)) @ mixing + shift


def test_statistics_are_the_mean_and_unbiased_covariance():
    features = _random_features(0, 30, 4)
    mu, sigma = feature_statistics(torch.from_numpy(features).float())
    assert mu.dtype == sigma.dtype == np.float64 and mu.shape == (4,) and sigma.shape == (4, 4)
    np.testing.assert_allclose(mu, features.astype(np.float32).mean(0), rtol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(features.astype(np.float32), rowvar=False, ddof=1), rtol=1e-6)
    mu, sigma = feature_statistics(features[:, :1])
    assert mu.shape == (1,) and sigma.shape == (1, 1) and sigma[0, 0] == pytest.approx(features[:, 0].var(ddof=1))


def test_frechet_distance_of_a_set_with_itself_is_zero():
    stats = feature_statistics(_random_features(1, 200, 6))
    assert frechet_distance(*stats, *stats) == pytest.approx(0, abs=1e-9)


def test_shifted_means_with_equal_covariances_give_the_squared_shift():
    mu, sigma = feature_statistics(_random_features(2, 100, 5))
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    assert frechet_distance(mu, sigma, mu + shift, sigma) == pytest.approx(float(shift @ shift), rel=1e-9)


def test_diagonal_gaussians_give_the_closed_form():
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    mu1, mu2 = np.zeros(3), np.array([1.0, 1.0, 1.0])
    # |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2 = 3 + (1 + 1 + 6.25)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(11.25, rel=1e-12)
    as_tensors = torch.from_numpy(mu1), torch.from_numpy(np.diag(a))
    assert frechet_distance(*as_tensors, mu2, np.diag(b)) == pytest.approx(11.25, rel=1e-12)


@pytest.mark.parametrize("n, dim", [(400, 3), (300, 7), (20, 40)])  # the last: singular covariances (n < dim)
def test_frechet_distance_matches_the_eigenvalue_oracle(n, dim):
    real, fake = _random_features(3, n, dim), _random_features(4, n + 7, dim, shift=0.3)
    stats_real, stats_fake = feature_statistics(real), feature_statistics(fake)
    expected = _frechet_by_eigenvalues(*stats_real, *stats_fake)
    assert frechet_distance(*stats_real, *stats_fake) == pytest.approx(expected, rel=1e-7)


def test_a_singular_product_is_offset_as_adm_does(caplog):
    # Positive semi-definite, but scipy's sqrtm of their product is NaN. The product's eigenvalues are
    # 25, 0, 0, so the distance is 5 + 17 - 2 * 5 = 12; the offset moves it by about 2e-3.
    sigma1 = np.array([[4.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    sigma2 = np.array([[8.0, -2.0, 8.0], [-2.0, 1.0, -2.0], [8.0, -2.0, 8.0]])
    mu = np.zeros(3)
    with caplog.at_level(logging.WARNING, logger="kepler"):
        distance = frechet_distance(mu, sigma1, mu, sigma2)
    assert distance == pytest.approx(_frechet_by_eigenvalues(mu, sigma1, mu, sigma2), abs=1e-2)
    assert caplog.messages == ["frechet_distance: sqrtm(sigma1 sigma2) is not finite (a singular product); adding "
                               "1e-06 to both covariances' diagonals"]


def test_covariances_that_are_not_positive_semi_definite_are_refused():
    with pytest.raises(ValueError) as error:
        frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))
    assert str(error.value) == ("sqrtm(sigma1 sigma2) has an imaginary part of 1 on its diagonal: the covariances "
                                "are not positive semi-definite")


@pytest.mark.parametrize("args, message", [
    ((np.zeros(3), np.eye(3), np.zeros(4), np.eye(4)), "mu1 and mu2 must have the same length, got 3 and 4"),
    ((np.zeros(3), np.eye(3), np.zeros(3), np.eye(2)),
     "sigma2 must be (3, 3) as the means are 3 long, got shape (2, 2)"),
    ((np.zeros((3, 1)), np.eye(3), np.zeros(3), np.eye(3)), "mu1 must be a vector (D,), got shape (3, 1)"),
    ((np.zeros(3), np.zeros(3), np.zeros(3), np.eye(3)), "sigma1 must be a matrix (D, D), got shape (3,)"),
    ((np.array([0.0, np.nan]), np.eye(2), np.zeros(2), np.eye(2)), "mu1 holds NaN or infinite values"),
    ((np.zeros(2), np.eye(2), np.zeros(2), np.full((2, 2), np.inf)), "sigma2 holds NaN or infinite values"),
])
def test_frechet_distance_bad_input(args, message):
    with pytest.raises(ValueError) as error:
        frechet_distance(*args)
    assert str(error.value) == message


def test_statistics_bad_input():
    with pytest.raises(ValueError) as error:
        feature_statistics(np.zeros((1, 4)))
    assert str(error.value) == "a covariance needs at least 2 feature vectors, got 1"
    with pytest.raises(ValueError) as error:
        feature_statistics(np.zeros(4))
    assert str(error.value) == "features must be a matrix (N, D), got shape (4,)"


# ------------------------------------------------------------------ precision and recall


def _precision_recall_oracle(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Whole distance matrices, sorted rows, in float64 numpy."""
    def distances(a, b):
        return ((a[:, None] - b[None]) ** 2).sum(-1)

    real_radii = np.sort(distances(real, real), axis=1)[:, k]
    fake_radii = np.sort(distances(fake, fake), axis=1)[:, k]
    cross = distances(fake, real)
    return float((cross <= real_radii[None]).any(1).mean()), float((cross <= fake_radii[:, None]).any(0).mean())


def test_precision_and_recall_by_hand():
    real = np.array([[0.0], [1.0], [3.0]])  # radii (k=1): 1, 1, 2
    fake = np.array([[1.5], [2.0], [10.0], [10.5]])  # radii (k=1): 0.5 each
    # Precision: 1.5 and 2 lie within real balls (2 on the edge of 1's), 10 and 10.5 in none: 2/4.
    # Recall: only 1 lies within a generated ball (on the edge of 1.5's): 1/3.
    assert precision_recall(real, fake, k=1) == (0.5, pytest.approx(1 / 3))
    # With k=2 the generated radii grow to 8.5 (1.5 and 2) and 8 (10, 10.5): every real one is covered;
    # the real ones to 3, 2 and 3, which still miss 10 and 10.5.
    assert precision_recall(real, fake, k=2) == (0.5, 1.0)


def test_identical_sets_give_one_and_far_apart_sets_zero():
    features = _random_features(5, 60, 8)
    assert precision_recall(features, features) == (1.0, 1.0)
    assert precision_recall(features, features + 100.0) == (0.0, 0.0)


@pytest.mark.parametrize("batch_size", [1, 7, 1024])
def test_precision_and_recall_match_the_oracle_in_any_batches(batch_size):
    real, fake = _random_features(6, 53, 4), _random_features(7, 41, 4, shift=0.7)
    expected = _precision_recall_oracle(real, fake, 3)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    assert precision_recall(real, fake, batch_size=batch_size) == expected
    assert precision_recall(torch.from_numpy(real), torch.from_numpy(fake), batch_size=batch_size) == expected


@pytest.mark.parametrize("real, fake, options, message", [
    (np.zeros((5, 3)), np.zeros((5, 2)), {},
     "real_features and fake_features must have the same number of features, got 3 and 2"),
    (np.zeros(5), np.zeros((5, 2)), {}, "real_features must be a matrix (N, D), got shape (5,)"),
    (np.zeros((5, 2)), np.full((5, 2), np.nan), {}, "fake_features holds NaN or infinite values"),
    (np.zeros((3, 2)), np.zeros((5, 2)), {},
     "precision and recall with k=3 need more than 3 feature vectors in each set, real_features has 3"),
    (np.zeros((5, 2)), np.zeros((5, 2)), {"k": 5},
     "precision and recall with k=5 need more than 5 feature vectors in each set, real_features has 5"),
    (np.zeros((5, 2)), np.zeros((5, 2)), {"k": 0}, "k must be an int >= 1, got 0"),
    (np.zeros((5, 2)), np.zeros((5, 2)), {"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
])
def test_precision_recall_bad_input(real, fake, options, message):
    with pytest.raises(ValueError) as error:
        precision_recall(real, fake, **options)
    assert str(error.value) == message


# ------------------------------------------------------------------ Inception Score


def test_uniform_predictions_score_one():
    assert inception_score(np.zeros((20, 1008))) == pytest.approx(1.0, abs=1e-12)


def test_confident_distinct_classes_score_their_number():
    logits = 100.0 * np.eye(5).repeat(4, axis=0)  # 20 samples, 4 of each of 5 classes, each certain
    assert inception_score(logits, splits=1) == pytest.approx(5.0, rel=1e-12)
    # Interleaved, every one of 4 splits of 5 holds all 5 classes once.
    assert inception_score(np.tile(100.0 * np.eye(5), (4, 1)), splits=4) == pytest.approx(5.0, rel=1e-12)
    # Contiguous splits: of 5 samples each of 4 classes, the first split of 10 holds classes 0 and 1,
    # the second 2 and 3.
    assert inception_score(100.0 * np.eye(4).repeat(5, axis=0), splits=2) == pytest.approx(2.0, rel=1e-12)


def test_inception_score_matches_scipy_per_split():
    logits = np.random.default_rng(8).normal(size=(23, 11)) * 3
    expected = [np.exp(np.mean([scipy.stats.entropy(p, part.mean(0)) for p in part]))
                for part in np.array_split(scipy.special.softmax(logits, axis=1), 3)]
    np.testing.assert_allclose(split_inception_scores(logits, splits=3), expected, rtol=1e-12)
    assert inception_score(torch.from_numpy(logits).float(), splits=3) == pytest.approx(np.mean(expected), rel=1e-5)


@pytest.mark.parametrize("logits, splits, message", [
    (np.zeros((9, 4)), 10, "the Inception Score in 10 splits needs at least 10 samples, got 9"),
    (np.zeros(12), 10, "logits must be a matrix (N, C), got shape (12,)"),
    (np.full((12, 4), np.nan), 10, "logits holds NaN or infinite values"),
    (np.zeros((12, 4)), 0, "splits must be an int >= 1, got 0"),
])
def test_inception_score_bad_input(logits, splits, message):
    with pytest.raises(ValueError) as error:
        inception_score(logits, splits=splits)
    assert str(error.value) == message
