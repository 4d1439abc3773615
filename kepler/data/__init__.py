"""Image data for the tokenizer and the prior: data sources registered by name
(:mod:`kepler.data.sources`; one file a source), seeded augmentation and resumable sampling.

Sources: ``sample`` (embedded photos, :mod:`kepler.data.sample`), ``faces`` (embedded LFW patches,
labelled, :mod:`kepler.data.faces`), a folder of images (:mod:`kepler.data.folder`), a list file of
image paths (:mod:`kepler.data.list_file`). Items are ``(image, skipped paths)``. Class labels,
where a data set has them, are not in the items: a labelled data set declares ``num_classes`` and
its items' ``labels``, read through :func:`dataset_labels` (the class-conditional prior is their one
user).
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Subset

# The sources register themselves when imported, in this order (named sources before paths).
from kepler.data import sample, faces, folder, list_file  # noqa: F401  isort: skip
from kepler.data.faces import LFWFaces
from kepler.data.images import IMAGE_EXTENSIONS, UNREADABLE_IMAGE_ERRORS, ImagePaths
from kepler.data.sample import SamplePhotos
from kepler.data.sampler import SeededSampler, collate
from kepler.data.sources import SOURCES, DataSection, build_dataset, register_source
from kepler.data.transforms import ImageTransform, to_rgb, to_tensor, to_uint8, to_unit


def first_items(dataset: Dataset, count: int | None) -> Dataset:
    """The first ``count`` items of ``dataset`` (all of them for ``None``): how ``val_max_images``
    and ``--max-images`` cap a held-out set."""
    if count is None:
        return dataset
    return Subset(dataset, range(min(int(count), len(dataset))))


def held_out_set(data) -> Dataset:
    """The held-out images of a ``data`` section: the first ``val_max_images`` of its ``val`` source."""
    return first_items(build_dataset(data, "val"), data.get("val_max_images"))


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
    "IMAGE_EXTENSIONS",
    "SOURCES",
    "DataSection",
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
    "held_out_set",
    "register_source",
    "to_rgb",
    "to_tensor",
    "to_uint8",
    "to_unit",
]
