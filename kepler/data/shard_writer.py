"""``kepler data shard``: a data source written as webdataset tar shards, which the ``shards`` source
(:mod:`kepler.data.shards`) streams.

Each item of the source becomes one sample: its image before any crop or flip (the data set's
``image(index)``), and its class id when the source is labelled. The items are spread evenly over
``ceil(count / shard_size)`` shards, in order (shards differ by at most one image, less the
unreadable ones), so that the streams an epoch deals them to stay even. A file that is not resized is
copied as it is, after a check that it decodes; a resized image (``resize``: its shorter side, as
``data.resize``) is re-encoded, as JPEG (quality 95) when it was one and as PNG otherwise, and so are
the embedded sets' images. Unreadable files are left out, with a warning, and listed in the index.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from kepler.data.classes import dataset_labels
from kepler.data.images import UNREADABLE_IMAGE_ERRORS
from kepler.data.shards import FORMAT, INDEX_FILE, LABEL_EXTENSION, VERSION
from kepler.data.transforms import ImageTransform, to_rgb

SHARD_NAME = "shard-{:06d}.tar"
KEY_DIGITS = 9
# PIL's format -> the sample's extension, for the files copied as they are.
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def encode_image(image: Image.Image, resize: int | None = None) -> tuple[str, bytes]:
    """``(extension, bytes)`` of ``image`` (closed here) for a shard: its file's own bytes when it is
    not resized and came from a JPEG, PNG or WebP file; otherwise 8-bit RGB, its shorter side
    resized to ``resize``, as JPEG (quality 95) when it was one and as PNG otherwise. Raises one of
    :data:`~kepler.data.images.UNREADABLE_IMAGE_ERRORS` for an image that does not decode."""
    with image:
        image.load()
        source_format, filename = image.format, getattr(image, "filename", "")
        if resize is None and source_format in EXTENSIONS and filename:
            return EXTENSIONS[source_format], Path(filename).read_bytes()
        rgb = to_rgb(image)
    if resize is not None:
        rgb = ImageTransform(resize).resize_shorter_side(rgb)
    out = io.BytesIO()
    if source_format == "JPEG":
        rgb.save(out, "JPEG", quality=95)
        return "jpg", out.getvalue()
    rgb.save(out, "PNG")
    return "png", out.getvalue()


def planned_shard(index: int, count: int, shards: int) -> int:
    """The shard of item ``index`` of ``count`` spread evenly over ``shards`` in order: shard ``s``
    holds the items from ``s * count // shards`` to before ``(s + 1) * count // shards``."""
    return ((index + 1) * shards - 1) // count


class _EncodedImages(Dataset):
    """Item ``i`` -> ``(i, extension, bytes)``, or ``(i, None, why)`` for an unreadable image: the
    encoding runs in DataLoader workers."""

    def __init__(self, dataset: Dataset, resize: int | None):
        self.dataset = dataset
        self.resize = resize

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return (index, *encode_image(self.dataset.image(index), self.resize))
        except UNREADABLE_IMAGE_ERRORS as exc:
            return index, None, str(exc) or type(exc).__name__


def write_shards(dataset: Dataset, out: str | os.PathLike, shard_size: int = 1000, resize: int | None = None,
                 settings: Mapping | None = None, num_workers: int = 0) -> dict:
    """Write ``dataset`` (a data set of :func:`kepler.data.build_dataset` with ``image(index)``) into
    the new or empty folder ``out``, at most ``shard_size`` samples a shard, then ``index.json``
    (``settings``: what the shards were written from, recorded in it); returns the index. Images
    are encoded in ``num_workers`` processes (0: this one)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} is not an empty folder: shards are written into a new or empty one")
    out.mkdir(parents=True, exist_ok=True)
    _, labels = dataset_labels(dataset)
    classes = None if labels is None else list(dataset.classes)
    paths = getattr(dataset, "paths", None)  # how a file source names an unreadable item
    count = len(dataset)
    planned = -(-count // shard_size)
    shards: list[dict] = []
    skipped: list[str] = []
    writer, current = None, None
    loader = DataLoader(_EncodedImages(dataset, resize), batch_size=None, num_workers=num_workers)
    try:
        for index, extension, data in loader:
            if extension is None:
                name = paths[index] if paths is not None else f"item {index}"
                warnings.warn(f"skipping unreadable image {name}: {data}", stacklevel=2)
                skipped.append(f"{name}: {data}")
                continue
            if planned_shard(index, count, planned) != current:
                current = planned_shard(index, count, planned)
                if writer is not None:
                    writer.close()
                shards.append({"file": SHARD_NAME.format(len(shards)), "count": 0})
                # A fixed mtime: the same source gives the same tar files, byte for byte.
                writer = wds.TarWriter(str(out / shards[-1]["file"]), encoder=False, mtime=0)
            sample = {"__key__": f"{index:0{KEY_DIGITS}d}", extension: data}
            if labels is not None:
                sample[LABEL_EXTENSION] = str(int(labels[index])).encode()
            writer.write(sample)
            shards[-1]["count"] += 1
    finally:
        if writer is not None:
            writer.close()
    if not shards:
        raise ValueError(f"no readable image among the {count} items: no shards written")
    index = {"format": FORMAT, "version": VERSION, "count": sum(s["count"] for s in shards), "classes": classes,
             "shards": shards, "settings": dict(settings or {}), "skipped": skipped}
    # Written last, and whole or not at all: a folder with an index holds every shard it lists.
    temporary = out / f".{INDEX_FILE}.tmp"
    temporary.write_text(json.dumps(index, indent=1) + "\n")
    os.replace(temporary, out / INDEX_FILE)
    return index
