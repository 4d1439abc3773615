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

:class:`NpzImages` reads such a file back (``kepler fid``), checked and a batch at a time: the
format's reader beside its writer.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np

from kepler.io.files import write_atomically

# What an image set of the ADM evaluator is, for the error messages of the reader below.
ADM_LAYOUT = "arr_0: uint8 (N, H, W, 3)"

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


# ------------------------------------------------------------------ reading (kepler fid)

def npz_members(path: Path) -> list[str]:
    """The member names of the ``.npz`` (zip) ``path``; ValueError if it is not a zip archive."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except zipfile.BadZipFile:
        raise ValueError(f"{path} is not an .npz file (not a zip archive)") from None


@contextmanager
def _open_arr_0(path: Path) -> Iterator[BinaryIO]:
    """``arr_0.npy`` of the ``.npz`` ``path``, open, at the start of its ``.npy`` header."""
    with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as array:
        yield array


class NpzImages:
    """The images of an ADM-layout ``.npz`` at ``path``, ``count`` of them; checked when opened (a
    zip holding ``arr_0.npy``, uint8, ``(N, H, W, 3)``, C order), read a batch at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if "arr_0.npy" not in npz_members(self.path):
            raise ValueError(f"{self.path} holds no arr_0: image sets are ADM's layout, {ADM_LAYOUT}")
        with _open_arr_0(self.path) as array:
            self.shape = _npy_shape(array, self.path)
        self.count = self.shape[0]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """uint8 ``(B, H, W, 3)`` arrays of ``batch_size`` images (fewer in the last)."""
        image_bytes = int(np.prod(self.shape[1:]))
        with _open_arr_0(self.path) as array:
            _npy_shape(array, self.path)  # past the header
            for start in range(0, self.count, batch_size):
                batch = np.empty((min(batch_size, self.count - start), *self.shape[1:]), dtype=np.uint8)
                read = array.readinto(memoryview(batch).cast("B"))
                if read != batch.nbytes:
                    raise ValueError(f"{self.path}: arr_0 ends after {start + read // image_bytes} of its "
                                     f"{self.count} images")
                yield batch


def _npy_shape(array, path: Path) -> tuple[int, ...]:
    """The shape in the ``.npy`` header at the start of ``array`` (a file object), checked to be ADM's
    layout; the file is left at the start of the data."""
    version = np.lib.format.read_magic(array)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f"{path}: arr_0 is an .npy of format version {version}, not 1.0 or 2.0")
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(array)
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran_order:
        order = " in Fortran order" if fortran_order else ""
        raise ValueError(f"{path}: arr_0 is {dtype} {shape}{order}; image sets are ADM's layout, {ADM_LAYOUT}")
    if shape[0] == 0:
        raise ValueError(f"{path}: arr_0 holds no images")
    return shape
