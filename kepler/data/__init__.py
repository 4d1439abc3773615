"""Image data for the tokenizer: folders and list files of images, and embedded data sets.

Items are ``(image, skipped paths)``. Class labels, where a data set has them (``faces``), are not in
the items: a labelled data set declares ``num_classes`` and its items' ``labels``, read through
:func:`dataset_labels` (the class-conditional prior is their one user).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

from kepler.data.embedded import LFWFaces, SamplePhotos
from kepler.data.images import IMAGE_EXTENSIONS, UNREADABLE_IMAGE_ERRORS, ImagePaths
from kepler.data.sampler import SeededSampler, collate
from kepler.data.transforms import ImageTransform, to_rgb, to_tensor, to_uint8

EMBEDDED = ("sample", "faces")


def build_dataset(
    spec: str | os.PathLike,
    split: str,
    size: int,
    resize: int | None = None,
    random_crop: bool = True,
    flip: bool = True,
    samples_per_epoch: int = 1024,
) -> Dataset:
    """The data set named by ``spec``: ``"sample"``, ``"faces"``, a folder of images (recursive) or a
    list file of image paths. ``split="val"`` turns random crops and flips off (and picks the
    held-out part of the embedded sets). Items are ``(image (3, size, size) in [-1, 1], skipped)``.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    train = split == "train"
    spec = str(spec)
    if spec == "sample":
        return SamplePhotos(split, size, resize, samples_per_epoch=samples_per_epoch, flip=flip)
    if spec == "faces":
        return LFWFaces(split, size, resize, flip=flip)
    transform = ImageTransform(size, resize, random_crop=random_crop and train, flip=flip and train)
    path = Path(spec)
    if path.is_dir() or path.is_file():
        dataset = ImagePaths.from_folder(path, transform) if path.is_dir() else ImagePaths.from_list(path, transform)
        dataset.check_readable()
        return dataset
    raise ValueError(
        f"data {spec!r} is neither an embedded data set {EMBEDDED}, a folder of images nor a list file "
        "(no such file or folder)"
    )


def first_items(dataset: Dataset, count: int | None) -> Dataset:
    """The first ``count`` items of ``dataset`` (all of them for ``None``): how ``val_max_images``
    and ``--max-images`` cap a held-out set."""
    if count is None:
        return dataset
    return Subset(dataset, range(min(int(count), len(dataset))))


def dataset_labels(dataset: Dataset) -> tuple[int, torch.Tensor | None]:
    """The class labels of ``dataset``'s items: ``(num_classes, labels (len(dataset),) int64 in
    [0, num_classes))``, or ``(0, None)`` for a data set without classes.

    A labelled data set has two attributes: ``num_classes`` (an int >= 1) and ``labels``, its items'
    classes in item order; any other data set is unlabelled. A :class:`~torch.utils.data.Subset`
    (:func:`first_items`) has the labels of the items it keeps.
    """
    if isinstance(dataset, Subset):
        num_classes, labels = dataset_labels(dataset.dataset)
        return num_classes, None if labels is None else labels[list(dataset.indices)]
    num_classes = getattr(dataset, "num_classes", 0)
    return (num_classes, dataset.labels) if num_classes else (0, None)


__all__ = [
    "EMBEDDED",
    "IMAGE_EXTENSIONS",
    "ImagePaths",
    "ImageTransform",
    "UNREADABLE_IMAGE_ERRORS",
    "LFWFaces",
    "SamplePhotos",
    "SeededSampler",
    "build_dataset",
    "collate",
    "dataset_labels",
    "first_items",
    "to_rgb",
    "to_tensor",
    "to_uint8",
]
