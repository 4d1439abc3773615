"""Samples for the field's evaluators: one ``.npz`` in the layout of guided-diffusion's sample batches
(what its ``evaluations/evaluator.py`` reads), written in chunks so that a long run resumes.

The file holds ``arr_0``: the images, ``(N, H, W, 3)`` uint8, and, for a class-conditional model,
``arr_1``: their classes, ``(N,)`` int64. :func:`write_samples_npz` streams the images into it one
chunk at a time (a 50 000-image file of 256 x 256 images is 9.8 GB: it is never in memory whole).

:class:`SampleChunks` keeps a run's finished chunks in a folder beside the output, ``<out>.chunks/``:
one ``chunk<index>.npz`` a chunk (the same two arrays), each written atomically, so a file there is a
whole chunk, and ``run.json``, the settings that decide the samples. A run that finds the folder
takes up its chunks when the settings are the same and refuses otherwise; :meth:`SampleChunks.assemble`
writes the output from the chunks, in order, and removes the folder.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from kepler.io.files import write_atomically

RUN_FILE = "run.json"


def chunk_folder(out: str | os.PathLike) -> Path:
    """Where the chunks of a run into the ``.npz`` ``out`` are kept: ``<out>.chunks/`` beside it."""
    out = Path(out)
    return out.with_name(out.name + ".chunks")


def _array_member(archive: zipfile.ZipFile, name: str, dtype: np.dtype, shape: tuple[int, ...]):
    """An open ``.npy`` member of ``archive`` with its header written: the caller writes the
    C-ordered bytes of an array of ``shape`` and ``dtype``, in pieces, and closes it."""
    member = archive.open(f"{name}.npy", "w", force_zip64=True)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    np.lib.format.write_array_header_1_0(member, header)
    return member


def write_samples_npz(path: str | os.PathLike, chunks: Iterable[tuple[np.ndarray, np.ndarray | None]], num: int,
                      image_shape: tuple[int, int]) -> Path:
    """Write ``num`` samples to the ``.npz`` ``path`` (atomically): ``chunks`` yields ``(images (n, H,
    W, 3) uint8, labels (n,) int64 or None)`` in order, ``num`` images in all, of ``image_shape``
    ``(H, W)``. Labels (all chunks have them, or none) become ``arr_1``. ValueError if the chunks do
    not add up to that."""
    height, width = image_shape

    def write(f) -> None:
        labels, written = [], 0
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            with _array_member(archive, "arr_0", np.uint8, (num, height, width, 3)) as member:
                for images, chunk_labels in chunks:
                    if images.dtype != np.uint8 or images.shape[1:] != (height, width, 3):
                        raise ValueError(f"sample chunk of {images.dtype} {images.shape}: expected uint8 "
                                         f"(n, {height}, {width}, 3)")
                    written += len(images)
                    if written > num:
                        raise ValueError(f"the sample chunks hold more than the {num} samples of the run")
                    member.write(np.ascontiguousarray(images).tobytes())
                    labels.append(chunk_labels)
            if written != num:
                raise ValueError(f"the sample chunks hold {written} samples, not the {num} of the run")
            if labels and labels[0] is not None:
                if any(chunk is None for chunk in labels):
                    raise ValueError("some sample chunks have labels and some do not")
                buffer = io.BytesIO()
                np.save(buffer, np.concatenate(labels).astype(np.int64))
                archive.writestr("arr_1.npy", buffer.getvalue())

    return write_atomically(path, write)


class SampleChunks:
    """The finished chunks of a run of samples into the ``.npz`` ``out`` (see the module docstring).

    ``settings``: what decides the samples (JSON-able). Creating it makes ``<out>.chunks/`` and its
    ``run.json``, or takes up the chunks found there when that file holds the same settings; a
    ValueError naming the settings that differ otherwise. Several processes may create it at once
    (each writes the same ``run.json``) and save their own chunks."""

    def __init__(self, out: str | os.PathLike, settings: Mapping):
        self.out = Path(out)
        self.folder = chunk_folder(out)
        settings = json.loads(json.dumps(dict(settings)))  # as read back: lists, not tuples
        run_file = self.folder / RUN_FILE
        if run_file.is_file():
            try:
                found = json.loads(run_file.read_text())
            except (OSError, ValueError) as exc:
                raise ValueError(f"{run_file} cannot be read ({exc}): delete {self.folder} to start over") from None
            differ = sorted(key for key in set(found) | set(settings) if found.get(key) != settings.get(key))
            if differ:
                said = ", ".join(f"{key} {found.get(key)!r} there, {settings.get(key)!r} now" for key in differ)
                raise ValueError(f"{self.folder} holds the chunks of another run ({said}): run with its settings "
                                 f"to finish it, or delete the folder to start over")
        write_atomically(run_file, lambda f: f.write(json.dumps(settings, indent=2).encode()))

    def path(self, index: int) -> Path:
        return self.folder / f"chunk{index:06d}.npz"

    def done(self, index: int) -> bool:
        return self.path(index).is_file()

    def save(self, index: int, images: np.ndarray, labels: np.ndarray | None) -> Path:
        """Chunk ``index``: ``images (n, H, W, 3)`` uint8 and their ``labels (n,)`` (None: unconditional)."""
        arrays = [images] if labels is None else [images, labels.astype(np.int64)]
        return write_atomically(self.path(index), lambda f: np.savez(f, *arrays))

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """``(images, labels or None)`` of chunk ``index``."""
        with np.load(self.path(index)) as chunk:
            return chunk["arr_0"], chunk["arr_1"] if "arr_1" in chunk else None

    def assemble(self, count: int, num: int, image_shape: tuple[int, int]) -> Path:
        """Write ``out`` from chunks ``0 .. count - 1`` (``num`` samples of ``image_shape``), then
        remove the chunk folder; returns ``out``."""
        write_samples_npz(self.out, (self.load(index) for index in range(count)), num, image_shape)
        shutil.rmtree(self.folder)
        return self.out
