"""How close generated images are to real ones, as plain functions of their Inception features:
the Fréchet distance of two Gaussians (FID on pool features, sFID on spatial ones), improved
precision and recall (Kynkäänniemi et al. 2019), and the Inception Score.

Each is defined as guided-diffusion's ``evaluations/evaluator.py`` (the ADM evaluator that the
field's tables come from) defines it:

* :func:`frechet_distance`: ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2))`` in
  float64, scipy's matrix square root; where the product is too singular for it (a non-finite root),
  :data:`SINGULAR_EPS` is added to both diagonals (and logged); an imaginary part over
  :data:`MAX_IMAGINARY` on the root's diagonal is an error (the covariances are not positive
  semi-definite), a smaller one rounding, dropped.
* :func:`precision_recall`: each feature vector's radius is the distance to its k-th nearest
  neighbour in its own set (itself not counted); a generated sample counts towards precision if it
  lies within the radius of some real one, a real one towards recall if within the radius of some
  generated one. Distances are squared Euclidean, ``|u|^2 - 2 u.v + |v|^2`` clamped at 0 (ADM's
  form), in the features' dtype (float32 unless float64; ADM tries float16 first).
* :func:`inception_score`: ``exp(mean_i KL(p(y|x_i) || p(y)))`` of the softmax of the logits, on
  contiguous splits of the samples, averaged over the splits. ADM's splits are 5000 samples each:
  the same as 10 splits of its 50 000 samples.
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import scipy.linalg
import torch

log = logging.getLogger("kepler")

# ADM's constants: the offset added to both covariances' diagonals where sqrtm(sigma1 sigma2) is not
# finite, and the largest imaginary part of the root's diagonal taken for rounding.
SINGULAR_EPS = 1e-6
MAX_IMAGINARY = 1e-3
# Neighbourhood size of precision and recall (Kynkäänniemi et al.; ADM's nhood_sizes=(3,)).
PRECISION_RECALL_K = 3
# The Inception Score's splits (ADM's 5000-sample splits of 50 000 samples).
INCEPTION_SCORE_SPLITS = 10


def _float64(name: str, value, ndim: int, shape: str) -> np.ndarray:
    """``value`` (numpy array or tensor) as a float64 numpy array of ``ndim`` dimensions (``shape``
    names them in the message), all finite."""
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    array = array.astype(np.float64)
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {shape}, got shape {tuple(array.shape)}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    return array


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """The Gaussian that :func:`frechet_distance` compares: the mean ``(D,)`` and the covariance
    ``(D, D)`` (unbiased, as ``numpy.cov``), both float64, of ``features (N, D)`` with N >= 2."""
    features = _float64("features", features, 2, "a matrix (N, D)")
    if len(features) < 2:
        raise ValueError(f"a covariance needs at least 2 feature vectors, got {len(features)}")
    return features.mean(0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between the Gaussians ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``: ``mu (D,)``,
    ``sigma (D, D)``, numpy arrays or tensors of any float dtype (computed in float64). FID is this
    of the pool features' :func:`feature_statistics`, sFID of the spatial features'."""
    mu1, mu2 = _float64("mu1", mu1, 1, "a vector (D,)"), _float64("mu2", mu2, 1, "a vector (D,)")
    if mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 must have the same length, got {len(mu1)} and {len(mu2)}")
    dim = len(mu1)
    sigma1, sigma2 = _float64("sigma1", sigma1, 2, "a matrix (D, D)"), _float64("sigma2", sigma2, 2, "a matrix (D, D)")
    for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
        if sigma.shape != (dim, dim):
            raise ValueError(f"{name} must be ({dim}, {dim}) as the means are {dim} long, got shape {sigma.shape}")
    with warnings.catch_warnings():
        # scipy warns of a singular product; the root is checked here instead (ADM's disp=False).
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(root).all():
        log.warning("frechet_distance: sqrtm(sigma1 sigma2) is not finite (a singular product); adding %g to "
                    "both covariances' diagonals", SINGULAR_EPS)
        offset = SINGULAR_EPS * np.eye(dim)
        root = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(root):
        imaginary = np.abs(np.diagonal(root).imag).max()
        if imaginary > MAX_IMAGINARY:
            raise ValueError(f"sqrtm(sigma1 sigma2) has an imaginary part of {imaginary:.3g} on its diagonal: "
                             "the covariances are not positive semi-definite")
        root = root.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root))


def _features(name: str, value, k: int) -> torch.Tensor:
    """``value (N, D)`` as a float tensor on its device (float64 stays float64, anything else becomes
    float32), checked to be finite with more than ``k`` rows."""
    tensor = torch.as_tensor(value)
    tensor = tensor.to(torch.float64 if tensor.dtype == torch.float64 else torch.float32)
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be a matrix (N, D), got shape {tuple(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    if len(tensor) <= k:
        raise ValueError(f"precision and recall with k={k} need more than {k} feature vectors in each set, "
                         f"{name} has {len(tensor)}")
    return tensor


def _squared_distances(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``(R, C)`` squared Euclidean distances between ``rows (R, D)`` and ``columns (C, D)``."""
    products = rows @ columns.T
    return (rows.square().sum(1)[:, None] - 2 * products + columns.square().sum(1)[None]).clamp_min_(0)


def _radii(features: torch.Tensor, k: int, batch_size: int) -> torch.Tensor:
    """``(N,)`` squared distance of each row of ``features (N, D)`` to its k-th nearest neighbour
    among the others: the (k+1)-th smallest distance of its row, the first being its own, 0."""
    return torch.cat([_squared_distances(features[start:start + batch_size], features).kthvalue(k + 1, dim=1).values
                      for start in range(0, len(features), batch_size)])


def precision_recall(real_features, fake_features, k: int = PRECISION_RECALL_K,
                     batch_size: int = 1024) -> tuple[float, float]:
    """Improved precision and recall of ``fake_features (M, D)`` against ``real_features (N, D)``
    (numpy arrays or tensors; computed on their device, in float64 for float64, else float32), with
    the k-nearest-neighbour radii of each set; both sets need more than ``k`` vectors.

    ``batch_size`` rows of distances are held at a time: ``batch_size x max(N, M)``, never N x M.
    Returns ``(precision, recall)``: the fraction of generated samples within some real radius and of
    real samples within some generated radius."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    real, fake = _features("real_features", real_features, k), _features("fake_features", fake_features, k)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real_features and fake_features must have the same number of features, got "
                         f"{real.shape[1]} and {fake.shape[1]}")
    fake = fake.to(real.device, real.dtype)
    real_radii, fake_radii = _radii(real, k, batch_size), _radii(fake, k, batch_size)
    fake_in_real = torch.zeros(len(fake), dtype=torch.bool, device=fake.device)
    real_in_fake = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    for start in range(0, len(fake), batch_size):
        distances = _squared_distances(fake[start:start + batch_size], real)  # (batch, N)
        fake_in_real[start:start + batch_size] = (distances <= real_radii[None]).any(1)
        real_in_fake |= (distances <= fake_radii[start:start + batch_size, None]).any(0)
    return float(fake_in_real.double().mean()), float(real_in_fake.double().mean())


def split_inception_scores(logits, splits: int = INCEPTION_SCORE_SPLITS) -> np.ndarray:
    """``(splits,)`` float64: the Inception Score of each of ``splits`` contiguous, near-equal parts
    of ``logits (N, C)`` (the classifier's logits of N samples, N >= splits; any float dtype,
    computed in float64)."""
    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
        raise ValueError(f"splits must be an int >= 1, got {splits!r}")
    logits = torch.as_tensor(logits).detach().to("cpu", torch.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits must be a matrix (N, C), got shape {tuple(logits.shape)}")
    if not torch.isfinite(logits).all():
        raise ValueError("logits holds NaN or infinite values")
    if len(logits) < splits:
        raise ValueError(f"the Inception Score in {splits} splits needs at least {splits} samples, got {len(logits)}")
    scores = []
    for log_p in torch.tensor_split(torch.log_softmax(logits, dim=1), splits):
        # log of the split's marginal p(y) = mean_i p(y|x_i), from the log-probabilities (a probability
        # that underflows to 0 then adds 0 * finite, never 0 * log 0).
        log_marginal = torch.logsumexp(log_p, dim=0) - math.log(len(log_p))
        kl = (log_p.exp() * (log_p - log_marginal)).sum(1).mean()
        scores.append(float(kl.exp()))
    return np.array(scores)


def inception_score(logits, splits: int = INCEPTION_SCORE_SPLITS) -> float:
    """The Inception Score of the samples whose classifier logits are ``logits (N, C)``: the mean of
    :func:`split_inception_scores` over ``splits`` contiguous parts (ADM's score)."""
    return float(split_inception_scores(logits, splits).mean())
