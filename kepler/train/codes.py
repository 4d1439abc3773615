"""The prior's training data: a frozen tokenizer's index maps of the training and held-out images,
encoded once and cached in the run folder.

The tokenizer encodes the training images (one crop each: a folder's center crop, the embedded sets'
seeded crops; and its horizontal flip when ``data.flip``) and the held-out images. The maps are
cached under the run folder (``codes/<key>.pt``), keyed by the tokenizer file's SHA-256 and the data
settings, so a resumed run or a rerun reads them back and a changed data section encodes again.

A class-conditional prior (``model.num_classes > 0``) needs labelled data (``faces``; see
:func:`kepler.data.dataset_labels`) with exactly that many classes, in ``data.train`` and
``data.val``: the cache then holds each map's class too (a flip keeps its image's class).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from torch.utils.data import Dataset

from kepler.data import build_dataset, collate, dataset_labels, held_out_set
from kepler.data.images import split_key
from kepler.distributed import barrier, rank_local
from kepler.io.checkpoint import save_checkpoint
from kepler.models import VQModel

# The data keys that decide which maps are encoded.
CACHE_DATA_KEYS = ("train", "val", "size", "resize", "flip", "samples_per_epoch", "val_max_images")


@torch.no_grad()
def encode_dataset(tokenizer: VQModel, dataset: Dataset, batch_size: int, device: torch.device,
                   flips: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(maps, encoded)``: the index maps ``(N, H, W, P)`` int64 of the readable images of
    ``dataset`` (then of their horizontal flips, ``2N`` maps, when ``flips``), and ``encoded``
    ``(N,)`` int64, the items they are of (an unreadable file of a held-out set is left out, so its
    label is too)."""
    maps, flipped, encoded = [], [], []
    for start in range(0, len(dataset), batch_size):
        items = [(index, dataset[index]) for index in range(start, min(start + batch_size, len(dataset)))]
        images, _ = collate([item for _, item in items])
        if images is None:
            continue
        encoded += [index for index, (image, _) in items if image is not None]
        images = images.to(device)
        maps.append(tokenizer.encode_to_indices(images).cpu())
        if flips:
            flipped.append(tokenizer.encode_to_indices(images.flip(-1)).cpu())
    if not maps:
        raise ValueError(f"no readable image among the {len(dataset)} to encode")
    return torch.cat(maps + flipped), torch.tensor(encoded, dtype=torch.int64)


class CodeMaps(Dataset):
    """Index maps as a data set, for :func:`kepler.data.collate`: items ``(map (H, W, P) int64, ())``,
    or ``((map, label 0-d int64), ())`` with ``labels`` (``(N,)``, one per map)."""

    def __init__(self, codes: torch.Tensor, labels: torch.Tensor | None = None):
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
                         "(labelled data: faces); use model.num_classes=0 for an unconditional prior")
    if found != num_classes:
        raise ValueError(f"config key 'model.num_classes' is {num_classes}, but {where} has {found} classes")
    return labels


def cached_codes(tokenizer: VQModel, tokenizer_sha256: str, data: Mapping, num_classes: int, run_dir: Path,
                 device: torch.device, is_main: bool) -> dict:
    """The cache's entries: training and held-out index maps (``train``, ``val``) and, for a
    class-conditional prior, their classes (``train_labels``, ``val_labels``), read back or encoded
    (by rank 0; every rank calls this) and cached in ``run_dir/codes``."""
    settings = {key: data[key] for key in CACHE_DATA_KEYS}
    if num_classes:  # only then: an unconditional prior's cache keeps its key
        settings["num_classes"] = num_classes
    key = hashlib.sha256(json.dumps({"tokenizer": tokenizer_sha256, **settings}, sort_keys=True,
                                    default=str).encode()).hexdigest()[:16]
    path = run_dir / "codes" / f"{key}.pt"
    if is_main and not path.is_file():
        _encode_and_cache(tokenizer, tokenizer_sha256, data, num_classes, settings, path, device)
    barrier()
    return torch.load(path, map_location="cpu", weights_only=True)


@rank_local()
def _encode_and_cache(tokenizer: VQModel, tokenizer_sha256: str, data: Mapping, num_classes: int, settings: dict,
                      path: Path, device: torch.device) -> None:
    """Rank 0 alone: encode the training and held-out images, write them to ``path``."""
    # Each training image is encoded once (a folder's as its center crop; the embedded sets'
    # crops are seeded per image), its horizontal flip as a map of its own.
    train_set = build_dataset({**data, "random_crop": False, "flip": False}, "train")
    val_set = held_out_set(data)
    train_labels = class_labels(train_set, num_classes, f"data.train {data['train']!r}")
    val_labels = class_labels(val_set, num_classes, f"data.val {data['val']!r}")
    val_codes, val_encoded = encode_dataset(tokenizer, val_set, data["val_batch_size"], device)
    train_codes, train_encoded = encode_dataset(tokenizer, train_set, data["val_batch_size"], device, flips=data["flip"])
    codes = {"val": val_codes, "train": train_codes}
    if num_classes:
        # encode_dataset puts the flips after all the maps, in the same order.
        codes.update(train_labels=train_labels[train_encoded].repeat(2 if data["flip"] else 1),
                     val_labels=val_labels[val_encoded])
    save_checkpoint({**codes, "tokenizer_sha256": tokenizer_sha256, "data": settings}, path)
