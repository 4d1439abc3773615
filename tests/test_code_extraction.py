"""The prior's code extraction (kepler.train.codes): memory-mapped shards written by every rank, the
same codes from one process or two, resumed after a kill, keyed by the tokenizer and the data."""

import datetime
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from test_prior_train import prior_config, train_tokenizer
from test_quantizer_ddp import free_port
from test_train import random_images

from kepler.data import DataSection, build_dataset, collate, held_out_set
from kepler.io.config import load_prior_config
from kepler.io.files import file_sha256
from kepler.models.load import load_model, tokenizer_layout
from kepler.train import codes
from kepler.train.codes import (CACHE_DATA_KEYS, CodeMaps, IncompleteExtraction, ShardedArray, cache_key,
                                cache_settings, code_dtype, extract_codes, open_stored_codes)
from kepler.train.prior_task import PriorTask
from kepler.train.trainer import train

# The labelled faces: 180 training patches (with their flips) in shards of 50, 50, 50 and 30 items,
# and 20 held-out patches in one shard.
DATA = asdict(DataSection(train="faces", val="faces", size=16, resize=24, val_batch_size=8, val_max_images=20))
NUM_CLASSES = 2
SHARD_ITEMS = 50
SHARDS = ["train-00000", "train-00001", "train-00002", "train-00003", "val-00000"]
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    """A tiny tokenizer (2 steps): 16x16 crops are 8x8 positions of 2 sub-codes, K=16."""
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"), partitions=2)


def extract(tokenizer_path: Path, run_dir: Path, rank: int = 0, world_size: int = 1, data: dict = DATA,
            num_classes: int = NUM_CLASSES) -> codes.StoredCodes:
    """The faces' codes extracted by ``tokenizer_path`` into ``run_dir``, as this rank of ``world_size``."""
    model = load_model(tokenizer_path, "cpu", kind="tokenizer").model.requires_grad_(False)
    return extract_codes(model, file_sha256(tokenizer_path), data, num_classes, tokenizer_layout(model, data["size"]),
                         run_dir, torch.device("cpu"), rank, world_size, shard_items=SHARD_ITEMS)


def record_writes(written: list) -> None:
    """Append the name of each shard this process encodes to ``written``."""
    write = codes._write_shard

    def recording(folder, shard, *args):
        written.append(shard.name)
        return write(folder, shard, *args)

    codes._write_shard = recording


@pytest.fixture
def written(monkeypatch) -> list:
    """The names of the shards encoded in the test, in order."""
    monkeypatch.setattr(codes, "_write_shard", codes._write_shard)  # restored after the test
    names = []
    record_writes(names)
    return names


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tokenizer) -> Path:
    """The faces' code cache folder, extracted by one process."""
    return extract(tokenizer, tmp_path_factory.mktemp("one_process")).folder


def files_of(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


# ------------------------------------------------------------------ the files and how they read


@pytest.mark.parametrize("codebook_size, dtype", [
    (1, np.uint8), (16, np.uint8), (256, np.uint8), (257, np.uint16), (65536, np.uint16), (65537, np.uint32),
    (2**32, np.uint32),
])
def test_codes_are_stored_in_the_smallest_unsigned_dtype_that_holds_them(codebook_size, dtype):
    assert code_dtype(codebook_size) == dtype


def test_a_codebook_past_uint32_is_refused():
    with pytest.raises(ValueError) as error:
        code_dtype(2**32 + 1)
    assert str(error.value) == "a codebook of 4294967297 codes does not fit uint32 (at most 2**32 codes)"


@pytest.mark.parametrize("items, sizes", [
    (1, [1]), (256, [256]), (257, [256, 1]), (2000, [256] * 7 + [208]), (20000, [625] * 32),
    (1281167, [8192] * 156 + [3215]),
])
def test_a_split_is_cut_into_at_most_8192_items_a_shard_and_32_shards_when_small(items, sizes):
    shards = codes.plan_shards("train", items)
    assert [shard.stop - shard.start for shard in shards] == sizes
    assert [shard.start for shard in shards] == np.cumsum([0] + sizes[:-1]).tolist()
    assert shards[-1].name == f"train-{len(sizes) - 1:05d}" and shards[-1].stop == items


def test_shards_hold_the_tokenizers_maps_flips_and_labels(one_process, tokenizer):
    """The stored maps are the tokenizer's maps of the unaugmented crops, then of their flips, with
    the images' classes: what the in-memory cache held, now uint8 files read memory-mapped."""
    model = load_model(tokenizer, "cpu", kind="tokenizer").model
    train_set = build_dataset({**DATA, "random_crop": False, "flip": False}, "train")
    images, _ = collate([train_set[i] for i in range(len(train_set))])
    held_out, _ = collate(list(held_out_set(DATA)))
    with torch.no_grad():
        expected_train = torch.cat([model.encode_to_indices(images), model.encode_to_indices(images.flip(-1))])
        expected_val = model.encode_to_indices(held_out)
    stored = open_stored_codes(one_process)
    assert torch.equal(stored.train[:], expected_train) and torch.equal(stored.val[:], expected_val)
    assert stored.train_labels[:].tolist() == ([1] * 90 + [0] * 90) * 2
    assert stored.val_labels[:].tolist() == [1] * 10 + [0] * 10
    assert all(isinstance(shard, np.memmap) and shard.dtype == np.uint8 for shard in stored.train.shards)
    assert all(isinstance(shard, np.memmap) for shard in stored.train_labels.shards)
    assert sorted(path.name for path in one_process.iterdir()) == sorted(
        ["index.json"] + [name + suffix for name in SHARDS for suffix in (".npy", ".labels.npy", ".json")]
        + [name + ".flipped.npy" for name in SHARDS[:4]])
    shard = np.load(one_process / "train-00003.npy", mmap_mode="r")
    assert shard.shape == (30, 8, 8, 2) and np.array_equal(shard, expected_train[150:180].numpy())
    index = stored.index
    assert (index["dtype"], index["map_shape"], index["codebook_size"]) == ("uint8", [8, 8, 2], 16)
    assert index["tokenizer_sha256"] == file_sha256(tokenizer) and index["data"] == cache_settings(DATA, 2)
    assert [shard["items"] for shard in index["splits"]["train"]["shards"]] == [[0, 50], [50, 100], [100, 150],
                                                                                [150, 180]]
    assert index["splits"]["val"]["shards"][0]["sha256"]["maps"] == file_sha256(one_process / "val-00000.npy")


def test_a_sharded_array_reads_rows_across_its_shards(tmp_path):
    parts = [np.arange(i, i + n * 3, dtype=np.uint16).reshape(n, 3) for i, n in ((0, 4), (100, 0), (200, 3), (300, 5))]
    for i, part in enumerate(parts):
        np.save(tmp_path / f"{i}.npy", part)
    array = ShardedArray([tmp_path / f"{i}.npy" for i in range(4)])
    whole = np.concatenate(parts)
    assert len(array) == 12
    for key in (0, 3, 4, 6, 7, 11, -1, -12):
        row = array[key]
        assert row.dtype == torch.int64 and row.tolist() == whole[key].tolist(), key
    for key in (slice(None), slice(2, 9), slice(4, 7), slice(5, 5), slice(10, 40), slice(-3, None)):
        assert array[key].tolist() == whole[key].tolist(), key
    assert array[5:5].shape == (0, 3)
    with pytest.raises(IndexError) as error:
        array[12]
    assert str(error.value) == "index 12 is out of range for 12 rows"
    with pytest.raises(ValueError) as error:
        array[::2]
    assert str(error.value) == "a ShardedArray is sliced with step 1, got 2"
    # Pickled (a spawned DataLoader worker), it carries its paths, not its rows.
    copy = pickle.loads(pickle.dumps(array))
    assert len(pickle.dumps(array)) < 500 and copy[2:9].tolist() == whole[2:9].tolist()
    assert isinstance(copy.shards[0], np.memmap)


def test_a_repeated_path_is_mapped_once(tmp_path):
    np.save(tmp_path / "labels.npy", np.array([3, 1], dtype=np.int64))
    array = ShardedArray([tmp_path / "labels.npy"] * 2)
    assert array[:].tolist() == [3, 1, 3, 1] and array.shards[0] is array.shards[1]


def test_a_split_without_a_readable_image_is_an_error(tmp_path, tokenizer):
    val = random_images(tmp_path / "val", count=2, seed=4)
    (val / "img0.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")  # the one held-out image kept
    data = {**DATA, "train": "sample", "samples_per_epoch": 4, "val": str(val), "val_max_images": 1}
    with pytest.warns(UserWarning, match="skipping unreadable image"), pytest.raises(ValueError) as error:
        extract(tokenizer, tmp_path / "run", data=data, num_classes=0)
    assert str(error.value) == "no readable image among the 1 val images to encode"
    with pytest.raises(ValueError) as error:  # read back: the same error
        extract(tokenizer, tmp_path / "run", data=data, num_classes=0)
    assert str(error.value) == "no readable image among the 1 val images to encode"


# ------------------------------------------------------------------ the key


def test_the_key_is_the_tokenizer_and_the_data_settings():
    settings = cache_settings(DATA, 0)
    # As the .pt caches were named: the first 16 hex digits of the settings' SHA-256.
    expected = hashlib.sha256(json.dumps({"tokenizer": "abc", **settings}, sort_keys=True).encode()).hexdigest()
    assert cache_key("abc", settings) == expected[:16]
    assert cache_key("abd", settings) != cache_key("abc", settings)
    changed = {"train": "sample", "val": "sample", "size": 32, "resize": 48, "flip": False, "samples_per_epoch": 8,
               "val_max_images": 4}
    assert set(changed) == set(CACHE_DATA_KEYS)
    for key, value in changed.items():
        assert cache_key("abc", cache_settings({**DATA, key: value}, 0)) != cache_key("abc", settings), key
    # What does not change the maps keeps the key; the classes of a conditional prior change it.
    same = {"batch_size": 64, "num_workers": 4, "random_crop": False, "val_batch_size": 2}
    assert cache_key("abc", cache_settings({**DATA, **same}, 0)) == cache_key("abc", settings)
    assert cache_key("abc", cache_settings(DATA, 2)) != cache_key("abc", settings)
    # A class-conditional prior's codes are extracted again when the class ids name other classes.
    labelled = cache_key("abc", cache_settings({**DATA, "classes": ["cat", "dog"]}, 2))
    assert cache_key("abc", cache_settings({**DATA, "classes": ["dog", "cat"]}, 2)) != labelled
    assert cache_key("abc", cache_settings({**DATA, "classes": ["dog", "cat"]}, 0)) == cache_key("abc", settings)


def test_a_changed_tokenizer_or_data_setting_extracts_again(tmp_path, tokenizer, one_process, written):
    run = tmp_path / "run"
    first = extract(tokenizer, run)
    assert written == SHARDS and first.folder.name == one_process.name
    written.clear()
    assert extract(tokenizer, run).folder == first.folder and written == []  # read back
    fewer = extract(tokenizer, run, data={**DATA, "val_max_images": 10})
    assert fewer.folder != first.folder and written == SHARDS and len(fewer.val) == 10
    written.clear()
    other = train_tokenizer(tmp_path, partitions=2, seed=1)
    again = extract(other, run)
    assert again.folder.name == cache_key(file_sha256(other), cache_settings(DATA, 2)) and written == SHARDS
    assert not torch.equal(again.train[:], first.train[:])
    assert sorted(path.name for path in (run / "codes").iterdir()) == sorted(
        [first.folder.name, fewer.folder.name, again.folder.name])


# ------------------------------------------------------------------ resuming


def test_a_changed_or_unrecorded_shard_is_encoded_again(tmp_path, tokenizer, one_process, written):
    """Without the index (an interrupted extraction), a shard whose file changed since its record, or
    whose record is missing, is encoded again, and only those; with the index, a file missing or cut
    short makes the extraction incomplete, and only its shard is encoded again."""
    run = tmp_path / "run"
    folder = extract(tokenizer, run).folder
    written.clear()
    (folder / "index.json").unlink()
    with open(folder / "train-00001.npy", "r+b") as f:  # one code changed, the size kept
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    (folder / "train-00002.json").unlink()
    extract(tokenizer, run)
    assert written == ["train-00001", "train-00002"]
    assert files_of(folder) == files_of(one_process)

    written.clear()
    val = folder / "val-00000.npy"
    val.write_bytes(val.read_bytes()[:-5])
    with pytest.raises(IncompleteExtraction) as error:
        open_stored_codes(folder)
    assert str(error.value) == f"{val} cannot be mapped: mmap length is greater than file size"
    extract(tokenizer, run)
    assert written == ["val-00000"] and files_of(folder) == files_of(one_process)

    np.save(val, np.zeros((19, 8, 8, 2), dtype=np.uint8))
    with pytest.raises(IncompleteExtraction) as error:
        open_stored_codes(folder)
    assert str(error.value) == f"{val} holds uint8 (19, 8, 8, 2), the index records uint8 (20, 8, 8, 2)"
    (folder / "index.json").unlink()
    with pytest.raises(IncompleteExtraction) as error:
        open_stored_codes(folder)
    assert str(error.value) == f"{folder} has no index.json"


KILLED_AFTER_THE_FIRST_SHARD = """
import os, signal, sys
sys.path.insert(0, sys.argv[3])
import test_code_extraction as t
from kepler.train import codes
write = codes._write_shard

def write_then_die(*args):
    write(*args)
    os.kill(os.getpid(), signal.SIGKILL)

codes._write_shard = write_then_die
t.extract(sys.argv[1], sys.argv[2])
"""


@pytest.mark.slow
def test_an_extraction_killed_after_its_first_shard_resumes_with_the_others(tmp_path, tokenizer, one_process,
                                                                            written):
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_AFTER_THE_FIRST_SHARD, str(tokenizer), str(run),
                             str(Path(__file__).parent)], env=env, stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == -signal.SIGKILL, stderr[-4000:]
    (folder,) = (run / "codes").iterdir()
    assert sorted(path.name for path in folder.glob("*.json")) == ["train-00000.json"]
    # What a kill in the middle of a write leaves: a temporary of a process that is gone.
    stale = folder / f".train-00001.npy.tmp{proc.pid}"
    stale.write_bytes(b"half a shard")
    extract(tokenizer, run)
    assert written == SHARDS[1:]
    assert not stale.exists() and files_of(folder) == files_of(one_process)


# ------------------------------------------------------------------ two processes


def _extract_as_rank(rank: int, port: int, tokenizer_path: str, run_dir: str, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        written = []
        record_writes(written)
        stored = extract(Path(tokenizer_path), Path(run_dir), rank, 2)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"written": written, "folder": str(stored.folder)}))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_extract_the_same_files_as_one(tmp_path, tokenizer, one_process):
    run = tmp_path / "run"
    context = mp.start_processes(_extract_as_rank, args=(free_port(), str(tokenizer), str(run), str(tmp_path)),
                                 nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the 2 gloo ranks did not extract within {TIMEOUT_S} s")
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    # The shards dealt in turn: each rank encoded its own, and both read the same cache.
    assert ranks[0]["written"] == ["train-00000", "train-00002", "val-00000"]
    assert ranks[1]["written"] == ["train-00001", "train-00003"]
    folder = Path(ranks[0]["folder"])
    assert ranks[1]["folder"] == str(folder) and folder.name == one_process.name
    assert files_of(folder) == files_of(one_process)


# ------------------------------------------------------------------ the prior reads them


def test_the_prior_trains_on_memory_mapped_codes(tmp_path, tokenizer):
    """The training set the trainer draws from holds the memory-mapped shards (no copy in memory), and
    its items and batches are int64."""
    tasks = []

    class RecordingPriorTask(PriorTask):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            tasks.append(self)

    cfg = load_prior_config(prior_config(tmp_path, tokenizer, steps=1),
                            [f"run_dir={tmp_path / 'run'}", "data.train=faces", "data.val=faces",
                             "data.val_max_images=20", "model.num_classes=2"])
    train(cfg, task_class=RecordingPriorTask)
    (task,) = tasks
    train_set = task.train_set
    assert isinstance(train_set, CodeMaps) and len(train_set) == 360
    for array in (train_set.codes, train_set.labels, task.val_codes, task.val_labels):
        assert isinstance(array, ShardedArray) and all(isinstance(shard, np.memmap) for shard in array.shards)
    (maps, labels), skipped = collate([train_set[(index, (0, 0, 0, index))] for index in (0, 100, 200, 359)])
    assert maps.dtype == labels.dtype == torch.int64 and maps.shape == (4, 8, 8, 2) and skipped == []
    assert labels.tolist() == [1, 0, 1, 0]  # a face, a background patch, then their flips
