"""The data source of a folder: every .jpg/.jpeg/.png/.webp image under it, recursively."""

from __future__ import annotations

from pathlib import Path

from kepler.data.images import ImagePaths, file_dataset
from kepler.data.sources import register_source


@register_source("folder", "a folder of images", matches=lambda spec: Path(spec).is_dir())
def build_folder(spec: str, split: str, data) -> ImagePaths:
    return file_dataset(ImagePaths.from_folder, spec, split, data)
