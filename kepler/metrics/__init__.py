"""Metrics, one module a kind:

* :mod:`kepler.metrics.packing`: how a codebook packs (nearest-neighbour spacing, covering, packing
  report) and the bits its codes carry;
* :mod:`kepler.metrics.image`: how close reconstructions are to images (PSNR, SSIM, the mean-colour
  baseline);
* :mod:`kepler.metrics.inception`: FID and Inception Score on the local FID Inception weights
  (never downloaded; off, saying why, without them).
"""

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
    "mean_colour",
    "nearest_neighbor_distances",
    "packing_report",
    "psnr",
    "ssim",
]
