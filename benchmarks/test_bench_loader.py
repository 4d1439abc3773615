"""Training data throughput on the CPU: a folder of JPEGs vs the same images as webdataset shards,
each read with 0 and 2 DataLoader workers.

    .venv/bin/pytest benchmarks/test_bench_loader.py --benchmark-json=loader.json

``IMAGES`` synthetic photos (smooth colour ramps with noise, ``WIDTH`` x ``HEIGHT``, JPEG quality 90)
are written once to a temporary folder, then as shards by ``kepler data shard``'s writer (the files
copied as they are, ``SHARD_SIZE`` a shard). A round reads one epoch of training batches through
:class:`kepler.data.EpochLoader`, as the trainer does: decode, resize the shorter side to
``RESIZE``, a random ``SIZE`` crop and flip, batches of ``BATCH``; the shards' stream also mixes
samples through the default shuffle buffer. ``extra_info["images_per_s"]`` is the images of an
epoch over the median round. ``KEPLER_BENCH_LOADER_IMAGES`` sets the number of images (default
2000: under two minutes on two cores that other jobs share).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image
from timing import record_rate

from kepler.data import EpochLoader, build_dataset
from kepler.data.shard_writer import write_shards

IMAGES = int(os.environ.get("KEPLER_BENCH_LOADER_IMAGES", "2000"))
WIDTH, HEIGHT, SIZE, RESIZE, BATCH, SHARD_SIZE = 256, 192, 128, 144, 32, 250
ROUNDS = 2


@pytest.fixture(scope="module")
def image_folders(tmp_path_factory) -> dict[str, str]:
    """``{"folder": the JPEGs, "shards": the same as shards}``."""
    root = tmp_path_factory.mktemp("loader_bench")
    (root / "jpegs").mkdir()
    rng = np.random.default_rng(0)
    ramp_x, ramp_y = np.meshgrid(np.linspace(0, 1, WIDTH), np.linspace(0, 1, HEIGHT))
    for i in range(IMAGES):
        weights = rng.uniform(0, 255, (3, 3))
        field = weights[:, 0] * ramp_x[..., None] + weights[:, 1] * ramp_y[..., None] + weights[:, 2] * 0.5
        pixels = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "jpegs" / f"{i:05d}.jpg", quality=90)
    write_shards(build_dataset({"size": SIZE}, "train", spec=root / "jpegs"), root / "shards", SHARD_SIZE)
    return {"folder": str(root / "jpegs"), "shards": str(root / "shards")}


@pytest.mark.parametrize("num_workers", [0, 2], ids=["0-workers", "2-workers"])
@pytest.mark.parametrize("source", ["folder", "shards"])
def test_loader_throughput(benchmark, image_folders, source, num_workers):
    benchmark.group = f"training loader {IMAGES} JPEGs {WIDTH}x{HEIGHT} -> {SIZE} crops cpu"
    dataset = build_dataset({"size": SIZE, "resize": RESIZE}, "train", spec=image_folders[source])
    loader = EpochLoader(dataset, BATCH, num_workers, seed=0)
    epochs = iter(range(ROUNDS))

    def one_epoch() -> int:
        return sum(len(images) for images, _ in loader.epoch(next(epochs)))

    images = benchmark.pedantic(one_epoch, rounds=ROUNDS)
    assert images == loader.batches_per_epoch * BATCH
    record_rate(benchmark, "images_per_s", images)
