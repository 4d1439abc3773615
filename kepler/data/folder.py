"""The data source of a folder: every .jpg/.jpeg/.png/.webp image under it, recursively; labelled by
class folders when it has ImageNet's layout (see :mod:`kepler.data.images`)."""

from __future__ import annotations

from pathlib import Path

from kepler.data.images import ImagePaths, class_folders, file_dataset
from kepler.data.sources import register_source


@register_source("folder", "a folder of images", matches=lambda spec: Path(spec).is_dir(),
                 classes=lambda spec, data: class_folders(spec))
def build_folder(spec: str, split: str, data) -> ImagePaths:
    return file_dataset(ImagePaths.from_folder, spec, split, data)
