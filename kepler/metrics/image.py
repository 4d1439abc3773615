"""Reconstruction metrics of images: PSNR, SSIM and the trivial baseline they are read against.

Images are compared in [0, 1] (:func:`kepler.data.to_unit` maps the models' [-1, 1] there, clamped); every
metric is per image, ``(B,)`` float32. ``mean_colour`` paints each image with its own mean colour:
a tokenizer that does not beat that baseline's PSNR clearly has learned nothing.
"""

from __future__ import annotations

import torch


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of (B, C, H, W) images in [0, 1]: (B,) float32."""
    mse = (x.float() - y.float()).square().flatten(1).mean(dim=1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))


def ssim(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (11x11 Gaussian window, sigma 1.5) of images in [0, 1]: (B,) float32."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(y.float(), x.float(), data_range=1.0, reduction="none")


def mean_colour(x: torch.Tensor) -> torch.Tensor:
    """The trivial baseline: each image replaced by its per-channel mean colour."""
    return x.mean(dim=(2, 3), keepdim=True).expand_as(x)
