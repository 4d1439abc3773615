"""Class labels from the files' layout: class folders (ImageNet's layout), list files of
path<TAB>label lines, the run's fixed class ids, and a class-conditional prior on a labelled folder."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kepler.cli import main
from kepler.data import build_dataset, dataset_labels, first_items, run_classes
from kepler.io.checkpoint import load_checkpoint


def write_png(path: Path, value: int) -> Path:
    """A 20x24 PNG of one grey ``value``: its pixels tell which file an item came from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 24, 3), value, np.uint8)).save(path)
    return path


def class_tree(root: Path, classes: dict[str, int]) -> Path:
    """``root/<class>/<i>.png`` for each class and count (one of them a level deeper), each a grey
    level of its own."""
    value = 0
    for name, count in classes.items():
        for i in range(count):
            write_png(root / name / ("deep" if i == 2 else "") / f"{i}.png", value)
            value += 10
    return root


def grey(item) -> int:
    """The grey level of a centre-cropped item (see write_png)."""
    return round((item[0][0, 0, 0].item() + 1) * 127.5)


def test_class_folders_are_numbered_as_torchvision_numbers_them(tmp_path):
    from torchvision.datasets import ImageFolder

    root = class_tree(tmp_path / "images", {"tabby": 3, "Zebra": 2, "axolotl": 4})
    dataset = build_dataset({"size": 16}, "val", spec=root)
    assert dataset.classes == ["Zebra", "axolotl", "tabby"]  # sorted as strings, as ImageFolder sorts them
    reference = ImageFolder(str(root))
    assert reference.classes == dataset.classes
    assert sorted(zip(dataset.paths, dataset.labels.tolist())) == sorted(reference.samples)
    num_classes, labels = dataset_labels(dataset)
    assert num_classes == 3 and labels.tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 2]
    # The labels are the items' own: each item's grey level is its file's.
    assert [grey(dataset[i]) for i in range(len(dataset))] == [30, 40, 50, 60, 80, 70, 0, 10, 20]
    assert dataset_labels(first_items(dataset, 3))[1].tolist() == [0, 0, 1]


def test_a_folder_with_images_of_its_own_or_labels_none_is_unlabelled(tmp_path):
    root = class_tree(tmp_path / "images", {"a": 2, "b": 2})
    assert dataset_labels(build_dataset({"size": 16, "labels": "none"}, "val", spec=root)) == (0, None)
    assert len(build_dataset({"size": 16, "labels": "none"}, "val", spec=root)) == 4
    write_png(root / "loose.png", 5)
    assert dataset_labels(build_dataset({"size": 16}, "val", spec=root)) == (0, None)
    assert run_classes({"train": str(root)}) is None


def test_list_file_labels(tmp_path):
    for i in range(4):
        write_png(tmp_path / "img" / f"{i}.png", 10 * i)
    listing = tmp_path / "train.txt"
    listing.write_text(f"# path<TAB>class\nimg/0.png\t3\nimg/1.png\t0\n\n{tmp_path / 'img' / '2.png'}\t3\n"
                       "img/3.png\t1\n")
    dataset = build_dataset({"size": 16}, "val", spec=listing)
    assert [grey(dataset[i]) for i in range(4)] == [0, 10, 20, 30]
    num_classes, labels = dataset_labels(dataset)
    assert num_classes == 4 and labels.tolist() == [3, 0, 3, 1] and dataset.classes == ["0", "1", "2", "3"]
    assert run_classes({"train": str(listing)}) == ["0", "1", "2", "3"]
    assert dataset_labels(build_dataset({"size": 16, "labels": "none"}, "val", spec=listing)) == (0, None)
    # The run's classes bound the ids: one past them is left out, with a warning.
    with pytest.warns(UserWarning, match=f"list file {listing}: 2 images have class ids past the 3 classes of "
                                         r"data.classes \(the ids a run keeps\) and are left out"):
        fewer = build_dataset({"size": 16, "classes": ["0", "1", "2"]}, "val", spec=listing)
    assert dataset_labels(fewer)[0] == 3 and fewer.labels.tolist() == [0, 1]


def test_the_run_s_classes_win_when_a_class_folder_is_added(tmp_path):
    root = class_tree(tmp_path / "images", {"cat": 2, "dog": 2})
    recorded = run_classes({"train": str(root)})
    assert recorded == ["cat", "dog"]
    class_tree(root, {"ant": 1})  # sorts first: it would shift every id
    (root / "dog").rename(root / "eel")  # and a class folder is gone
    with pytest.warns(UserWarning, match=f"data.train '{root}' has other classes than the 2 the run recorded "
                                         r"\(added: ant, eel; gone: dog\): the run keeps its recorded class ids"):
        assert run_classes({"train": str(root)}, recorded) == recorded
    with pytest.warns(UserWarning, match=f"{root}: class folders not among the 2 classes of data.classes "
                                         r"\(the ids a run keeps\), left out with their 3 images: ant, eel"):
        dataset = build_dataset({"size": 16, "classes": recorded}, "val", spec=root)
    assert dataset.classes == ["cat", "dog"] and dataset.labels.tolist() == [0, 0]
    assert [grey(dataset[i]) for i in range(2)] == [0, 10]  # cat's images, still class 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing changed: no warning
        assert run_classes({"train": str(root)}, ["ant", "cat", "eel"]) == ["ant", "cat", "eel"]
    assert run_classes({"train": str(root), "labels": "none"}, recorded) is None


def test_bad_labels_are_errors_naming_the_file_and_line(tmp_path):
    write_png(tmp_path / "a.png", 0)
    listing = tmp_path / "list.txt"
    listing.write_text("a.png\t0\na.png\tcat\n")
    with pytest.raises(ValueError, match=f"^list file {listing} line 2: label 'cat' is not a class id "
                                         r"\(an integer >= 0\)$"):
        build_dataset({"size": 16}, "train", spec=listing)
    listing.write_text("a.png\t-1\n")
    with pytest.raises(ValueError, match=r"line 1: label '-1' is not a class id \(an integer >= 0\)$"):
        build_dataset({"size": 16}, "train", spec=listing)
    listing.write_text("# mixed\na.png\t1\na.png\n")
    with pytest.raises(ValueError, match=f"^list file {listing}: line 2 has a label and line 3 has none: give every "
                                         r"line a label \(path<TAB>label\) or none$"):
        build_dataset({"size": 16}, "train", spec=listing)
    build_dataset({"size": 16, "labels": "none"}, "train", spec=listing)  # labels not read


def test_an_empty_class_folder_is_an_error(tmp_path):
    root = class_tree(tmp_path / "images", {"cat": 2})
    (root / "dog" / "deeper").mkdir(parents=True)
    (root / "dog" / "notes.txt").write_text("no images")
    with pytest.raises(ValueError, match=f"^empty class folder {root / 'dog'}: no images "
                                         r"\(.jpg, .jpeg, .png, .webp\) in it; remove it, or set data.labels=none to "
                                         f"read {root} as unlabelled images$"):
        build_dataset({"size": 16}, "train", spec=root)
    assert len(build_dataset({"size": 16, "labels": "none"}, "train", spec=root)) == 2


# ------------------------------------------------------------------ a prior on a labelled folder


def labelled_photos(root: Path, classes: dict[str, int], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (24, 28, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_a_conditional_prior_trains_on_a_labelled_folder_and_keeps_its_class_ids(tmp_path, capsys):
    from test_prior_train import code_caches, prior_config, train_tokenizer

    from kepler.train.codes import open_stored_codes

    tokenizer = train_tokenizer(tmp_path, partitions=2)
    train_root = labelled_photos(tmp_path / "train", {"cat": 3, "dog": 2, "eel": 3}, seed=0)
    val_root = labelled_photos(tmp_path / "val", {"cat": 1, "eel": 2}, seed=1)  # no dog: numbered by the names
    run = tmp_path / "prior"
    data = [f"data.train={train_root}", f"data.val={val_root}", "data.val_max_images=null"]
    config = str(prior_config(tmp_path, tokenizer, steps=2))
    assert main(["prior", "train", config, f"run_dir={tmp_path / 'mismatch'}", *data, "model.num_classes=2"]) == 2
    assert capsys.readouterr().err == (f"kepler prior: error: config key 'model.num_classes' is 2, but data.train "
                                       f"'{train_root}' has 3 classes\n")
    assert main(["prior", "train", config, f"run_dir={run}", *data, "model.num_classes=3"]) == 0
    (cache,) = code_caches(run)
    stored = open_stored_codes(cache)
    assert stored.train_labels[:].tolist() == [0, 0, 0, 1, 1, 2, 2, 2] * 2  # the maps, then their flips
    assert stored.val_labels[:].tolist() == [0, 2, 2]
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["config"]["data"]["classes"] == ["cat", "dog", "eel"] and state["step"] == 2
    assert state["model"]["start_embedding.weight"].shape[0] == 3 + 1  # the classes, then the null class

    # A class folder added since sorts first; the resumed run keeps its ids, and says so.
    labelled_photos(train_root, {"ant": 2}, seed=2)
    config = str(prior_config(tmp_path, tokenizer, steps=3))
    with pytest.warns(UserWarning, match=r"has other classes than the 3 the run recorded \(added: ant; gone: none\)"):
        assert main(["prior", "train", config, f"run_dir={run}", *data, "model.num_classes=3", "--resume"]) == 0
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["config"]["data"]["classes"] == ["cat", "dog", "eel"] and state["step"] == 3
    assert json.loads((run / "metrics.json").read_text())["train_maps"] == 16
