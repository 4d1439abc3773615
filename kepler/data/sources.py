"""Data sources: what ``data.train`` and ``data.val`` may name, registered like quantizers.

A source is one file in ``kepler/data/`` that registers a builder with :func:`register_source`:
its name, how to recognize a spec that names it (the embedded sets by their name, a folder or a list
file by what the path is), and ``build(spec, split, data) -> Dataset``. :func:`build_dataset`
takes the ``data`` config section itself (:class:`DataSection`: crop ``size``, ``resize``,
``random_crop``, ``flip``, ``samples_per_epoch``, ...) and asks the sources in registration order
(named sources before paths); a new data option is a key of the section, read by the sources that
use it, not a new positional argument at every call site. A source whose data carry classes (class
folders, a list file's labels, shards) also registers ``classes(spec, data)``, which names them
without building the data set (:func:`source_classes`; see :mod:`kepler.data.classes`).

Items are ``(image (3, size, size) float32 in [-1, 1], skipped paths)``: a source of files names the
unreadable ones it skipped, which the trainer counts and evaluation leaves out. Class labels, where a
source has them (``faces``, class folders, list files with labels, shards), are not in the items:
see :func:`kepler.data.dataset_labels`. A data set's ``image(index)`` is item ``index``'s image
before its crop and flip, a PIL image the caller closes: what ``kepler data shard`` writes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from torch.utils.data import Dataset

SPLITS = ("train", "val")


@dataclass
class DataSection:
    """The ``data`` section of a config (its keys, defaults and types; :mod:`kepler.io.config`)."""

    train: str = "sample"  # a data source (kepler.data.SOURCES): sample | faces | shards | a folder | a list file
    val: str = "sample"
    labels: str = "auto"  # auto: class labels where the data have them (class folders, path<TAB>label lists) | none
    classes: Sequence[str] | None = None  # class names in id order; default: data.train's (a run records its own)
    size: int = 256
    resize: int | None = None  # shorter side before cropping; default size (2 * size for "sample")
    random_crop: bool = True
    flip: bool = True
    batch_size: int = 5
    num_workers: int = 0
    samples_per_epoch: int = 1024  # length of an epoch of the embedded "sample" set
    val_batch_size: int = 16
    val_max_images: int | None = None
    shuffle_buffer: int = 1000  # samples each stream of shards mixes (webdataset's shuffle buffer)


# build(spec, split, data section with every key) -> the data set
Builder = Callable[[str, str, Mapping], Dataset]
# classes(spec, data section) -> the class names of the data in id order, or None (no names)
ClassNames = Callable[[str, Mapping], list[str] | None]


class Source(NamedTuple):
    name: str
    what: str  # how an error message names it, e.g. "a folder of images"
    matches: Callable[[str], bool]
    build: Builder
    classes: ClassNames | None = None


SOURCES: dict[str, Source] = {}


def register_source(name: str, what: str, matches: Callable[[str], bool] | None = None,
                    classes: ClassNames | None = None):
    """Decorator on a :data:`Builder`: registers it as the source ``name``, which builds the data
    sets of the specs ``matches`` accepts (default: the spec equal to ``name``); ``classes`` names
    the classes of a spec's data without building it (:func:`source_classes`)."""
    def register(build: Builder) -> Builder:
        SOURCES[name] = Source(name, what, matches or (lambda spec: spec == name), build, classes)
        return build

    return register


def with_defaults(data: Mapping) -> dict:
    """The ``data`` section with :class:`DataSection`'s defaults for the keys it lacks."""
    return {**dataclasses.asdict(DataSection()), **data}


def _source_of(spec: str) -> Source:
    for source in SOURCES.values():
        if source.matches(spec):
            return source
    kinds = [source.what for source in SOURCES.values()]
    raise ValueError(f"data {spec!r} is not a data source: expected {', '.join(kinds[:-1])} or {kinds[-1]} "
                     "(no such file or folder)")


def build_dataset(data: Mapping, split: str, spec: str | None = None) -> Dataset:
    """The ``split`` (``"train"`` or ``"val"``) data set of the ``data`` config section: the source
    that ``spec`` names (default ``data[split]``), built with the section's settings (keys it lacks
    take :class:`DataSection`'s defaults). ``"val"`` turns random crops and flips off and picks the
    held-out part of the embedded sets."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    section = with_defaults(data)
    spec = str(section[split] if spec is None else spec)
    return _source_of(spec).build(spec, split, section)


def source_classes(data: Mapping) -> list[str] | None:
    """The class names, in id order, of the ``data`` section's ``train`` data, read without building
    the data set (a folder's class folders, the classes in a shard index); None for data without
    classes or with ``data.labels: none``."""
    section = with_defaults(data)
    spec = str(section["train"])
    source = _source_of(spec)
    if section["labels"] == "none" or source.classes is None:
        return None
    return source.classes(spec, section)
