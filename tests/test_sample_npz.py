"""kepler sample --npz: the ADM layout, the same images as the PNGs of the same seed, classes (one,
balanced, random), resuming an interrupted run from its chunks, and 2 processes writing what 1 does."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_prior_train import FACES, prior_config, prior_run, tokenizer  # noqa: F401 (fixtures)

from kepler.cli import main
from kepler.io.sample_npz import chunk_folder
from kepler.models import sampling


@pytest.fixture(scope="module")
def conditional_prior(tmp_path_factory, tokenizer) -> Path:  # noqa: F811 (the fixture imported above)
    """A class-conditional prior (faces and non-faces, class dropout: guidance works), 1 step."""
    folder = tmp_path_factory.mktemp("conditional")
    run = folder / "run"
    assert main(["prior", "train", str(prior_config(folder, tokenizer, 1)), f"run_dir={run}", *FACES,
                 "model.num_classes=2"]) == 0
    return run / "checkpoints" / "last.pt"


def read_npz(path: Path) -> dict:
    with np.load(path) as npz:
        return {name: npz[name] for name in npz.files}


def test_npz_holds_the_images_of_the_pngs_in_adm_layout(prior_run, tmp_path, capsys):  # noqa: F811
    checkpoint = str(prior_run / "checkpoints" / "last.pt")
    common = [checkpoint, "--num", "5", "--batch-size", "2", "--seed", "3", "--device", "cpu"]
    assert main(["sample", *common, "--npz", str(tmp_path / "samples.npz")]) == 0
    assert f"5 samples (seed 3) in {tmp_path / 'samples.npz'}" in capsys.readouterr().out
    assert main(["sample", *common, "--out", str(tmp_path / "pngs")]) == 0
    arrays = read_npz(tmp_path / "samples.npz")
    assert list(arrays) == ["arr_0"]  # an unconditional prior's samples have no classes
    images = arrays["arr_0"]
    assert images.shape == (5, 16, 16, 3) and images.dtype == np.uint8
    for index, image in enumerate(images):
        assert np.array_equal(image, np.asarray(Image.open(tmp_path / "pngs" / f"sample{index:04d}.png")))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pngs", "samples.npz"]  # the chunks are gone


def test_classes_one_balanced_or_random(conditional_prior, tmp_path, capsys):
    def labels(name, *options):
        assert main(["sample", str(conditional_prior), "--num", "7", "--batch-size", "3", "--device", "cpu",
                     "--npz", str(tmp_path / f"{name}.npz"), *options]) == 0
        arrays = read_npz(tmp_path / f"{name}.npz")
        assert arrays["arr_0"].shape == (7, 16, 16, 3) and arrays["arr_1"].dtype == np.int64
        return arrays["arr_1"]

    assert labels("one", "--class", "1").tolist() == [1] * 7
    balanced = labels("balanced", "--class-balanced")
    assert balanced.tolist() == [0, 1, 0, 1, 0, 1, 0] and np.bincount(balanced).tolist() == [4, 3]
    drawn = labels("random")
    assert set(drawn.tolist()) == {0, 1} and np.array_equal(labels("again"), drawn)  # from the batches' seeds
    assert "7 samples (seed 0, random classes)" in capsys.readouterr().out
    guided = labels("guided", "--class-balanced", "--cfg-scale", "3")
    assert np.array_equal(guided, balanced)
    assert not np.array_equal(read_npz(tmp_path / "guided.npz")["arr_0"], read_npz(tmp_path / "balanced.npz")["arr_0"])


def test_an_interrupted_run_resumes_from_its_chunks(prior_run, tmp_path, capsys, monkeypatch):  # noqa: F811
    checkpoint = str(prior_run / "checkpoints" / "last.pt")
    command = ["sample", checkpoint, "--num", "7", "--batch-size", "2", "--seed", "3", "--device", "cpu", "--npz"]
    assert main([*command, str(tmp_path / "straight.npz")]) == 0
    drawn = []
    sample_batch = sampling.sample_batch

    def interrupted_at_the_third(prior, tokenizer, index, *args, **options):  # noqa: F811
        if len(drawn) == 2:
            raise KeyboardInterrupt
        drawn.append(index)
        return sample_batch(prior, tokenizer, index, *args, **options)

    monkeypatch.setattr(sampling, "sample_batch", interrupted_at_the_third)
    out = tmp_path / "resumed.npz"
    assert main([*command, str(out)]) == 130
    chunks = chunk_folder(out)
    assert sorted(path.name for path in chunks.iterdir()) == ["chunk000000.npz", "chunk000001.npz", "run.json"]
    assert not out.exists()
    # Other settings are another run: refused, naming what differs, and the chunks kept.
    capsys.readouterr()
    assert main([*command, str(out), "--seed", "4"]) == 2
    assert capsys.readouterr().err == (f"kepler sample: error: {chunks} holds the chunks of another run (seed 3 "
                                       "there, 4 now): run with its settings to finish it, or delete the folder to "
                                       "start over\n")
    drawn.clear()
    monkeypatch.setattr(sampling, "sample_batch", lambda prior, tokenizer, index, *args, **options: drawn.append(
        index) or sample_batch(prior, tokenizer, index, *args, **options))
    assert main([*command, str(out)]) == 0
    assert drawn == [2, 3]  # the two finished chunks are read back, not drawn again
    assert np.array_equal(read_npz(out)["arr_0"], read_npz(tmp_path / "straight.npz")["arr_0"])
    assert not chunks.exists()


def test_npz_errors(prior_run, tmp_path, capsys):  # noqa: F811
    checkpoint = str(prior_run / "checkpoints" / "last.pt")
    assert main(["sample", checkpoint, "--npz", str(tmp_path / "samples.zip")]) == 2
    assert capsys.readouterr().err == f"kepler sample: error: --npz {tmp_path / 'samples.zip'}: the file name must end in .npz\n"
    assert main(["sample", checkpoint, "--class-balanced", "--npz", str(tmp_path / "s.npz")]) == 2
    assert capsys.readouterr().err == ("kepler sample: error: balanced classes were asked of an unconditional prior "
                                       "(model.num_classes=0)\n")
    with pytest.raises(SystemExit):
        main(["sample", checkpoint, "--npz", str(tmp_path / "s.npz"), "--out", str(tmp_path / "o")])
    assert "argument --out: not allowed with argument --npz" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_write_the_npz_of_one(conditional_prior, tmp_path):
    """Each batch has its own seed: which process draws it changes nothing (random classes and
    guidance included). Both runs single-threaded, as torchrun makes its processes."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    options = ["sample", str(conditional_prior), "--num-samples", "7", "--batch-size", "2", "--seed", "11",
               "--cfg-scale", "2", "--device", "cpu", "--npz"]
    launchers = {"one": [sys.executable, "-m", "kepler"],
                 "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                         "-m", "kepler"]}
    for name, launcher in launchers.items():
        proc = subprocess.run([*launcher, *options, str(tmp_path / f"{name}.npz")], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-4000:]
    one, two = read_npz(tmp_path / "one.npz"), read_npz(tmp_path / "two.npz")
    assert list(one) == list(two) == ["arr_0", "arr_1"]
    assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["arr_1"], two["arr_1"])
    assert one["arr_0"].shape == (7, 16, 16, 3)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["one.npz", "two.npz"]
