"""Images written to disk: one PNG, and grids of images (samples) or of pairs (original |
reconstruction). Images are ``(..., 3, H, W)`` float tensors in [-1, 1], clamped on the way out."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from kepler.data.transforms import to_uint8, to_unit


def save_png(array: np.ndarray, path: str | os.PathLike) -> Path:
    """An ``(H, W, 3)`` uint8 array as a PNG at ``path`` (its folder created)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def save_image(image: torch.Tensor, path: str | os.PathLike) -> Path:
    """``image (3, H, W)`` in [-1, 1] as a PNG."""
    return save_png(to_uint8(image), path)


def save_image_grid(images: torch.Tensor, path: str | os.PathLike, columns: int = 8) -> Path:
    """PNG grid of ``images (N, 3, H, W)`` in [-1, 1], ``columns`` per row."""
    from torchvision.utils import make_grid

    grid = make_grid(to_unit(images), nrow=columns, padding=2, pad_value=1.0)
    return save_png((grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy(), path)


def save_pair_grid(originals: torch.Tensor, reconstructions: torch.Tensor, path: str | os.PathLike,
                   columns: int = 4) -> Path:
    """PNG grid: pairs (original | reconstruction) side by side, ``columns`` pairs per row."""
    pairs = torch.stack([originals, reconstructions], dim=1).flatten(0, 1)
    return save_image_grid(pairs, path, columns=2 * min(columns, len(originals)))
