"""The data source ``sample``: real photos shipped by scikit-image and scikit-learn (no download).

Training draws random crops from 8 colour photos, each at a random scale (shorter side
between ``resize`` and ``2 * resize``: a few small photos alone are memorized, not learned from);
validation takes fixed crops of 3 other photos at shorter side ``resize``, photos that training
never sees (a cat, a rocket launch, a flower), so its numbers measure generalization.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from kepler.data.images import SampleKey, split_key
from kepler.data.sources import register_source
from kepler.data.transforms import ImageTransform, to_tensor

# scikit-image loader names (skimage.data.<name>()), then scikit-learn sample image file names.
# Colour photos only: with scikit-image's greyscale photos in the mix, a small model learns to
# desaturate, and the (colour) held-out photos come back grey.
TRAIN_PHOTOS = (
    "astronaut", "coffee", "hubble_deep_field", "immunohistochemistry", "motorcycle_left",
    "motorcycle_right", "retina", "china.jpg",
)
VAL_PHOTOS = ("chelsea", "rocket", "flower.jpg")


def load_photo(name: str) -> Image.Image:
    """One embedded photo as an RGB PIL image (greyscale photos are replicated to 3 channels)."""
    if name.endswith(".jpg"):
        from sklearn.datasets import load_sample_image

        array = load_sample_image(name)
    else:
        import skimage.data

        if name.startswith("motorcycle_"):
            left, right, _ = skimage.data.stereo_motorcycle()
            array = left if name == "motorcycle_left" else right
        else:
            array = getattr(skimage.data, name)()
    array = np.asarray(array)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return Image.fromarray(array[..., :3]).convert("RGB")


def grid_offsets(length: int, size: int, max_per_axis: int = 3) -> list[int]:
    """Evenly spaced crop offsets covering ``length`` with crops of ``size`` (both ends included)."""
    n = min(max_per_axis, math.ceil(length / size))
    if n <= 1:
        return [(length - size) // 2]
    return [round(i * (length - size) / (n - 1)) for i in range(n)]


class SamplePhotos(Dataset):
    """The embedded ``sample`` photos; items are ``(image (3, size, size) in [-1, 1], ())``.

    Args:
        split: ``"train"``: ``samples_per_epoch`` random crops (photo ``i mod 8``), flipped at
            random; ``"val"``: fixed crops on a grid (at most 3 x 3 per photo) of the held-out photos.
        size, resize: crop side, and the photos' shorter side before cropping (default ``2 * size``).
    """

    def __init__(self, split: str, size: int, resize: int | None = None, samples_per_epoch: int = 1024,
                 flip: bool = True):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.split = split
        train = split == "train"
        resize = resize or 2 * size
        self.transform = ImageTransform(size, resize, random_crop=train, flip=flip and train)
        names = TRAIN_PHOTOS if train else VAL_PHOTOS
        largest = ImageTransform(size, 2 * resize if train else resize)
        self.photos = [largest.resize_shorter_side(load_photo(n)) for n in names]
        self.samples_per_epoch = samples_per_epoch
        self.crops = []
        if not train:
            for p, photo in enumerate(self.photos):
                w, h = photo.size
                self.crops += [(p, x, y) for y in grid_offsets(h, size) for x in grid_offsets(w, size)]

    def __len__(self) -> int:
        return self.samples_per_epoch if self.split == "train" else len(self.crops)

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, tuple[str, ...]]:
        index, rng = split_key(key)
        if self.split == "train":
            if rng is None:
                rng = np.random.default_rng(index)
            shorter = int(rng.integers(self.transform.resize, 2 * self.transform.resize + 1))
            scaled = ImageTransform(self.transform.size, shorter, random_crop=True, flip=self.transform.flip)
            return scaled(self.photos[index % len(self.photos)], rng), ()
        return to_tensor(np.asarray(self.image(index), dtype=np.float32)), ()

    def image(self, index: int) -> Image.Image:
        """Item ``index``'s image before its crop and flip, a copy (the caller closes it): the training
        photo it is cropped from, or the fixed held-out crop."""
        if self.split == "train":
            return self.photos[index % len(self.photos)].copy()
        p, x, y = self.crops[index]
        s = self.transform.size
        return self.photos[p].crop((x, y, x + s, y + s))  # the photo is already resized


@register_source("sample", "the embedded photos 'sample'")
def build_sample(spec: str, split: str, data) -> SamplePhotos:
    return SamplePhotos(split, data["size"], data["resize"], samples_per_epoch=data["samples_per_epoch"],
                        flip=data["flip"])
