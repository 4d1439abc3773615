"""Data sets of image files (the ``folder`` and ``list`` sources): :class:`ImagePaths`, the transform
their sources share, and the per-sample seed keys every source takes.

Class labels come from the files' layout, with ``data.labels: auto`` (``none`` reads the images alone):

* a folder in ImageNet's layout, one subfolder per class and no image directly in it
  (:func:`class_folders`): class ids are the sorted folder names' positions, as torchvision's
  ``ImageFolder`` numbers them, or their positions in ``data.classes`` when it is set (a run's
  recorded classes, :mod:`kepler.data.classes`): a class folder not among them is left out, with a
  warning, so that no id shifts;
* a list file of ``path<TAB>label`` lines, the label a class id (an integer >= 0): ``max + 1``
  classes named ``"0"``, ``"1"``, ..., or the classes of ``data.classes`` (a larger id is left out,
  with a warning).
"""

from __future__ import annotations

import logging
import os
import re
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

CLASS_ID = re.compile(r"\d+")


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _images_under(folder: Path) -> list[str]:
    """Every .jpg/.jpeg/.png/.webp file under ``folder``, recursively, sorted."""
    return sorted(str(p) for p in folder.rglob("*") if _is_image(p) and p.is_file())


def class_folders(root: str | os.PathLike) -> list[str] | None:
    """The class names of a folder in ImageNet's layout (subfolders, no image directly in it): its
    subfolders' names, sorted (torchvision's ``ImageFolder`` ids); None for any other folder."""
    entries = list(os.scandir(root))
    if any(entry.is_file() and _is_image(Path(entry.name)) for entry in entries):
        return None
    return sorted(entry.name for entry in entries if entry.is_dir()) or None


def read_list_file(list_file: str | os.PathLike, use_labels: bool = True) -> tuple[list[Path], list[int] | None]:
    """The image paths of a list file (one a line; blank lines and ``#`` comments ignored; relative
    paths are relative to the list file's folder, as taming's ``training_images_list_file``) and,
    with ``use_labels``, their class ids when every line is ``path<TAB>label`` (else None)."""
    list_file = Path(list_file)
    paths, ids = [], []
    first_labelled = first_unlabelled = None
    for number, line in enumerate(list_file.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path, tab, label = line.rpartition("\t") if "\t" in line else (line, "", "")
        if use_labels and tab:
            if not CLASS_ID.fullmatch(label.strip()):
                raise ValueError(f"list file {list_file} line {number}: label {label!r} is not a class id "
                                 "(an integer >= 0)")
            ids.append(int(label))
            first_labelled = first_labelled or number
        else:
            first_unlabelled = first_unlabelled or number
        if first_labelled and first_unlabelled:
            raise ValueError(f"list file {list_file}: line {first_labelled} has a label and line {first_unlabelled} "
                             "has none: give every line a label (path<TAB>label) or none")
        p = Path(path.strip())
        paths.append(p if p.is_absolute() else list_file.parent / p)
    return paths, (ids if first_labelled else None)


def list_file_classes(list_file: str | os.PathLike) -> list[str] | None:
    """The classes of a list file with labels: ``"0"``, ``"1"``, ... up to its largest id."""
    _, ids = read_list_file(list_file)
    return None if not ids else [str(i) for i in range(max(ids) + 1)]


def split_key(key: SampleKey) -> tuple[int, np.random.Generator | None]:
    """A dataset key is an index, or ``(index, seed)`` from :class:`kepler.data.SeededSampler`."""
    if isinstance(key, tuple):
        index, seed = key
        return int(index), np.random.default_rng(list(seed))
    return int(key), None


def file_dataset(make: Callable[..., ImagePaths], spec: str, split: str, data: Mapping) -> ImagePaths:
    """``make(spec, transform, substitute=..., use_labels=..., classes=...)`` (:meth:`ImagePaths.from_folder`
    or ``from_list``) for ``split`` under the ``data`` section, checked to hold a readable image: random
    crops and flips (as the section says) and substitutes for unreadable files in training; centre
    crops, and unreadable files left out, in validation; labelled as ``data.labels`` and
    ``data.classes`` say."""
    train = split == "train"
    transform = ImageTransform(data["size"], data["resize"], random_crop=data["random_crop"] and train,
                               flip=data["flip"] and train)
    dataset = make(spec, transform, substitute=train, use_labels=data["labels"] == "auto", classes=data["classes"])
    dataset.check_readable()
    return dataset


class ImagePaths(Dataset):
    """Images at ``paths``; item ``key`` -> ``(image (3, S, S) float32 in [-1, 1], skipped paths)``.

    An unreadable or corrupt file is skipped with a warning naming it, and its path is returned with
    the item. With ``substitute`` (training) the next readable image takes its place, so a batch
    keeps its size and the trainer counts the skipped files; without it (held-out sets) the item is
    ``(None, (path,))``: :func:`kepler.data.collate` drops it, so evaluation counts each readable
    image once and no other.

    Labelled when ``labels`` (``(len,)`` int64 class ids) and ``classes`` (the class names in id
    order) are given: see :func:`kepler.data.dataset_labels` and the module docstring.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], transform: ImageTransform, source: str = "paths",
                 substitute: bool = True, labels: torch.Tensor | None = None, classes: Sequence[str] | None = None):
        if len(paths) == 0:
            raise ValueError(f"empty dataset: no images in {source}")
        self.paths = [str(p) for p in paths]
        self.transform = transform
        self.source = source
        self.substitute = substitute
        self.labels = labels
        self.classes = None if labels is None else list(classes)

    @property
    def num_classes(self) -> int:
        return 0 if self.classes is None else len(self.classes)

    @classmethod
    def from_folder(cls, root: str | os.PathLike, transform: ImageTransform, substitute: bool = True,
                    use_labels: bool = True, classes: Sequence[str] | None = None) -> ImagePaths:
        """Every .jpg/.jpeg/.png/.webp file under ``root``, recursively, in sorted order; with
        ``use_labels``, labelled by their class folders when ``root`` has ImageNet's layout
        (``classes``: the class names whose ids to keep; default: the sorted class folders)."""
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"image folder {root} does not exist or is not a folder")
        folders = class_folders(root) if use_labels else None
        if folders is not None:
            return cls._from_class_folders(root, folders, transform, substitute, classes)
        paths = _images_under(root)
        if not paths:
            raise ValueError(f"empty dataset: no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")
        return cls(paths, transform, source=str(root), substitute=substitute)

    @classmethod
    def _from_class_folders(cls, root: Path, folders: list[str], transform: ImageTransform, substitute: bool,
                            classes: Sequence[str] | None) -> ImagePaths:
        names = list(folders if classes is None else classes)
        ids = {name: i for i, name in enumerate(names)}
        left_out = [name for name in folders if name not in ids]
        if left_out:
            count = sum(len(_images_under(root / name)) for name in left_out)
            warnings.warn(f"{root}: class folders not among the {len(names)} classes of data.classes (the ids a "
                          f"run keeps), left out with their {count} images: {', '.join(left_out)}", stacklevel=2)
        paths, labels = [], []
        for name in folders:
            if name not in ids:
                continue
            found = _images_under(root / name)
            if not found:
                raise ValueError(f"empty class folder {root / name}: no images ({', '.join(IMAGE_EXTENSIONS)}) in "
                                 f"it; remove it, or set data.labels=none to read {root} as unlabelled images")
            paths += found
            labels += [ids[name]] * len(found)
        if not paths:
            raise ValueError(f"empty dataset: none of the class folders of {root} is among data.classes")
        return cls(paths, transform, source=str(root), substitute=substitute,
                   labels=torch.tensor(labels, dtype=torch.int64), classes=names)

    @classmethod
    def from_list(cls, list_file: str | os.PathLike, transform: ImageTransform, substitute: bool = True,
                  use_labels: bool = True, classes: Sequence[str] | None = None) -> ImagePaths:
        """The images a list file names (:func:`read_list_file`), labelled with ``use_labels`` when its
        lines carry labels: ``max id + 1`` classes, or ``classes`` (an id past them is left out, with
        a warning)."""
        paths, ids = read_list_file(list_file, use_labels)
        if not paths:
            raise ValueError(f"empty dataset: list file {list_file} names no images")
        if ids is None:
            return cls(paths, transform, source=str(list_file), substitute=substitute)
        names = [str(i) for i in range(max(ids) + 1)] if classes is None else list(classes)
        kept = [i for i, label in enumerate(ids) if label < len(names)]
        if len(kept) < len(ids):
            warnings.warn(f"list file {list_file}: {len(ids) - len(kept)} images have class ids past the "
                          f"{len(names)} classes of data.classes (the ids a run keeps) and are left out",
                          stacklevel=2)
        return cls([paths[i] for i in kept], transform, source=str(list_file), substitute=substitute,
                   labels=torch.tensor([ids[i] for i in kept], dtype=torch.int64), classes=names)

    def __len__(self) -> int:
        return len(self.paths)

    def image(self, index: int) -> Image.Image:
        """Item ``index``'s image before its crop and flip: the file opened, not yet decoded (load
        and close it); raises one of :data:`UNREADABLE_IMAGE_ERRORS`."""
        return Image.open(self.paths[index])

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
