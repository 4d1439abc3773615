"""The data source ``shards``: a folder of webdataset tar shards written by ``kepler data shard``
(:func:`kepler.data.shard_writer.write_shards`), streamed through the ``webdataset`` library in
training.

A shard folder holds ``shard-000000.tar``, ... and ``index.json``: the format, the sample count, each
shard's file and count, the class names in id order (or null), the settings the shards were written
with and the unreadable source files left out. A sample is ``<key>.jpg`` (or ``.png``, ``.webp``)
and, when labelled, ``<key>.cls`` (its class id in ASCII); the key is the item's index in the source,
9 digits.

Training iterates :class:`ImageShards` (the trainer's :class:`kepler.data.EpochLoader` sets the
position). Every epoch, with ``S`` = processes x max(1, ``data.num_workers``) streams:

1. the shards are put in a random order drawn from (``seed``, ``epoch``) and dealt to the ``S``
   streams in turn; a process's streams are its DataLoader workers (a process without workers is
   one stream), which take turns batch by batch;
2. each stream reads its shards in that order and mixes their samples through webdataset's shuffle
   buffer of ``data.shuffle_buffer`` samples, seeded by (``seed``, ``epoch``, stream);
3. every stream yields the same number of samples, the least any stream can be dealt
   (:meth:`ImageShards.samples_per_stream`), so every process has the same number of batches: a
   sample is seen at most once an epoch, and exactly once when the shards hold equal counts and their
   number is a multiple of ``S``; otherwise the longer streams' excess is left out, another part of
   the data each epoch;
4. a sample's random crop and flip are drawn from (``seed``, ``epoch``, its key), as a folder's are
   from :class:`~kepler.data.SeededSampler`'s seeds.

What resumes exactly: the streams are a function of the seed, the epoch, the shards and the layout
(processes, ``data.num_workers``, ``data.batch_size``), so the checkpoint's data position (epoch,
batch) is the stream position. ``--resume`` with the same shards and layout rebuilds the epoch's
streams, and each skips the samples it had served: read from the tar files again but not decoded,
so that the shuffle buffer refills exactly as it was. The resumed run sees the same batches, bit for
bit, as a run never stopped; the price is that re-read, up to one epoch's share of the shards per
stream. Resumed with another layout or other shards, a run continues at the same batch of the epoch,
but the rest of that epoch is the new layout's (some of its samples seen twice, others not); the
epochs after it are whole again.

Held-out sets and code extraction read shards by index (``shards[i]``, in shard order), each tar's
member offsets read once.
"""

from __future__ import annotations

import copy
import functools
import io
import json
import random
import tarfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from kepler.data.images import UNREADABLE_IMAGE_ERRORS, SampleKey, split_key
from kepler.data.sources import register_source
from kepler.data.transforms import ImageTransform

INDEX_FILE = "index.json"
FORMAT = "kepler-shards"
VERSION = 1
IMAGE_EXTENSIONS = ("jpg", "png", "webp")  # what kepler data shard writes
LABEL_EXTENSION = "cls"


def read_index(root: str | Path) -> dict:
    """The ``index.json`` of the shard folder ``root``; a ValueError naming the folder when it has
    none or another file by that name."""
    path = Path(root) / INDEX_FILE
    if not path.is_file():
        raise ValueError(f"shard folder {root} has no {INDEX_FILE}: shards are written with kepler data shard, "
                         "which writes the index last (a folder without one is an interrupted write)")
    try:
        index = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path} is not a shard index: {exc}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ValueError(f"{path} is not a shard index of kepler data shard (format {FORMAT!r}, version {VERSION})")
    return index


@functools.lru_cache(maxsize=8)
def tar_members(path: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """The samples of the tar file at ``path`` in order: ``(key, {extension: (offset, size)})``, the
    offsets of the members' data in the file (tar headers only are read)."""
    samples: list[tuple[str, dict[str, tuple[int, int]]]] = []
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            key, _, extension = member.name.partition(".")
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][extension] = (member.offset_data, member.size)
    return samples


def _read(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


class ImageShards(IterableDataset):
    """The shards in ``root`` (see the module docstring): iterated, the training stream of the
    position :meth:`at` set; indexed, item ``key`` -> ``(image (3, S, S) float32 in [-1, 1], ())``,
    or ``(None, (name,))`` for an image that does not decode (left out by
    :func:`kepler.data.collate`).

    Labelled (``classes`` from the index, ``labels`` read from the shards when first asked for) unless
    ``use_labels`` is False or the shards were written without classes.
    """

    def __init__(self, root: str | Path, transform: ImageTransform, shuffle_buffer: int = 1000,
                 use_labels: bool = True):
        self.root = Path(root)
        index = read_index(self.root)
        self.files = [self.root / shard["file"] for shard in index["shards"]]
        missing = [f.name for f in self.files if not f.is_file()]
        if missing:
            raise ValueError(f"shard folder {self.root}: shards listed in {INDEX_FILE} are missing: "
                             f"{', '.join(missing)}")
        self.counts = [int(shard["count"]) for shard in index["shards"]]
        self.starts = np.cumsum([0, *self.counts])  # each shard's first index
        self.classes = index["classes"] if use_labels else None
        self.transform = transform
        self.shuffle_buffer = shuffle_buffer
        # The stream's position (set on a copy by at()).
        self.seed, self.epoch, self.rank, self.world_size, self.batch_size, self.start_batch = 0, 0, 0, 1, 1, 0

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def num_classes(self) -> int:
        return 0 if self.classes is None else len(self.classes)

    @functools.cached_property
    def labels(self) -> torch.Tensor | None:
        """Every item's class id, ``(len,)`` int64, read from the shards' ``.cls`` members."""
        if self.classes is None:
            return None
        ids = [int(_read(file, *members[LABEL_EXTENSION]))
               for file in self.files for _, members in tar_members(str(file))]
        return torch.tensor(ids, dtype=torch.int64)

    # ------------------------------------------------------------------ random access

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor | None, tuple[str, ...]]:
        index, rng = split_key(key)
        shard = int(np.searchsorted(self.starts, index, side="right")) - 1
        file = self.files[shard]
        name, members = tar_members(str(file))[index - int(self.starts[shard])]
        extension = next(e for e in IMAGE_EXTENSIONS if e in members)
        return self._decode(_read(file, *members[extension]), f"{file}:{name}", rng)

    def _decode(self, data: bytes, name: str, rng: np.random.Generator | None):
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                return self.transform(image, rng), ()
        except UNREADABLE_IMAGE_ERRORS as exc:
            warnings.warn(f"skipping unreadable image {name}: {exc}", stacklevel=2)
            return None, (name,)

    # ------------------------------------------------------------------ the training stream

    def samples_per_stream(self, streams: int) -> int:
        """What each of ``streams`` streams yields an epoch: the sum of the ``len(shards) // streams``
        smallest shard counts, the least a stream can be dealt in any epoch."""
        if len(self.files) < streams:
            raise ValueError(f"shards {self.root}: {len(self.files)} shards for {streams} streams (processes x "
                             "data.num_workers), and each stream reads whole shards: write smaller shards (kepler "
                             "data shard --shard-size) or use fewer workers")
        return sum(sorted(self.counts)[: len(self.files) // streams])

    def at(self, *, seed: int, epoch: int, rank: int, world_size: int, batch_size: int,
           start_batch: int = 0) -> ImageShards:
        """A copy whose iteration is process ``rank``'s (of ``world_size``) stream of ``epoch`` from its
        batch ``start_batch`` on, in batches of ``batch_size`` (how :class:`kepler.data.EpochLoader`
        resumes)."""
        positioned = copy.copy(self)
        positioned.seed, positioned.epoch, positioned.rank = seed, epoch, rank
        positioned.world_size, positioned.batch_size, positioned.start_batch = world_size, batch_size, start_batch
        return positioned

    def __iter__(self) -> Iterator[tuple[torch.Tensor | None, tuple[str, ...]]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader takes a batch from each worker in turn, and a loader restarted at batch b asks
        # its worker 0 first: worker w goes on with the stream of the worker that served batch b + w,
        # past the batches that one had served.
        turn = (self.start_batch + worker) % workers
        served = (self.start_batch - turn + workers - 1) // workers
        stream, streams = self.rank * workers + turn, self.world_size * workers
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.files))
        shuffle_seed = int(np.random.SeedSequence([self.seed, self.epoch, stream]).generate_state(1)[0])
        pipeline = wds.DataPipeline(
            wds.SimpleShardList([str(self.files[i]) for i in order[stream::streams]]),
            wds.tarfile_to_samples(),
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=random.Random(shuffle_seed)),
            # Skipped before decoding: a resumed stream re-reads what it served, and decodes none of it.
            wds.slice(served * self.batch_size, self.samples_per_stream(streams)),
            wds.map(self._decode_sample),
        )
        return iter(pipeline)

    def _decode_sample(self, sample: dict) -> tuple[torch.Tensor | None, tuple[str, ...]]:
        key = sample["__key__"]
        extension = next(e for e in IMAGE_EXTENSIONS if e in sample)
        rng = np.random.default_rng([self.seed, self.epoch, int(key)])
        return self._decode(sample[extension], f"{sample['__url__']}:{key}", rng)


def _is_shard_folder(spec: str) -> bool:
    folder = Path(spec)
    return folder.is_dir() and ((folder / INDEX_FILE).is_file() or any(folder.glob("*.tar")))


@register_source("shards", "a folder of webdataset shards (kepler data shard)", matches=_is_shard_folder,
                 classes=lambda spec, data: read_index(spec)["classes"])
def build_shards(spec: str, split: str, data) -> ImageShards:
    train = split == "train"
    transform = ImageTransform(data["size"], data["resize"], random_crop=data["random_crop"] and train,
                               flip=data["flip"] and train)
    shards = ImageShards(spec, transform, data["shuffle_buffer"], use_labels=data["labels"] == "auto")
    pinned = data["classes"]
    if shards.classes is not None and pinned is not None and list(pinned) != shards.classes:
        raise ValueError(f"shards {spec} were written with other classes ({shards.num_classes}) than data.classes "
                         f"({len(pinned)}, the ids a run keeps), and their class ids are fixed: write them again "
                         "from data with those classes")
    return shards
