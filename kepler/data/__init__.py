"""Image data for the tokenizer and the prior: data sources registered by name
(:mod:`kepler.data.sources`; one file a source), seeded augmentation and resumable sampling.

Sources: ``sample`` (embedded photos, :mod:`kepler.data.sample`), ``faces`` (embedded LFW patches,
labelled, :mod:`kepler.data.faces`), webdataset shards written by ``kepler data shard``
(:mod:`kepler.data.shards`, streamed in training), a folder of images (:mod:`kepler.data.folder`;
labelled when it holds class folders) and a list file of image paths (:mod:`kepler.data.list_file`;
labelled when its lines are ``path<TAB>label``). Items are ``(image, skipped paths)``. Class labels,
where a data set has them, are not in the items: a labelled data set declares ``num_classes``,
its ``classes`` and its items' ``labels``, read through :func:`dataset_labels` (the
class-conditional prior is their one user); a run fixes its class ids (:mod:`kepler.data.classes`).
The trainer reads batches through :class:`EpochLoader`.
"""

from __future__ import annotations

from torch.utils.data import Dataset, Subset

# The sources register themselves when imported, in this order (named sources, shards, then other
# folders and files).
from kepler.data import sample, faces, shards, folder, list_file  # noqa: F401  isort: skip
from kepler.data.classes import dataset_labels, run_classes
from kepler.data.faces import LFWFaces
from kepler.data.images import IMAGE_EXTENSIONS, UNREADABLE_IMAGE_ERRORS, ImagePaths
from kepler.data.loader import EpochLoader
from kepler.data.sample import SamplePhotos
from kepler.data.sampler import SeededSampler, collate
from kepler.data.shards import ImageShards
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


__all__ = [
    "IMAGE_EXTENSIONS",
    "SOURCES",
    "DataSection",
    "EpochLoader",
    "ImagePaths",
    "ImageShards",
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
    "run_classes",
    "to_rgb",
    "to_tensor",
    "to_uint8",
    "to_unit",
]
