"""The prior's training data: a frozen tokenizer's index maps of the training and held-out images,
extracted once, by every rank, into memory-mapped shards in the run folder.

What is encoded: each training image once (a folder's center crop, the embedded sets' seeded crops)
and, with ``data.flip``, its horizontal flip as a map of its own; and the held-out images (an
unreadable one is left out). A class-conditional prior (``model.num_classes > 0``) needs labelled
data (``faces``; see :func:`kepler.data.dataset_labels`) with exactly that many classes in
``data.train`` and ``data.val``; each map then keeps its image's class (a flip keeps its image's).

On disk, in ``codes/<key>/`` of the run folder, ``key`` hashed from the tokenizer file's SHA-256 and
the data settings (:func:`cache_key`), so a changed tokenizer or data section extracts again:

* each split is cut into shards of consecutive items (:func:`plan_shards`: ``train-00000``, ...,
  ``val-00000``, ...). A shard is ``<name>.npy``, the maps ``(n, H, W, P)`` of its readable items in
  the smallest unsigned dtype that holds the K codes (:func:`code_dtype`); ``<name>.flipped.npy``,
  their flips row for row (training, with ``data.flip``); ``<name>.labels.npy``, their classes
  ``(n,)`` int64 (a class-conditional prior); and ``<name>.json``, its record (items, map count, the
  files' SHA-256), written last: a shard with a record is finished. Every file is written atomically.
* ``index.json``: the tokenizer's SHA-256, the data settings, the maps' shape and dtype and every
  shard's record, written by rank 0 once every shard is: a folder with an index is complete.

Every rank encodes its share: the shards not yet finished, dealt in turn (the ``i``-th to rank
``i mod world_size``); a shard's files depend on nothing but its items, so one rank writes the same
files as two. An interrupted extraction resumes: each finished shard is verified (its record is this
shard's, its files have the recorded SHA-256) and kept, and only the others are encoded.

The prior reads the maps memory-mapped (:class:`ShardedArray`): a training split's maps are its
shards' maps, then their flips, in item order (the order of the former in-memory cache), and a map
becomes int64 only when it is drawn, so the process holds no copy of the data set.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import operator
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from kepler.data import build_dataset, collate, dataset_labels, held_out_set
from kepler.data.images import split_key
from kepler.distributed import all_gather_objects, barrier, rank_local
from kepler.io.files import file_sha256, remove_stale_temporaries, write_atomically
from kepler.models import VQModel
from kepler.models.code_sequence import CodeLayout

log = logging.getLogger("kepler")

# The data keys that decide which maps are encoded.
CACHE_DATA_KEYS = ("train", "val", "size", "resize", "flip", "samples_per_epoch", "val_max_images")
# Items a shard at most: ImageNet's 1.28M training images are 157 shards (each mapped file holds a
# file descriptor while the prior trains), and a shard of 16x16 maps holds 4 MiB of uint16 codes,
# which is what a rank keeps in memory while it encodes one.
SHARD_ITEMS = 8192
# A smaller split is still cut into this many shards, so that the ranks share it (but no shard is
# smaller than MIN_SHARD_ITEMS: a shard's files and record cost a few file operations each).
SMALL_SPLIT_SHARDS = 32
MIN_SHARD_ITEMS = 256
# A shard's files, by kind, after its name.
SHARD_FILES = {"maps": ".npy", "flipped": ".flipped.npy", "labels": ".labels.npy"}


def code_dtype(codebook_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds the codes ``[0, codebook_size)``: uint8 up to 256
    codes, uint16 up to 65536, else uint32."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if codebook_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"a codebook of {codebook_size} codes does not fit uint32 (at most 2**32 codes)")


def cache_settings(data: Mapping, num_classes: int) -> dict:
    """The settings that decide the maps: the data keys :data:`CACHE_DATA_KEYS`, and for a
    class-conditional prior ``num_classes``, ``labels`` and ``classes`` (so relabelled data are
    extracted again; an unconditional prior's key is the same as before labels)."""
    settings = {key: data[key] for key in CACHE_DATA_KEYS}
    if num_classes:
        settings["num_classes"] = num_classes
        classes = data.get("classes")
        settings.update(labels=data.get("labels"), classes=None if classes is None else [str(c) for c in classes])
    return settings


def cache_key(tokenizer_sha256: str, settings: Mapping) -> str:
    """The name of the code cache of a tokenizer file (its SHA-256) and :func:`cache_settings`."""
    return hashlib.sha256(json.dumps({"tokenizer": tokenizer_sha256, **settings}, sort_keys=True,
                                     default=str).encode()).hexdigest()[:16]


class Shard(NamedTuple):
    """Items ``[start, stop)`` of a split."""

    split: str
    number: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"{self.split}-{self.number:05d}"


def plan_shards(split: str, items: int, shard_items: int = SHARD_ITEMS) -> list[Shard]:
    """The shards of a split of ``items`` items: consecutive items, as many in each but the last (the
    rest), at most ``shard_items``, and fewer where that cuts the split into
    :data:`SMALL_SPLIT_SHARDS` shards of at least :data:`MIN_SHARD_ITEMS`. They depend on the split
    alone, not on the number of ranks: any number of ranks writes, and resumes, the same shards."""
    size = min(shard_items, max(MIN_SHARD_ITEMS, -(-items // SMALL_SPLIT_SHARDS)))
    return [Shard(split, number, start, min(start + size, items)) for number, start in enumerate(range(0, items, size))]


@torch.no_grad()
def encoded_batches(tokenizer: VQModel, dataset: Dataset, batch_size: int, device: torch.device,
                    flips: bool = False) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor | None]]:
    """``(items, maps, flipped)`` for each ``batch_size`` items of ``dataset`` in order: the readable
    ones' positions in ``dataset``, their index maps ``(n, H, W, P)`` int64 on the CPU, and those of
    their horizontal flips (None without ``flips``); a batch of unreadable items only is left out."""
    for start in range(0, len(dataset), batch_size):
        items = [(index, dataset[index]) for index in range(start, min(start + batch_size, len(dataset)))]
        images, _ = collate([item for _, item in items])
        if images is None:
            continue
        images = images.to(device)
        flipped = tokenizer.encode_to_indices(images.flip(-1)).cpu() if flips else None
        yield ([index for index, (image, _) in items if image is not None],
               tokenizer.encode_to_indices(images).cpu(), flipped)


def encode_dataset(tokenizer: VQModel, dataset: Dataset, batch_size: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(maps, encoded)``: the index maps ``(N, H, W, P)`` int64 of the readable images of
    ``dataset``, and ``encoded`` ``(N,)`` int64, the items they are of (an unreadable file of a
    held-out set is left out, so its label is too)."""
    maps, encoded = [], []
    for items, batch_maps, _ in encoded_batches(tokenizer, dataset, batch_size, device):
        encoded += items
        maps.append(batch_maps)
    if not maps:
        raise ValueError(f"no readable image among the {len(dataset)} to encode")
    return torch.cat(maps), torch.tensor(encoded, dtype=torch.int64)


class ShardedArray:
    """The rows of ``.npy`` files, memory-mapped (``numpy.load(path, mmap_mode="r")``) and read as one
    array: ``len``, and ``[i]`` or ``[start:stop]`` as an int64 tensor, a copy of those rows only.

    A path may repeat (a flipped split's labels): each file is mapped once. Pickled, it keeps its
    paths only, so a DataLoader worker that is spawned maps the files again instead of receiving a
    copy of them.
    """

    def __init__(self, paths: Sequence[str | Path]):
        self.paths = [str(path) for path in paths]
        self._map()

    def _map(self) -> None:
        mapped = {}
        for path in dict.fromkeys(self.paths):
            try:
                mapped[path] = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as exc:  # missing, cut short, not a .npy file
                raise ValueError(f"{path} cannot be mapped: {exc}") from None
        self.shards = [mapped[path] for path in self.paths]
        self.ends = np.cumsum([len(shard) for shard in self.shards], dtype=np.int64).tolist()

    def __getstate__(self) -> dict:
        return {"paths": self.paths}

    def __setstate__(self, state: dict) -> None:
        self.paths = state["paths"]
        self._map()

    def __len__(self) -> int:
        return self.ends[-1] if self.ends else 0

    def __getitem__(self, key: int | slice) -> torch.Tensor:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                raise ValueError(f"a ShardedArray is sliced with step 1, got {step}")
            pieces = [shard[max(start - end + len(shard), 0):stop - end + len(shard)]
                      for shard, end in zip(self.shards, self.ends) if start < end and end - len(shard) < stop]
            rows = np.concatenate(pieces) if pieces else self.shards[0][:0]
            return torch.from_numpy(np.array(rows, dtype=np.int64))
        index = operator.index(key)
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} rows")
        index %= len(self)
        shard = bisect.bisect_right(self.ends, index)
        row = index - self.ends[shard] + len(self.shards[shard])
        return torch.from_numpy(np.array(self.shards[shard][row], dtype=np.int64))


class CodeMaps(Dataset):
    """Index maps as a data set, for :func:`kepler.data.collate`: items ``(map (H, W, P) int64, ())``,
    or ``((map, label 0-d int64), ())`` with ``labels`` (one per map). ``codes`` and ``labels`` are
    tensors or :class:`ShardedArray` (a map is then read from its file when drawn)."""

    def __init__(self, codes: torch.Tensor | ShardedArray, labels: torch.Tensor | ShardedArray | None = None):
        self.codes = codes
        self.labels = labels

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, key):
        index, _ = split_key(key)  # SeededSampler's (index, seed): maps take no augmentation
        if self.labels is None:
            return self.codes[index], ()
        return (self.codes[index], self.labels[index]), ()


def class_labels(dataset: Dataset, num_classes: int, where: str) -> torch.Tensor | None:
    """The labels ``(N,)`` int64 of ``dataset`` (the data named by ``where``, e.g. ``"data.train
    'faces'"``) for a prior of ``num_classes`` classes; None for an unconditional prior (0). A
    ValueError naming both counts when the data set has no labels or another number of classes."""
    if num_classes == 0:
        return None
    found, labels = dataset_labels(dataset)
    if found == 0:
        raise ValueError(f"config key 'model.num_classes' is {num_classes}, but {where} has no class labels "
                         "(labelled data: faces, a folder of class folders or a list file of path<TAB>label lines); use "
                         "model.num_classes=0 for an unconditional prior")
    if found != num_classes:
        raise ValueError(f"config key 'model.num_classes' is {num_classes}, but {where} has {found} classes")
    return labels


@dataclass
class StoredCodes:
    """A finished extraction (:func:`open_stored_codes`): the training and held-out maps
    ``(N, H, W, P)`` and, for a class-conditional prior, their classes ``(N,)``, memory-mapped; and
    its ``index.json``."""

    folder: Path
    index: dict
    train: ShardedArray
    val: ShardedArray
    train_labels: ShardedArray | None
    val_labels: ShardedArray | None


class IncompleteExtraction(ValueError):
    """A code cache folder without a finished extraction."""


def open_stored_codes(folder: str | Path) -> StoredCodes:
    """The codes of the finished extraction in ``folder``, memory-mapped. IncompleteExtraction when
    it has none: no ``index.json``, or a file it lists is missing or not of the shape and dtype it
    records (read from the files' headers; their contents are read when used)."""
    folder = Path(folder)
    if not (folder / "index.json").is_file():
        raise IncompleteExtraction(f"{folder} has no index.json")
    index = json.loads((folder / "index.json").read_text())
    map_shape, dtype = tuple(index["map_shape"]), np.dtype(index["dtype"])
    arrays = {}
    for split, entry in index["splits"].items():
        names, rows = [shard["name"] for shard in entry["shards"]], [shard["maps"] for shard in entry["shards"]]
        maps = [folder / (name + SHARD_FILES["maps"]) for name in names]
        labels = [folder / (name + SHARD_FILES["labels"]) for name in names]
        if entry["flipped"]:
            maps += [folder / (name + SHARD_FILES["flipped"]) for name in names]
            labels *= 2  # a flip keeps its image's class
        arrays[split] = _mapped(maps, rows * (1 + entry["flipped"]), map_shape, dtype)
        arrays[f"{split}_labels"] = (_mapped(labels, rows * (1 + entry["flipped"]), (), np.dtype(np.int64))
                                     if entry["labelled"] else None)
    return StoredCodes(folder=folder, index=index, **arrays)


def _mapped(paths: list[Path], rows: list[int], row_shape: tuple[int, ...], dtype: np.dtype) -> ShardedArray:
    """``paths`` as a :class:`ShardedArray`, checked to hold ``rows[i]`` rows of ``row_shape`` and
    ``dtype`` in ``paths[i]`` (IncompleteExtraction otherwise)."""
    try:
        array = ShardedArray(paths)
    except ValueError as exc:
        raise IncompleteExtraction(str(exc)) from None
    for path, shard, count in zip(paths, array.shards, rows):
        if shard.shape != (count, *row_shape) or shard.dtype != dtype:
            raise IncompleteExtraction(f"{path} holds {shard.dtype} {shard.shape}, the index records "
                                       f"{dtype} {(count, *row_shape)}")
    return array


def extract_codes(tokenizer: VQModel, tokenizer_sha256: str, data: Mapping, num_classes: int, layout: CodeLayout,
                  run_dir: str | Path, device: torch.device, rank: int = 0, world_size: int = 1,
                  shard_items: int = SHARD_ITEMS) -> StoredCodes:
    """The training and held-out maps of ``data`` (and their classes for a prior of ``num_classes``)
    encoded by ``tokenizer`` (the file of SHA-256 ``tokenizer_sha256``, maps of ``layout``) into
    ``run_dir/codes/<key>`` (see the module docstring), or read back when already there.

    Every rank of ``world_size`` calls this: each encodes its share of the shards not yet finished
    (:func:`plan_shards` of at most ``shard_items``), on ``device``, ``data.val_batch_size`` images
    at a time. ValueError when the data's classes are not
    ``num_classes`` (:func:`class_labels`) or a split has no readable image.
    """
    settings = cache_settings(data, num_classes)
    folder = Path(run_dir) / "codes" / cache_key(tokenizer_sha256, settings)
    try:
        stored = open_stored_codes(folder)
    except IncompleteExtraction:
        stored = None
    # Every rank extracts, or none: the collectives below need them all.
    if not all(all_gather_objects(stored is not None)):
        _extract(tokenizer, tokenizer_sha256, data, num_classes, layout, settings, folder, device, rank,
                 world_size, shard_items)
        stored = open_stored_codes(folder)
    for split in ("train", "val"):
        if len(getattr(stored, split)) == 0:
            raise ValueError(f"no readable image among the {stored.index['splits'][split]['items']} "
                             f"{split} images to encode")
    return stored


def _extract(tokenizer: VQModel, tokenizer_sha256: str, data: Mapping, num_classes: int, layout: CodeLayout,
             settings: dict, folder: Path, device: torch.device, rank: int, world_size: int,
             shard_items: int) -> None:
    """Encode the shards of ``folder`` that are not finished (this rank: its share of them), then
    rank 0 writes the index."""
    # The training crops without augmentation (a folder's center crop, the embedded sets' seeded
    # crops); their flips are encoded apart, as maps of their own.
    datasets = {"train": build_dataset({**data, "random_crop": False, "flip": False}, "train"),
                "val": held_out_set(data)}
    labels = {split: class_labels(dataset, num_classes, f"data.{split} {data[split]!r}")
              for split, dataset in datasets.items()}
    flipped = {"train": bool(data["flip"]), "val": False}
    kinds = {split: ["maps"] + ["flipped"] * flipped[split] + ["labels"] * (labels[split] is not None)
             for split in datasets}
    shards = [shard for split, dataset in datasets.items() for shard in plan_shards(split, len(dataset), shard_items)]
    if rank == 0:  # before any rank writes: the gather below waits for it
        remove_stale_temporaries(folder)
    # Each rank verifies its turn of the shards, and every rank learns which are finished.
    verified = [shard.name for shard in shards[rank::world_size] if _finished(folder, shard, kinds[shard.split])]
    finished = set().union(*all_gather_objects(verified))
    missing = [shard for shard in shards if shard.name not in finished]
    if rank == 0:
        log.info("codes: encoding %d of %d shards into %s (%d finished kept)", len(missing), len(shards), folder,
                 len(shards) - len(missing))
    dtype = code_dtype(layout.codebook_size)
    map_shape = (layout.height, layout.width, layout.tokens_per_position)
    with rank_local():  # the ranks encode different numbers of batches: no collective may run
        for shard in missing[rank::world_size]:
            _write_shard(folder, shard, datasets[shard.split], labels[shard.split], flipped[shard.split],
                         tokenizer, data["val_batch_size"], device, dtype, map_shape)
    barrier()
    if rank == 0:
        records = {split: [] for split in datasets}
        for shard in shards:
            records[shard.split].append(json.loads((folder / f"{shard.name}.json").read_text()))
        index = {
            "tokenizer_sha256": tokenizer_sha256,
            "data": settings,
            "map_shape": list(map_shape),
            "codebook_size": layout.codebook_size,
            "dtype": dtype.name,
            "splits": {split: {"items": len(datasets[split]), "flipped": flipped[split],
                               "labelled": labels[split] is not None, "shards": records[split]}
                       for split in datasets},
        }
        write_atomically(folder / "index.json", lambda f: f.write(json.dumps(index, indent=1, default=str).encode()))
    barrier()


def _finished(folder: Path, shard: Shard, kinds: list[str]) -> bool:
    """Whether ``shard`` has a record of its own items and files ``kinds`` whose SHA-256 it matches."""
    try:
        record = json.loads((folder / f"{shard.name}.json").read_text())
        return (record["items"] == [shard.start, shard.stop] and sorted(record["sha256"]) == sorted(kinds)
                and all(file_sha256(folder / (shard.name + SHARD_FILES[kind])) == record["sha256"][kind]
                        for kind in kinds))
    except (OSError, ValueError, KeyError, TypeError):  # missing, torn or not a record of this format
        return False


def _write_shard(folder: Path, shard: Shard, dataset: Dataset, labels: torch.Tensor | None, flips: bool,
                 tokenizer: VQModel, batch_size: int, device: torch.device, dtype: np.dtype,
                 map_shape: tuple[int, int, int]) -> None:
    """Encode the items of ``shard`` (maps of ``map_shape``, stored as ``dtype``) and write its files,
    then its record."""
    maps, flipped, encoded = [], [], []
    items = Subset(dataset, range(shard.start, shard.stop))
    for positions, batch_maps, batch_flipped in encoded_batches(tokenizer, items, batch_size, device, flips):
        encoded += [shard.start + position for position in positions]
        maps.append(batch_maps.numpy().astype(dtype))
        if flips:
            flipped.append(batch_flipped.numpy().astype(dtype))
    arrays = {"maps": maps, "flipped": flipped} if flips else {"maps": maps}
    arrays = {kind: np.concatenate(parts) if parts else np.empty((0, *map_shape), dtype)
              for kind, parts in arrays.items()}
    if labels is not None:
        arrays["labels"] = labels[encoded].numpy()
    record = {"name": shard.name, "items": [shard.start, shard.stop], "maps": len(encoded), "sha256": {}}
    for kind, array in arrays.items():
        path = write_atomically(folder / (shard.name + SHARD_FILES[kind]), lambda f: np.save(f, array))
        record["sha256"][kind] = file_sha256(path)
    write_atomically(folder / f"{shard.name}.json", lambda f: f.write(json.dumps(record).encode()))
