"""The data source ``faces``: the 200 25x25 LFW patches of ``skimage.data.lfw_subset`` (100 faces,
100 non-faces), upsampled; every tenth is held out for validation. It is labelled (class 1: face,
0: non-face; see :func:`kepler.data.dataset_labels`).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from kepler.data.images import SampleKey, split_key
from kepler.data.sources import register_source
from kepler.data.transforms import ImageTransform

# skimage.data.lfw_subset(): "100 first images are faces and subsequent 100 are non-faces".
LFW_FACES = 100
NOT_FACE, FACE = 0, 1


class LFWFaces(Dataset):
    """``skimage.data.lfw_subset()`` upsampled to ``resize`` (default ``size``) and cropped to ``size``;
    ``split="val"`` is every tenth patch (20: 10 faces, then 10 non-faces), ``"train"`` the other 180.

    Labelled: ``labels`` ``(len,)`` int64 holds each item's class, :data:`FACE` (1) for the faces and
    :data:`NOT_FACE` (0) for the background patches of the same photos; ``num_classes`` is 2.
    """

    num_classes = 2
    classes = ("non-face", "face")

    def __init__(self, split: str, size: int, resize: int | None = None, flip: bool = True):
        import skimage.data

        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        train = split == "train"
        self.transform = ImageTransform(size, resize, random_crop=train, flip=flip and train)
        patches = skimage.data.lfw_subset()
        keep = [i for i in range(len(patches)) if (i % 10 == 9) != train]
        self.labels = torch.tensor([FACE if i < LFW_FACES else NOT_FACE for i in keep], dtype=torch.int64)
        self.images = [
            self.transform.resize_shorter_side(
                Image.fromarray((np.clip(patches[i], 0, 1) * 255).round().astype(np.uint8)).convert("RGB")
            )
            for i in keep
        ]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor, tuple[str, ...]]:
        index, rng = split_key(key)
        return self.transform(self.images[index], rng), ()

    def image(self, index: int) -> Image.Image:
        """Item ``index``'s patch before its crop and flip (upsampled), a copy (the caller closes it)."""
        return self.images[index].copy()


@register_source("faces", "the embedded faces 'faces'")
def build_faces(spec: str, split: str, data) -> LFWFaces:
    return LFWFaces(split, data["size"], data["resize"], flip=data["flip"])
