"""The data source of a list file: one image path per line (taming's ``training_images_list_file``),
or ``path<TAB>label`` lines (see :mod:`kepler.data.images`)."""

from __future__ import annotations

from pathlib import Path

from kepler.data.images import ImagePaths, file_dataset, list_file_classes
from kepler.data.sources import register_source


@register_source("list", "a list file of image paths", matches=lambda spec: Path(spec).is_file(),
                 classes=lambda spec, data: list_file_classes(spec))
def build_list(spec: str, split: str, data) -> ImagePaths:
    return file_dataset(ImagePaths.from_list, spec, split, data)
