"""Webdataset shards: kepler data shard writes them, the shards source reads them back (by index and
as the training stream), every sample once an epoch across processes and workers, exact resume."""

import json
import os
import signal
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_labels import class_tree, write_png

from kepler.cli import main
from kepler.data import EpochLoader, ImageShards, build_dataset, dataset_labels
from kepler.data.shard_writer import write_shards
from kepler.io.checkpoint import load_checkpoint
from kepler.io.config import load_config
from kepler.train.trainer import Trainer, TrainingInterrupted, train

# Centre crops of the images as they are: an item's pixels are its file's.
PLAIN = {"size": 16, "random_crop": False, "flip": False}


def numbered_images(root: Path, count: int) -> Path:
    """``count`` PNGs whose grey level (5 * i) names image i."""
    for i in range(count):
        write_png(root / f"{i:03d}.png", 5 * i)
    return root


def shards_of(tmp_path: Path, count: int, shard_size: int) -> Path:
    out = tmp_path / "shards"
    write_shards(build_dataset({"size": 16}, "train", spec=numbered_images(tmp_path / "images", count)), out,
                 shard_size)
    return out


def numbers(batch: torch.Tensor) -> list[int]:
    """Which images a batch of PLAIN items holds (see numbered_images)."""
    return [round(v / 5) for v in ((batch[:, 0, 0, 0] + 1) * 127.5).tolist()]


def test_shard_round_trip_through_the_command(tmp_path, capsys):
    root = class_tree(tmp_path / "images", {"cat": 4, "dog": 3, "eel": 3})
    Image.fromarray(np.full((20, 24, 3), 200, np.uint8)).save(root / "dog" / "photo.jpg", quality=90)
    (root / "eel" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    out = tmp_path / "shards"
    with pytest.warns(UserWarning, match=f"skipping unreadable image {root / 'eel' / 'broken.png'}"):
        assert main(["data", "shard", str(root), "--out", str(out), "--shard-size", "4"]) == 0
    assert capsys.readouterr().out == (f"kepler data shard: wrote 11 images, 3 classes in 3 shards to {out}; left out "
                                       "1 unreadable files (listed in the index)\n")
    index = json.loads((out / "index.json").read_text())
    assert index["count"] == 11 and index["classes"] == ["cat", "dog", "eel"]
    assert [s["count"] for s in index["shards"]] == [4, 4, 3]  # 12 items spread evenly, the broken one left out
    assert index["settings"] == {"source": str(root), "split": "train", "resize": None, "shard_size": 4,
                                 "labels": "auto"}
    assert len(index["skipped"]) == 1 and index["skipped"][0].startswith(f"{root / 'eel' / 'broken.png'}: ")
    with tarfile.open(out / "shard-000000.tar") as tar:
        assert tar.getnames()[:4] == ["000000000.cls", "000000000.png", "000000001.cls", "000000001.png"]
    source = build_dataset(PLAIN, "val", spec=root)
    shards = build_dataset(PLAIN, "val", spec=out)
    assert isinstance(shards, ImageShards) and len(shards) == 11
    readable = [i for i, path in enumerate(source.paths) if not path.endswith("broken.png")]
    # The files are copied as they are: the same pixels (the JPEG too), the same classes.
    for item, i in enumerate(readable):
        torch.testing.assert_close(shards[item][0], source[i][0], rtol=0, atol=0)
    assert dataset_labels(shards)[0] == 3 and dataset_labels(shards)[1].tolist() == source.labels[readable].tolist()
    assert (out / "shard-000001.tar").read_bytes().count(Path(root / "dog" / "photo.jpg").read_bytes()) == 1


def test_resized_images_are_re_encoded_and_the_embedded_sets_keep_their_classes(tmp_path):
    faces = build_dataset({"size": 16, "resize": 16}, "val", spec="faces")
    index = write_shards(faces, tmp_path / "faces", shard_size=8, resize=20)
    assert index["count"] == 20 and index["classes"] == ["non-face", "face"]
    shards = ImageShards(tmp_path / "faces", faces.transform)
    assert dataset_labels(shards)[1].tolist() == faces.labels.tolist()
    with tarfile.open(tmp_path / "faces" / "shard-000000.tar") as tar:
        image = Image.open(tar.extractfile("000000000.png"))
        assert image.size == (20, 20) and image.mode == "RGB"  # the 16 px patch, resized to 20 and re-encoded
    (tmp_path / "jpegs").mkdir()
    Image.fromarray(np.full((30, 40), 90, np.uint8)).save(tmp_path / "jpegs" / "grey.jpg")  # a greyscale JPEG
    write_shards(build_dataset({"size": 16}, "val", spec=tmp_path / "jpegs"), tmp_path / "resized", resize=24)
    with tarfile.open(tmp_path / "resized" / "shard-000000.tar") as tar:
        assert tar.getnames() == ["000000000.jpg"]
        image = Image.open(tar.extractfile("000000000.jpg"))
        assert image.format == "JPEG" and image.size == (32, 24) and image.mode == "RGB"


def test_every_sample_once_an_epoch_across_2_processes_of_2_workers(tmp_path):
    shards = build_dataset(PLAIN, "train", spec=shards_of(tmp_path, count=40, shard_size=5))
    epochs = []
    for epoch in range(2):
        seen = []
        for rank in range(2):
            loader = EpochLoader(shards, batch_size=5, num_workers=2, seed=7, rank=rank, world_size=2)
            assert loader.batches_per_epoch == 4
            batches = [numbers(images) for images, skipped in loader.epoch(epoch)]
            assert len(batches) == 4 and all(len(b) == 5 for b in batches)
            seen += [n for b in batches for n in b]
        assert sorted(seen) == list(range(40))
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # shards and samples mixed again


def test_uneven_streams_yield_equal_counts_each_sample_at_most_once(tmp_path):
    shards = build_dataset(PLAIN, "train", spec=shards_of(tmp_path, count=43, shard_size=5))
    assert shards.counts == [4, 5, 5, 5, 4, 5, 5, 5, 5]  # 43 spread evenly over ceil(43 / 5) shards
    assert shards.samples_per_stream(4) == 8  # each stream is dealt 2 or 3 shards: at least 4 + 4
    seen = []
    for rank in range(2):
        loader = EpochLoader(shards, batch_size=4, num_workers=2, seed=0, rank=rank, world_size=2)
        seen += [n for images, _ in loader.epoch(0) for n in numbers(images)]
    assert len(seen) == 32 and len(set(seen)) == 32


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_epoch_resumed_at_any_batch_is_the_rest_of_the_same_epoch(tmp_path, num_workers):
    # Random crops and flips, so that the resumed items' augmentation is checked too.
    shards = build_dataset({"size": 16, "resize": 20}, "train", spec=shards_of(tmp_path, count=30, shard_size=3))
    loader = EpochLoader(shards, batch_size=2, num_workers=num_workers, seed=3, rank=1, world_size=2)
    whole = [images for images, _ in loader.epoch(5)]
    assert len(whole) == loader.batches_per_epoch == (6 if num_workers else 7)
    for start in (1, 2, 3):
        rest = [images for images, _ in loader.epoch(5, start)]
        assert len(rest) == len(whole) - start
        for a, b in zip(rest, whole[start:]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(whole[0], next(iter(loader.epoch(6)))[0])


def test_a_sample_s_crop_and_flip_depend_on_the_seed_the_epoch_and_its_key_alone(tmp_path):
    """Not on the process, the worker or the place in the stream: the same in any layout, redrawn
    every epoch."""
    (tmp_path / "images").mkdir()
    for i in range(12):  # green names the image, red's ramp across it shows the crop and the flip
        ramp = np.stack([np.tile(np.arange(24, dtype=np.uint8) * 10, (20, 1)), np.full((20, 24), 5 * i, np.uint8),
                         np.zeros((20, 24), np.uint8)], axis=-1)
        Image.fromarray(ramp).save(tmp_path / "images" / f"{i:02d}.png")
    write_shards(build_dataset({"size": 16}, "train", spec=tmp_path / "images"), tmp_path / "shards", shard_size=3)
    shards = build_dataset({"size": 16, "resize": 20}, "train", spec=tmp_path / "shards")

    def crops(epoch: int, num_workers: int, seed: int = 0) -> dict[int, list[float]]:
        loader = EpochLoader(shards, batch_size=2, num_workers=num_workers, seed=seed)
        return {round((image[1, 0, 0].item() + 1) * 127.5 / 5): image[0, 0].tolist()
                for images, _ in loader.epoch(epoch) for image in images}

    first = crops(0, num_workers=0)
    assert sorted(first) == list(range(12))
    assert crops(0, num_workers=2) == first
    assert crops(1, num_workers=0) != first
    assert crops(0, num_workers=0, seed=1) != first


TINY_STREAM = ["data.num_workers=2", "data.shuffle_buffer=3", "train.eval_every=100"]


def test_training_on_shards_resumes_exactly(tmp_path, monkeypatch):
    """A tokenizer on shards (2 workers): stopped at step 2 mid-epoch and resumed, its weights are those
    of a run never stopped; its steps 3 and 4 cross into the next epoch."""
    from test_train import _flat_state, random_images, tiny_config

    images = random_images(tmp_path / "images", count=16)
    write_shards(build_dataset({"size": 32}, "train", spec=images), tmp_path / "shards", shard_size=4)
    config = tiny_config(tmp_path, steps=4, accum=3, train_data=tmp_path / "shards")
    full = train(load_config(config, [f"run_dir={tmp_path / 'full'}", *TINY_STREAM]))
    original_step = Trainer.train_step

    def step_then_interrupt(self, batches):
        logs = original_step(self, batches)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return logs

    half = load_config(config, [f"run_dir={tmp_path / 'half'}", *TINY_STREAM])
    monkeypatch.setattr(Trainer, "train_step", step_then_interrupt)
    with pytest.raises(TrainingInterrupted):
        train(half)
    assert load_checkpoint(tmp_path / "half" / "checkpoints" / "last.pt")["data"] == {"epoch": 0, "batch_in_epoch": 6}
    monkeypatch.setattr(Trainer, "train_step", original_step)
    resumed = train(half, resume=True)
    a, b = load_checkpoint(full["checkpoint"]), load_checkpoint(resumed["checkpoint"])
    assert a["data"] == b["data"] == {"epoch": 1, "batch_in_epoch": 4}  # 8 batches an epoch
    flat_a, flat_b = _flat_state(a), _flat_state(b)
    for name in flat_a:
        assert torch.equal(flat_a[name], flat_b[name]), name


def test_bad_shard_folders_are_errors(tmp_path, capsys):
    out = shards_of(tmp_path, count=6, shard_size=2)
    (out / "index.json").unlink()
    with pytest.raises(ValueError, match=f"^shard folder {out} has no index.json: shards are written with kepler data "
                                         r"shard, which writes the index last \(a folder without one is an "
                                         r"interrupted write\)$"):
        build_dataset({"size": 16}, "train", spec=out)
    assert main(["data", "shard", str(tmp_path / "images"), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"kepler data: error: --out {out} is not an empty folder: shards are written "
                                       "into a new or empty one\n")
    shards = build_dataset({"size": 16}, "train", spec=shards_of(tmp_path / "again", count=6, shard_size=2))
    with pytest.raises(ValueError, match=f"^shards {tmp_path / 'again' / 'shards'}: 3 shards for 4 streams "
                                         r"\(processes x data.num_workers\), and each stream reads whole shards: "
                                         r"write smaller shards \(kepler data shard --shard-size\) or use fewer "
                                         "workers$"):
        EpochLoader(shards, batch_size=1, num_workers=2, seed=0, rank=0, world_size=2)
    with pytest.raises(ValueError, match=r"^each of the 2 streams of the training shards \(1 processes x 2 workers\) "
                                         "reads 2 samples an epoch, fewer than one batch of 3$"):
        EpochLoader(shards, batch_size=3, num_workers=2, seed=0)
    labelled = tmp_path / "labelled"
    write_shards(build_dataset({"size": 16}, "train", spec=class_tree(tmp_path / "classes", {"a": 1, "b": 1})),
                 labelled)
    with pytest.raises(ValueError, match=f"^shards {labelled} were written with other classes \\(2\\) than "
                                         r"data.classes \(3, the ids a run keeps\), and their class ids are fixed: "
                                         "write them again from data with those classes$"):
        build_dataset({"size": 16, "classes": ["a", "b", "c"]}, "train", spec=labelled)
