"""Data sets of image files (the ``folder`` and ``list`` sources): :class:`ImagePaths`, the transform
their sources share, and the per-sample seed keys every source takes."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from kepler.data.transforms import ImageTransform

log = logging.getLogger("kepler")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# What PIL raises for a missing, truncated, undecodable or absurdly large file.
UNREADABLE_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

SampleKey = int | tuple[int, Sequence[int]]


def split_key(key: SampleKey) -> tuple[int, np.random.Generator | None]:
    """A dataset key is an index, or ``(index, seed)`` from :class:`kepler.data.SeededSampler`."""
    if isinstance(key, tuple):
        index, seed = key
        return int(index), np.random.default_rng(list(seed))
    return int(key), None


def file_dataset(make: Callable[..., ImagePaths], spec: str, split: str, data: Mapping) -> ImagePaths:
    """``make(spec, transform, substitute=...)`` (:meth:`ImagePaths.from_folder` or ``from_list``) for
    ``split`` under the ``data`` section, checked to hold a readable image: random crops and flips (as
    the section says) and substitutes for unreadable files in training; centre crops, and unreadable
    files left out, in validation."""
    train = split == "train"
    transform = ImageTransform(data["size"], data["resize"], random_crop=data["random_crop"] and train,
                               flip=data["flip"] and train)
    dataset = make(spec, transform, substitute=train)
    dataset.check_readable()
    return dataset


class ImagePaths(Dataset):
    """Images at ``paths``; item ``key`` -> ``(image (3, S, S) float32 in [-1, 1], skipped paths)``.

    An unreadable or corrupt file is skipped with a warning naming it, and its path is returned with
    the item. With ``substitute`` (training) the next readable image takes its place, so a batch
    keeps its size and the trainer counts the skipped files; without it (held-out sets) the item is
    ``(None, (path,))``: :func:`kepler.data.collate` drops it, so evaluation counts each readable
    image once and no other.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], transform: ImageTransform, source: str = "paths",
                 substitute: bool = True):
        if len(paths) == 0:
            raise ValueError(f"empty dataset: no images in {source}")
        self.paths = [str(p) for p in paths]
        self.transform = transform
        self.source = source
        self.substitute = substitute

    @classmethod
    def from_folder(cls, root: str | os.PathLike, transform: ImageTransform, substitute: bool = True) -> ImagePaths:
        """Every .jpg/.jpeg/.png/.webp file under ``root``, recursively, in sorted order."""
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"image folder {root} does not exist or is not a folder")
        paths = sorted(
            str(p) for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        if not paths:
            raise ValueError(f"empty dataset: no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
        return cls(paths, transform, source=str(root), substitute=substitute)

    @classmethod
    def from_list(cls, list_file: str | os.PathLike, transform: ImageTransform, substitute: bool = True) -> ImagePaths:
        """One image path per line (blank lines and ``#`` comments ignored); relative paths are
        relative to the list file's folder (taming's ``training_images_list_file``)."""
        list_file = Path(list_file)
        base = list_file.parent
        paths = []
        for line in list_file.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                p = Path(line)
                paths.append(p if p.is_absolute() else base / p)
        if not paths:
            raise ValueError(f"empty dataset: list file {list_file} names no images")
        return cls(paths, transform, source=str(list_file), substitute=substitute)

    def __len__(self) -> int:
        return len(self.paths)

    def check_readable(self) -> None:
        """Raise ValueError unless at least one file decodes (usually the first, so this is cheap):
        a data set of only unreadable files would otherwise fail inside a DataLoader worker."""
        first_error = None
        for path in self.paths:
            try:
                with Image.open(path) as image:
                    image.load()
                return
            except UNREADABLE_IMAGE_ERRORS as exc:
                first_error = first_error or f"{path}: {exc or type(exc).__name__}"
        raise ValueError(f"no readable image in {self.source}: all {len(self.paths)} files failed to load "
                         f"(first: {first_error})")

    def __getitem__(self, key: SampleKey) -> tuple[torch.Tensor | None, tuple[str, ...]]:
        index, rng = split_key(key)
        skipped: list[str] = []
        for attempt in range(len(self.paths) if self.substitute else 1):
            path = self.paths[(index + attempt) % len(self.paths)]
            try:
                with Image.open(path) as image:
                    image.load()
                    return self.transform(image, rng), tuple(skipped)
            except UNREADABLE_IMAGE_ERRORS as exc:
                warnings.warn(f"skipping unreadable image {path}: {exc}", stacklevel=2)
                skipped.append(path)
        if not self.substitute:
            return None, tuple(skipped)
        raise RuntimeError(f"no readable image in {self.source}: all {len(self.paths)} files failed to load")
