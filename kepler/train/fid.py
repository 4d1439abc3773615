"""``kepler fid``: FID, sFID, Inception Score, precision and recall of generated images against
reference images, as guided-diffusion's ADM evaluator (``evaluations/evaluator.py``) computes them,
on the FID Inception network from a local weights file (:mod:`kepler.metrics.inception`).

An image set is one of:

* an ADM-layout ``.npz``: ``arr_0``, uint8 ``(N, H, W, 3)``, read a batch at a time from the
  archive (a 50 000-image set at 256 x 256 is 9.8 GB) and never unpickled;
* a folder: every image under it (:meth:`kepler.data.ImagePaths.from_folder`), as it is;
* a data spec (:func:`kepler.data.build_dataset`: ``sample``, ``faces``, a list file): its held-out
  split, centre-cropped to ``size``.

A reference's statistics (:class:`ReferenceStatistics`: the Gaussians of its pool and spatial
features, and the pool features that precision and recall need) can be saved to an ``.npz``
(:func:`save_statistics`) and given in its place. The keys are ADM's (``mu``, ``sigma``, ``mu_s``,
``sigma_s``) plus ``pool_features``; an ``.npz`` holding ``arr_0`` is read as images, even where it
holds statistics too (ADM's reference batches: the statistics are recomputed on this network).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from kepler.data import UNREADABLE_IMAGE_ERRORS, ImagePaths, build_dataset, collate, to_rgb, to_uint8
from kepler.io.files import write_atomically
from kepler.io.sample_npz import NpzImages, npz_members
from kepler.metrics.generative import (
    INCEPTION_SCORE_SPLITS,
    PRECISION_RECALL_K,
    feature_statistics,
    frechet_distance,
    inception_score,
    precision_recall,
)
from kepler.metrics.inception import InceptionFeatures, inception_features

STATISTICS_KEYS = ("mu", "sigma", "mu_s", "sigma_s", "pool_features")

# progress(batches, total batches, what) -> the same batches, e.g. tqdm's signature.
Progress = Callable[[Iterable, int, str], Iterable]


class FolderImages:
    """Every image under the folder ``path``, as it is (8-bit RGB), ``count`` of them."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.paths = ImagePaths.from_folder(self.path, transform=None).paths  # its listing only: read as they are
        self.count = len(self.paths)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """uint8 ``(B, H, W, 3)`` arrays of up to ``batch_size`` images in file order; a batch ends
        early where the next image's size differs (each image is seen at its own size)."""
        batch: list[np.ndarray] = []
        for path in self.paths:
            try:
                with Image.open(path) as image:
                    array = np.asarray(to_rgb(image))
            except UNREADABLE_IMAGE_ERRORS as exc:
                raise ValueError(f"cannot read image {path}: {exc}") from None
            if batch and (len(batch) == batch_size or array.shape != batch[0].shape):
                yield np.stack(batch)
                batch = []
            batch.append(array)
        yield np.stack(batch)


class DataImages:
    """The held-out images of the data spec ``spec`` (:func:`kepler.data.build_dataset`), centre
    crops of side ``size``, ``count`` of them (less any unreadable file, which is left out)."""

    def __init__(self, spec: str, size: int):
        self.path = spec
        self.dataset = build_dataset({"val": spec, "size": size}, "val")
        self.count = len(self.dataset)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for images, _ in DataLoader(self.dataset, batch_size=batch_size, collate_fn=collate):
            if images is not None:  # None: a batch of unreadable files only
                yield to_uint8(images)


class ReferenceStatistics(NamedTuple):
    """What a reference set is compared by, float64: the mean ``mu (D,)`` and covariance
    ``sigma (D, D)`` of its pool features (D = 2048), ``mu_s (S,)`` and ``sigma_s (S, S)`` of its
    spatial features (S = 2023), and its pool features ``pool_features (N, D)`` (float32), for
    precision and recall."""

    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray
    sigma_s: np.ndarray
    pool_features: np.ndarray

    @classmethod
    def of(cls, features: InceptionFeatures) -> ReferenceStatistics:
        return cls(*feature_statistics(features.pool), *feature_statistics(features.spatial),
                   features.pool.numpy().astype(np.float32))


def save_statistics(statistics: ReferenceStatistics, path: str | os.PathLike) -> Path:
    """Write ``statistics`` to the ``.npz`` ``path`` (its keys :data:`STATISTICS_KEYS`), atomically."""
    return write_atomically(path, lambda file: np.savez(file, **statistics._asdict()))


def load_statistics(path: str | os.PathLike) -> ReferenceStatistics:
    """The :class:`ReferenceStatistics` in the ``.npz`` ``path`` (:func:`save_statistics`), checked
    to hold every key with consistent shapes; nothing in it is unpickled."""
    with np.load(path, allow_pickle=False) as stored:
        missing = [key for key in STATISTICS_KEYS if key not in stored.files]
        if missing:
            raise ValueError(f"{path} is not a statistics file of kepler fid: it lacks {', '.join(missing)}")
        statistics = ReferenceStatistics(*(stored[key] for key in STATISTICS_KEYS))
    mu, sigma, mu_s, sigma_s, pool = statistics
    if not (mu.ndim == 1 and sigma.shape == (len(mu), len(mu)) and mu_s.ndim == 1
            and sigma_s.shape == (len(mu_s), len(mu_s)) and pool.ndim == 2 and pool.shape[1] == len(mu)):
        shapes = ", ".join(f"{key} {tuple(array.shape)}" for key, array in zip(STATISTICS_KEYS, statistics))
        raise ValueError(f"{path}: the statistics' shapes do not fit together: {shapes}")
    return statistics


def open_image_set(spec: str, size: int):
    """The image set ``spec`` names (:class:`NpzImages`, :class:`FolderImages`, or
    :class:`DataImages` at ``size``), or the :class:`ReferenceStatistics` of a statistics ``.npz``
    (one that holds ``mu`` but no ``arr_0``)."""
    path = Path(spec)
    if path.suffix == ".npz" and path.is_file():
        members = npz_members(path)
        if "arr_0.npy" not in members and "mu.npy" in members:
            return load_statistics(path)
        return NpzImages(path)
    if path.is_dir():
        return FolderImages(path)
    return DataImages(spec, size)


def image_set_features(network, images, batch_size: int, device: torch.device | str,
                       progress: Progress | None = None) -> InceptionFeatures:
    """:func:`kepler.metrics.inception.inception_features` of every image in ``images`` (an image
    set of :func:`open_image_set`), ``batch_size`` at a time, the batches passed through
    ``progress``."""
    batches = images.batches(batch_size)
    if progress is not None:
        batches = progress(batches, -(-images.count // batch_size), str(images.path))
    return inception_features(network, batches, device)


def compare(samples: InceptionFeatures, reference: ReferenceStatistics, device: torch.device | str = "cpu") -> dict:
    """ADM's metrics of ``samples`` against ``reference``: ``fid`` and ``sfid`` (Fréchet distances of
    the pool and spatial statistics), ``inception_score`` (:data:`INCEPTION_SCORE_SPLITS` splits),
    ``precision`` and ``recall`` (k = :data:`PRECISION_RECALL_K`, on ``device``), and the counts;
    ``inception_score_off_reason`` / ``precision_recall_off_reason`` instead where there are too few
    samples for them."""
    count, reference_count = len(samples.pool), len(reference.pool_features)
    if samples.pool.shape[1] != reference.pool_features.shape[1]:
        raise ValueError(f"the samples have {samples.pool.shape[1]} pool features and the reference "
                         f"{reference.pool_features.shape[1]}: statistics of another network")
    if count < 2:
        raise ValueError(f"FID needs at least 2 samples, got {count}")
    out = {"num_samples": count, "num_reference": reference_count,
           "fid": frechet_distance(*feature_statistics(samples.pool), reference.mu, reference.sigma),
           "sfid": frechet_distance(*feature_statistics(samples.spatial), reference.mu_s, reference.sigma_s)}
    if count < INCEPTION_SCORE_SPLITS:
        out["inception_score_off_reason"] = (f"{count} samples; the Inception Score needs at least "
                                             f"{INCEPTION_SCORE_SPLITS} (one per split)")
    else:
        out["inception_score"] = inception_score(samples.logits, INCEPTION_SCORE_SPLITS)
    if min(count, reference_count) <= PRECISION_RECALL_K:
        out["precision_recall_off_reason"] = (f"{count} samples and {reference_count} reference images; "
                                              f"precision and recall need more than {PRECISION_RECALL_K} of each")
    else:
        real = torch.from_numpy(reference.pool_features).to(device)
        out["precision"], out["recall"] = precision_recall(real, samples.pool.to(device), PRECISION_RECALL_K)
    return out


def evaluate_samples(samples, reference, network, *, batch_size: int = 64, device: torch.device | str = "cpu",
                     save_stats: str | os.PathLike | None = None, progress: Progress | None = None) -> dict:
    """:func:`compare` of the image set ``samples`` against ``reference`` (an image set or its
    :class:`ReferenceStatistics`; both from :func:`open_image_set`) on ``network`` (an
    :class:`~kepler.metrics.inception.InceptionNetwork`), which is moved to ``device``.
    ``save_stats``: write the reference's statistics there (:func:`save_statistics`)."""
    if isinstance(samples, ReferenceStatistics):
        raise ValueError("the samples are a statistics file: their images are needed (the Inception Score, "
                         "precision and recall take each sample's features)")
    if save_stats is not None and isinstance(reference, ReferenceStatistics):
        raise ValueError(f"the reference is a statistics file already: there are no statistics to save to {save_stats}")
    network.to(device)
    if not isinstance(reference, ReferenceStatistics):
        reference_features = image_set_features(network, reference, batch_size, device, progress)
        if len(reference_features.pool) < 2:
            raise ValueError(f"the reference {reference.path}: its statistics need at least 2 images, got "
                             f"{len(reference_features.pool)}")
        reference = ReferenceStatistics.of(reference_features)
        if save_stats is not None:
            save_statistics(reference, save_stats)
    return compare(image_set_features(network, samples, batch_size, device, progress), reference, device)
