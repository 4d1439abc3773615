"""taming's image preprocessing: resize the shorter side, crop (random or centre), random h-flip.

Randomness comes from a ``numpy.random.Generator`` passed per sample, so a sample's augmentation
depends only on its seed (see :class:`kepler.data.SeededSampler`), never on worker processes or the
global RNG: that is what makes resumed runs see exactly the same batches.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


class ImageTransform:
    """PIL image -> (3, size, size) float32 tensor in [-1, 1].

    Args:
        size: side of the square crop.
        resize: the shorter side is resized to this first (bicubic, antialiased); default ``size``.
        random_crop: random crop position (training) instead of the centre (validation).
        flip: flip horizontally with probability 1/2.
    """

    def __init__(self, size: int, resize: int | None = None, random_crop: bool = True, flip: bool = True):
        if size <= 0:
            raise ValueError(f"size must be positive, got {size}")
        resize = size if resize is None else resize
        if resize < size:
            raise ValueError(f"resize ({resize}) must be >= size ({size}): the crop must fit in the resized image")
        self.size = size
        self.resize = resize
        self.random_crop = random_crop
        self.flip = flip

    def resize_shorter_side(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        if min(w, h) == self.resize:
            return image
        scale = self.resize / min(w, h)
        new = (max(self.resize, round(w * scale)), max(self.resize, round(h * scale)))
        return image.resize(new, Image.Resampling.BICUBIC)

    def crop_box(self, width: int, height: int, rng: np.random.Generator | None) -> tuple[int, int]:
        """Top-left corner (left, top) of the crop in a ``width`` x ``height`` image."""
        if self.random_crop and rng is not None:
            return int(rng.integers(0, width - self.size + 1)), int(rng.integers(0, height - self.size + 1))
        return (width - self.size) // 2, (height - self.size) // 2

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        image = self.resize_shorter_side(to_rgb(image))
        left, top = self.crop_box(*image.size, rng)
        image = image.crop((left, top, left + self.size, top + self.size))
        array = np.asarray(image, dtype=np.float32)
        if self.flip and rng is not None and rng.random() < 0.5:
            array = array[:, ::-1]
        return to_tensor(array)


# 16-bit greyscale modes (PNG); PIL's convert("RGB") clips their 0..65535 values at 255 (all white).
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(image: Image.Image) -> Image.Image:
    """A PIL image of any mode as 8-bit RGB. 16-bit greyscale is scaled from [0, 65535] to [0, 255]
    (PIL reads 16-bit colour PNGs as 8-bit RGB itself)."""
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = np.asarray(image, dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8))  # mode L
    return image.convert("RGB")


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8-range array -> (3, H, W) float32 tensor in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped, float32 (where image metrics compare images)."""
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) or (3, H, W) tensor in [-1, 1] -> (..., H, W, 3) uint8 array (clamped)."""
    x = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()
