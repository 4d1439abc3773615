"""Metrics, one module a kind:

* :mod:`kepler.metrics.packing`: how a codebook packs (nearest-neighbour spacing, covering, packing
  report) and the bits its codes carry;
* :mod:`kepler.metrics.image`: how close reconstructions are to images (PSNR, SSIM, the mean-colour
  baseline);
* :mod:`kepler.metrics.generative`: how close generated images are to real ones, as plain functions
  of their features (Fréchet distance, precision and recall, Inception Score; the ADM evaluator's
  definitions);
* :mod:`kepler.metrics.inception`: the FID Inception network on its local weights (never
  downloaded; off, saying why, without them): its features, and rFID.
"""

from kepler.metrics.generative import feature_statistics, frechet_distance, inception_score, precision_recall
from kepler.metrics.image import mean_colour, psnr, ssim
from kepler.metrics.packing import (
    PackingReport,
    bits_per_position,
    effective_bits,
    nearest_neighbor_distances,
    packing_report,
)

__all__ = [
    "PackingReport",
    "bits_per_position",
    "effective_bits",
    "feature_statistics",
    "frechet_distance",
    "inception_score",
    "mean_colour",
    "nearest_neighbor_distances",
    "packing_report",
    "precision_recall",
    "psnr",
    "ssim",
]
