"""The prior (second stage) end to end: kepler prior train / prior eval / sample on a tiny tokenizer."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from test_train import random_images

from kepler.cli import main
from kepler.data import collate
from kepler.models import CodeTransformer
from kepler.io.checkpoint import load_checkpoint, save_checkpoint
from kepler.io.files import file_sha256
from kepler.io.config import load_prior_config
from kepler.data import held_out_set, to_uint8
from kepler.io.images import save_image_grid
from kepler.metrics import feature_statistics, frechet_distance
from kepler.metrics.generative import split_inception_scores
from kepler.metrics.inception import InceptionFeatures
from kepler.models.load import load_model, load_prior_tokenizer
from kepler.models.sampling import sample_batch, sample_images
from kepler.train import prior_eval
from kepler.train import trainer as trainer_module
from kepler.train.codes import open_stored_codes
from kepler.train.prior_eval import evaluate_prior

TOKENIZER = """
name: tok
model: {{ch: 8, ch_mult: [1, 2], num_res_blocks: 1, attn_resolutions: [], z_channels: 8, resolution: 16,
        norm_groups: 4, embed_dim: 8, quantizer: {{num_codes: 16, partitions: {partitions}}}}}
loss: {{perceptual_weight: 0.0, disc_start: 100, disc_ndf: 8, disc_num_layers: 2}}
data: {{size: 16, resize: 24, batch_size: 2, samples_per_epoch: 16, val_batch_size: 8, val_max_images: 8}}
train: {{max_steps: 2, eval_every: 2, ckpt_every: 2, log_every: 1, grid_images: 0, progress: false, threads: 1}}
"""

PRIOR = """
name: prior
seed: 3
tokenizer: {{checkpoint: {tokenizer}}}
model: {{d_model: 32, num_layers: 2, num_heads: 2, dropout: 0.1}}
data: {{size: 16, resize: 24, batch_size: 4, samples_per_epoch: 16, val_batch_size: 8, val_max_images: 8}}
optim: {{name: adamw, base_lr: 1.0e-3, scale_lr: false, betas: [0.9, 0.95]}}
train: {{max_steps: {steps}, eval_every: 2, ckpt_every: 2, log_every: 1, progress: false, threads: 1}}
"""


def train_tokenizer(folder: Path, partitions: int, seed: int = 0) -> Path:
    config = folder / f"tok{partitions}.yaml"
    config.write_text(TOKENIZER.format(partitions=partitions))
    run = folder / f"tok{partitions}_seed{seed}"
    assert main(["train", str(config), f"run_dir={run}", f"seed={seed}"]) == 0
    return run / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    """A tiny tokenizer (2 steps): 16x16 crops are 8x8 positions of 2 sub-codes, K=16."""
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"), partitions=2)


def prior_config(tmp_path: Path, tokenizer: Path, steps: int = 4) -> Path:
    path = tmp_path / f"prior{steps}.yaml"
    path.write_text(PRIOR.format(tokenizer=tokenizer, steps=steps))
    return path


def code_caches(run: Path) -> list[Path]:
    """The code cache folders of a run (one a tokenizer and data settings)."""
    return sorted((run / "codes").iterdir())


def records(run: Path, event: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["event"] == event]


@pytest.fixture(scope="module")
def prior_run(tmp_path_factory, tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("prior")
    run = folder / "run"
    assert main(["prior", "train", str(prior_config(folder, tokenizer)), f"run_dir={run}"]) == 0
    return run


def test_training_logs_bits_and_baselines_and_caches_the_codes(prior_run, tokenizer, capsys):
    assert [r["step"] for r in records(prior_run, "train")] == [1, 2, 3, 4]
    assert [r["step"] for r in records(prior_run, "eval")] == [2, 4]
    metrics = json.loads((prior_run / "metrics.json").read_text())
    for key in ("bits_per_token", "bits_per_position", "unigram_bits_per_token", "position_unigram_bits_per_token"):
        assert np.isfinite(metrics[key]) and metrics[key] > 0, key
    assert metrics["bits_per_position"] == pytest.approx(2 * metrics["bits_per_token"])  # P = 2
    assert metrics["train_maps"] == 32  # 16 crops and their flips
    assert metrics["tokens_per_map"] == 8 * 8 * 2
    # A uniform prior over K=16 codes is 4 bits a token; the histogram baselines fit the data better.
    assert metrics["unigram_bits_per_token"] < 4.0
    (cache,) = code_caches(prior_run)
    stored = open_stored_codes(cache)
    assert stored.train[:].shape == (32, 8, 8, 2) and stored.val[:].shape == (8, 8, 8, 2)
    assert stored.train[:].dtype == torch.int64 and stored.train.shards[0].dtype == np.uint8  # K=16


def test_validation_writes_the_sample_grid_of_seed_0(prior_run, tmp_path):
    assert (prior_run / "samples_step2.png").is_file() and (prior_run / "samples_step4.png").is_file()
    assert (prior_run / "samples.png").read_bytes() == (prior_run / "samples_step4.png").read_bytes()
    loaded = load_model(prior_run / "checkpoints" / "last.pt", kind="prior")
    _, images = sample_images(loaded.model, load_prior_tokenizer(loaded), 8, seed=0)  # grid_images: 8 by default
    expected = save_image_grid(images, tmp_path / "expected.png")
    assert (prior_run / "samples.png").read_bytes() == expected.read_bytes()


def test_ddp_two_gloo_processes(tmp_path, tokenizer):
    run = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "kepler", "prior", "train", str(prior_config(tmp_path, tokenizer)), f"run_dir={run}", "device=cpu"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["world_size"] == 2 and len(state["rng"]) == 2 and state["step"] == 4
    assert state["counters"]["images_seen"] == 4 * 4 * 2  # steps x batch x ranks
    assert len(code_caches(run)) == 1  # one extraction, the ranks sharing it
    assert sum(r["event"] == "train" for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())) == 4
    assert (run / "samples.png").is_file()
    metrics = json.loads((run / "metrics.json").read_text())
    assert np.isfinite(metrics["bits_per_token"]) and metrics["val_maps"] == 8


def test_a_changed_tokenizer_file_or_data_section_encodes_again(tmp_path, tokenizer):
    copy = tmp_path / "tok.pt"
    shutil.copy(tokenizer, copy)
    run = tmp_path / "run"
    config = str(prior_config(tmp_path, copy, steps=1))
    assert main(["prior", "train", config, f"run_dir={run}"]) == 0
    first = json.loads((run / "metrics.json").read_text())
    assert main(["prior", "train", config, f"run_dir={run}", "--overwrite"]) == 0
    assert len(code_caches(run)) == 1  # the same tokenizer and data: read back
    # Encoding does not draw from the seeded RNG: the rerun from the cache is the same run.
    assert json.loads((run / "metrics.json").read_text())["bits_per_token"] == first["bits_per_token"]
    state = load_checkpoint(copy)
    state["step"] += 1  # other bytes, same weights
    save_checkpoint(state, copy)
    assert main(["prior", "train", config, f"run_dir={run}", "--overwrite"]) == 0
    assert main(["prior", "train", config, f"run_dir={run}", "data.val_max_images=4", "--overwrite"]) == 0
    assert len(code_caches(run)) == 3


def test_resume_continues_exactly(tmp_path, tokenizer, monkeypatch):
    """Dropout draws from torch's RNG every step, so the steps after the resume point are the same only
    when the RNG state is restored (checked: without it they are not)."""
    straight, halves, unrestored = tmp_path / "straight", tmp_path / "halves", tmp_path / "unrestored"
    assert main(["prior", "train", str(prior_config(tmp_path, tokenizer, steps=4)), f"run_dir={straight}"]) == 0
    for run in (halves, unrestored):
        assert main(["prior", "train", str(prior_config(tmp_path, tokenizer, steps=2)), f"run_dir={run}"]) == 0
    assert main(["prior", "train", str(prior_config(tmp_path, tokenizer, steps=4)), f"run_dir={halves}",
                 "--resume"]) == 0
    a = load_checkpoint(straight / "checkpoints" / "last.pt")
    b = load_checkpoint(halves / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 4
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert [r["loss"] for r in records(straight, "train")] == [r["loss"] for r in records(halves, "train")]
    monkeypatch.setattr(trainer_module, "restore_rng", lambda state: None)
    assert main(["prior", "train", str(prior_config(tmp_path, tokenizer, steps=4)), f"run_dir={unrestored}",
                 "--resume"]) == 0
    assert [r["loss"] for r in records(unrestored, "train")][2:] != [r["loss"] for r in records(straight, "train")][2:]


def test_sampling_is_deterministic_for_a_seed(prior_run, tmp_path, capsys):
    checkpoint = str(prior_run / "checkpoints" / "last.pt")
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        assert main(["sample", checkpoint, "--num", "3", "--seed", seed, "--top-k", "8", "--device", "cpu",
                     "--out", str(tmp_path / name)]) == 0
    assert "3 samples (seed 7)" in capsys.readouterr().out
    a, b, c = ([np.load(tmp_path / name / f"sample{i:04d}.npy") for i in range(3)] for name in "abc")
    assert a[0].shape == (8, 8, 2) and a[0].dtype == np.int64 and all(0 <= m.min() and m.max() < 16 for m in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, z) for x, z in zip(a, c))
    assert (tmp_path / "a" / "grid.png").is_file() and (tmp_path / "a" / "sample0002.png").is_file()
    assert (tmp_path / "a" / "sample0000.png").read_bytes() == (tmp_path / "b" / "sample0000.png").read_bytes()


def test_eval_prints_and_writes_the_metrics(prior_run, tmp_path, capsys):
    out, weights = tmp_path / "eval", tmp_path / "no_inception.pth"
    assert main(["prior", "eval", str(prior_run / "checkpoints" / "last.pt"), "--device", "cpu", "--out", str(out),
                 "--inception", str(weights), "--num-samples", "16"]) == 0
    printed = capsys.readouterr().out
    assert "bits/token" in printed and "per-position unigram" in printed
    assert f"  FID: off: no weights at {weights}\n  Inception Score: off: no weights at {weights}\n" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["fid_off_reason"] == metrics["is_off_reason"] == f"no weights at {weights}"
    assert "fid" not in metrics and "inception_score" not in metrics
    trained = json.loads((prior_run / "metrics.json").read_text())
    for key in ("bits_per_token", "bits_per_position", "unigram_bits_per_token", "position_unigram_bits_per_token"):
        assert metrics[key] == pytest.approx(trained[key]), key  # the same held-out maps and weights
    assert metrics["step"] == 4 and metrics["val_maps"] == 8


def test_errors_are_one_line(prior_run, tokenizer, tmp_path, capsys):
    checkpoint = str(prior_run / "checkpoints" / "last.pt")
    missing = tmp_path / "nowhere.pt"
    assert main(["prior", "train", str(prior_config(tmp_path, missing))]) == 2
    assert capsys.readouterr().err == (f"kepler prior: error: config key 'tokenizer.checkpoint': tokenizer {missing} "
                                       "does not exist\n")
    with pytest.raises(ValueError, match="config key 'tokenizer.checkpoint' is not set"):
        load_prior_config(None)

    assert main(["sample", checkpoint, "--class", "2", "--out", str(tmp_path / "s")]) == 2
    assert capsys.readouterr().err == ("kepler sample: error: a class (2) was given, but the prior is unconditional "
                                       "(model.num_classes=0)\n")

    # A prior whose tokenizer file was replaced (by one with another layout: 4 sub-codes a position).
    copy = tmp_path / "tok.pt"
    shutil.copy(tokenizer, copy)
    run = tmp_path / "run"
    assert main(["prior", "train", str(prior_config(tmp_path, copy, steps=1)), f"run_dir={run}"]) == 0
    prior_checkpoint = run / "checkpoints" / "last.pt"
    trained_on = file_sha256(copy)
    assert load_checkpoint(prior_checkpoint)["tokenizer"]["sha256"] == trained_on
    shutil.copy(train_tokenizer(tmp_path, partitions=4), copy)
    capsys.readouterr()
    for command in (["sample", str(prior_checkpoint), "--out", str(tmp_path / "s")],
                    ["prior", "eval", str(prior_checkpoint), "--num-samples", "0"]):
        assert main(command) == 2
        assert capsys.readouterr().err == (
            f"kepler {command[0]}: error: tokenizer {copy} has SHA-256 {file_sha256(copy)}, but checkpoint "
            f"{prior_checkpoint} was trained on a tokenizer with SHA-256 {trained_on}: its codes would be decoded by "
            "another model\n"
        )
    copy.unlink()
    assert main(["sample", str(prior_checkpoint), "--out", str(tmp_path / "s")]) == 2
    assert capsys.readouterr().err == (f"kepler sample: error: tokenizer {copy} of checkpoint {prior_checkpoint} "
                                       "does not exist (moved? give its new path with --tokenizer)\n")


def test_a_prior_finds_its_tokenizer_by_absolute_path_and_hash(tmp_path, tokenizer, capsys, monkeypatch):
    """The tokenizer path is stored absolute (a relative one would pick another runs/... from another
    folder); --tokenizer re-points a prior at a moved copy, which must have the recorded hash; and
    --resume refuses a changed tokenizer before it encodes anything."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(tokenizer, tmp_path / "tok.pt")
    config = prior_config(tmp_path, "tok.pt", steps=1)  # relative to the working folder
    run = tmp_path / "run"
    assert main(["prior", "train", str(config), f"run_dir={run}"]) == 0
    prior_checkpoint = run / "checkpoints" / "last.pt"
    assert load_checkpoint(prior_checkpoint)["tokenizer"]["checkpoint"] == str((tmp_path / "tok.pt").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(tokenizer, elsewhere / "tok.pt")  # another folder's tok.pt: the same relative name
    monkeypatch.chdir(elsewhere)
    assert main(["sample", str(prior_checkpoint), "--num", "2", "--out", str(tmp_path / "a")]) == 0
    moved = tmp_path / "moved.pt"
    (tmp_path / "tok.pt").rename(moved)
    assert main(["sample", str(prior_checkpoint), "--num", "2", "--tokenizer", str(moved), "--out",
                 str(tmp_path / "b")]) == 0
    assert np.array_equal(np.load(tmp_path / "a" / "sample0000.npy"), np.load(tmp_path / "b" / "sample0000.npy"))
    other = train_tokenizer(tmp_path, partitions=2, seed=9)
    capsys.readouterr()
    assert main(["sample", str(prior_checkpoint), "--tokenizer", str(other), "--out", str(tmp_path / "c")]) == 2
    assert f"tokenizer {other} has SHA-256 {file_sha256(other)}, but checkpoint" in capsys.readouterr().err
    # --resume with another tokenizer file: refused before a second code cache is written.
    shutil.copy(other, moved)
    resumed = prior_config(tmp_path, moved, steps=2)
    assert main(["prior", "train", str(resumed), f"run_dir={run}", "--resume"]) == 2
    assert capsys.readouterr().err == (
        f"kepler prior: error: --resume: the checkpoint was trained on a tokenizer with SHA-256 "
        f"{file_sha256(tokenizer)}, but tokenizer.checkpoint {moved} has SHA-256 {file_sha256(other)}: resuming "
        "would train the prior on another tokenizer's codes\n"
    )
    assert len(code_caches(run)) == 1


def test_builtin_prior_configs_load_and_default_to_adamw(tokenizer):
    for name in ("prior_sample", "celebahq_prior", "prior_faces_cond"):
        cfg = load_prior_config(name, [f"tokenizer.checkpoint={tokenizer}"])
        assert cfg.optim.name == "adamw" and cfg.model.order == "flat", name
    assert load_prior_config(None, [f"tokenizer.checkpoint={tokenizer}"]).optim.betas == [0.9, 0.95]
    with pytest.raises(ValueError, match="config key 'model.order' must be one of flat, factorized, got 'raster'"):
        load_prior_config(None, [f"tokenizer.checkpoint={tokenizer}", "model.order=raster"])


# ------------------------------------------------------------------ class-conditional priors

FACES = ["data.train=faces", "data.val=faces", "data.val_max_images=20"]  # 10 faces then 10 non-faces
CONDITIONAL = [*FACES, "model.num_classes=2"]


@pytest.fixture(scope="module")
def conditional_runs(tmp_path_factory, tokenizer) -> tuple[Path, Path]:
    """A class-conditional prior on the faces (class 1) and non-faces (0): 4 steps straight, and 2 steps
    then resumed to 4."""
    folder = tmp_path_factory.mktemp("conditional")
    straight, halves = folder / "straight", folder / "halves"
    assert main(["prior", "train", str(prior_config(folder, tokenizer, 4)), f"run_dir={straight}", *CONDITIONAL]) == 0
    assert main(["prior", "train", str(prior_config(folder, tokenizer, 2)), f"run_dir={halves}", *CONDITIONAL]) == 0
    assert main(["prior", "train", str(prior_config(folder, tokenizer, 4)), f"run_dir={halves}", *CONDITIONAL,
                 "--resume"]) == 0
    return straight, halves


def test_conditional_prior_trains_on_both_classes_and_resumes_exactly(conditional_runs):
    straight, halves = conditional_runs
    (cache,) = code_caches(straight)
    stored = open_stored_codes(cache)
    assert stored.train[:].shape == (360, 8, 8, 2)  # 180 patches and their flips
    assert stored.train_labels[:].tolist() == ([1] * 90 + [0] * 90) * 2
    assert stored.val_labels[:].tolist() == [1] * 10 + [0] * 10
    a = load_checkpoint(straight / "checkpoints" / "last.pt")
    b = load_checkpoint(halves / "checkpoints" / "last.pt")
    assert a["model"]["start_embedding.weight"].shape == (3, 32)  # the two classes, then the null class
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert [r["loss"] for r in records(straight, "train")] == [r["loss"] for r in records(halves, "train")]
    # A class that never reached a batch keeps a zero row in the start-token table's first moment
    # (AdamW's decay is outside it).
    names = [name for name, _ in load_model(straight / "checkpoints" / "last.pt").model.named_parameters()]
    first_moment = a["opt"]["state"][names.index("start_embedding.weight")]["exp_avg"]
    assert first_moment.shape == (3, 32) and all(row.abs().sum() > 0 for row in first_moment)
    metrics = json.loads((straight / "metrics.json").read_text())
    assert metrics["val_maps"] == 20 and np.isfinite(metrics["bits_per_token"])


@pytest.fixture
def generated_classes(monkeypatch) -> list:
    """The ``class_labels`` of every ``CodeTransformer.generate`` call in the test, in order."""
    asked = []
    generate = CodeTransformer.generate

    def spy(model, num, class_labels=None, **options):
        asked.append(class_labels)
        return generate(model, num, class_labels, **options)

    monkeypatch.setattr(CodeTransformer, "generate", spy)
    return asked


def test_conditional_prior_samples_a_class_and_evaluates_with_the_labels(conditional_runs, tmp_path, capsys,
                                                                        generated_classes):
    straight, _ = conditional_runs
    checkpoint = str(straight / "checkpoints" / "last.pt")
    asked = generated_classes
    for name, label in (("face", "1"), ("again", "1"), ("background", "0")):
        assert main(["sample", checkpoint, "--num", "3", "--class", label, "--seed", "5", "--device", "cpu",
                     "--out", str(tmp_path / name)]) == 0
    assert asked == [1, 1, 0]
    face, again = ([np.load(tmp_path / name / f"sample{i:04d}.npy") for i in range(3)] for name in ("face", "again"))
    assert all(np.array_equal(x, y) for x, y in zip(face, again))
    # The trained prior tells the classes apart: the held-out maps are likelier under their own labels.
    prior = load_model(checkpoint, kind="prior").model
    stored = open_stored_codes(code_caches(straight)[0])
    val, val_labels = stored.val[:], stored.val_labels[:]
    own, swapped = (prior.nll(val, labels).sum() for labels in (val_labels, 1 - val_labels))
    assert own < swapped
    assert main(["prior", "eval", checkpoint, "--device", "cpu", "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["bits_per_token"] == pytest.approx(json.loads((straight / "metrics.json").read_text())["bits_per_token"])

    capsys.readouterr()
    assert main(["sample", checkpoint, "--class", "2", "--out", str(tmp_path / "s")]) == 2
    assert capsys.readouterr().err == "kepler sample: error: class 2 is out of range: the prior has 2 classes, 0 to 1\n"
    assert main(["sample", checkpoint, "--class", "-1", "--out", str(tmp_path / "s")]) == 2
    assert capsys.readouterr().err == "kepler sample: error: class -1 is out of range: the prior has 2 classes, 0 to 1\n"
    assert main(["sample", checkpoint, "--out", str(tmp_path / "s")]) == 2
    assert capsys.readouterr().err == ("kepler sample: error: the prior is class-conditional (model.num_classes=2): "
                                       "give a class from 0 to 1\n")


def test_labels_change_the_cache_and_an_unconditional_prior_ignores_them(tmp_path, tokenizer):
    run = tmp_path / "run"
    config = str(prior_config(tmp_path, tokenizer, steps=1))
    assert main(["prior", "train", config, f"run_dir={run}", *FACES]) == 0
    (unconditional,) = code_caches(run)
    assert open_stored_codes(unconditional).train_labels is None
    assert main(["prior", "train", config, f"run_dir={run}", *CONDITIONAL, "--overwrite"]) == 0
    (conditional,) = set(code_caches(run)) - {unconditional}
    assert open_stored_codes(conditional).train_labels[:].shape == (360,)


def test_num_classes_must_match_the_data(tmp_path, tokenizer, capsys):
    config = str(prior_config(tmp_path, tokenizer, steps=1))
    assert main(["prior", "train", config, f"run_dir={tmp_path / 'a'}", *FACES, "model.num_classes=3"]) == 2
    assert capsys.readouterr().err == ("kepler prior: error: config key 'model.num_classes' is 3, but data.train "
                                       "'faces' has 2 classes\n")
    assert main(["prior", "train", config, f"run_dir={tmp_path / 'b'}", "model.num_classes=2"]) == 2
    assert capsys.readouterr().err == ("kepler prior: error: config key 'model.num_classes' is 2, but data.train "
                                       "'sample' has no class labels (labelled data: faces, a folder of class folders or a list "
                                       "file of path<TAB>label lines); use model.num_classes=0 for an unconditional "
                                       "prior\n")
    assert main(["prior", "train", config, f"run_dir={tmp_path / 'c'}", "data.train=faces", "model.num_classes=2"]) == 2
    assert capsys.readouterr().err.startswith("kepler prior: error: config key 'model.num_classes' is 2, but "
                                              "data.val 'sample' has no class labels")


# ------------------------------------------------------------------ FID and Inception Score of samples


class RecordingFeatures(nn.Module):
    """A stand-in for the Inception network: keeps what it is handed; its features are the images'
    channel means and spreads (in [0, 1] units, so that as logits none is a certainty)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, images):
        self.seen.append(images.clone())
        images = images.float() / 255
        features = torch.cat([images.mean(dim=(2, 3)), images.std(dim=(2, 3))], dim=1)
        return InceptionFeatures(pool=features, spatial=features, logits=features)


@pytest.fixture
def stand_in_metrics(monkeypatch, tmp_path):
    """``load_inception_network`` replaced by :class:`RecordingFeatures`; yields the weights path it
    expects and the networks it made."""
    weights = tmp_path / "inception.pth"
    made = []

    def load(path):
        assert path == weights
        made.append(RecordingFeatures())
        return made[-1], None

    monkeypatch.setattr(prior_eval, "load_inception_network", load)
    return weights, made


def test_samples_and_held_out_images_reach_fid_and_inception_score(prior_run, stand_in_metrics):
    weights, made = stand_in_metrics
    checkpoint = prior_run / "checkpoints" / "last.pt"
    metrics = evaluate_prior(checkpoint, batch_size=5, num_samples=12, inception_path=weights, seed=1)
    (network,) = made
    # The 8 held-out images, then the 12 samples, in batches of 5, as the uint8 images they are saved as.
    assert [len(x) for x in network.seen] == [5, 3, 5, 5, 2]
    assert all(x.dtype == torch.uint8 and x.shape[1:] == (3, 16, 16) for x in network.seen)
    loaded = load_model(checkpoint, kind="prior")
    held_out, _ = collate([item for item in held_out_set(loaded.config["data"])])

    def uint8(images):
        return torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2)

    assert torch.equal(torch.cat(network.seen[:2]), uint8(held_out))
    _, first, _ = sample_batch(loaded.model, load_prior_tokenizer(loaded), 0, 12, batch_size=5, seed=1)
    assert torch.equal(network.seen[2], uint8(first))
    # The metrics are those of kepler.metrics on the stand-in's features.
    real, fake = (network(torch.cat(seen)).pool for seen in (network.seen[:2], network.seen[2:]))
    assert metrics["fid"] == pytest.approx(frechet_distance(*feature_statistics(fake), *feature_statistics(real)))
    scores = split_inception_scores(fake, 10)
    assert metrics["inception_score"] == pytest.approx([scores.mean(), scores.std(ddof=1)])
    assert metrics["inception_score"][0] >= 1 and "fid_off_reason" not in metrics and "is_off_reason" not in metrics
    again = evaluate_prior(checkpoint, batch_size=5, num_samples=12, inception_path=weights, seed=1)
    assert (again["fid"], again["inception_score"]) == (metrics["fid"], metrics["inception_score"])


def test_sample_metrics_say_why_they_are_off(prior_run, stand_in_metrics, tmp_path, capsys):
    weights, made = stand_in_metrics
    checkpoint = prior_run / "checkpoints" / "last.pt"
    metrics = evaluate_prior(checkpoint, num_samples=0, inception_path=weights)
    assert metrics["fid_off_reason"] == "num_samples is 0; FID needs at least 2 samples"
    assert metrics["is_off_reason"] == "num_samples is 0; the Inception Score needs at least 10 (one per split)"
    assert made == []  # no weights read, no samples drawn
    metrics = evaluate_prior(checkpoint, num_samples=4, inception_path=weights)
    assert "fid" in metrics and metrics["is_off_reason"].startswith("num_samples is 4;")
    with pytest.raises(ValueError, match="num_samples must be an int >= 0, got -1"):
        evaluate_prior(checkpoint, num_samples=-1)
    assert main(["prior", "eval", str(checkpoint), "--num-samples", "-1", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "kepler prior: error: --num-samples must be >= 0, got -1\n"


def test_off_a_terminal_sampling_shows_progress_as_plain_lines(prior_run, stand_in_metrics, tmp_path, capsys, caplog):
    """stderr is no terminal under pytest, as in a cluster's log: kepler sample and the samples of
    kepler prior eval report progress in plain lines (about ten over the loop), no bar."""
    caplog.set_level(logging.INFO, logger="kepler")
    weights, _ = stand_in_metrics
    checkpoint = prior_run / "checkpoints" / "last.pt"
    assert main(["sample", str(checkpoint), "--num", "5", "--batch-size", "2", "--out", str(tmp_path / "s")]) == 0
    evaluate_prior(checkpoint, batch_size=5, num_samples=12, inception_path=weights)
    assert "\r" not in capsys.readouterr().err
    shown = [m for m in caplog.messages if " samples, " in m]
    pattern = (r"(kepler sample|prior eval: samples for FID and IS): (\d+)/(\d+) samples, "
               r"\d+\.\d (samples/s|s/sample), ETA \d+:\d\d:\d\d")
    assert all(re.fullmatch(pattern, m) for m in shown), shown
    assert [re.fullmatch(pattern, m).group(2, 3) for m in shown] == [
        ("2", "5"), ("4", "5"), ("5", "5"), ("5", "12"), ("10", "12"), ("12", "12")]


def test_conditional_samples_take_the_held_out_classes_in_turn(conditional_runs, stand_in_metrics, generated_classes):
    weights, _ = stand_in_metrics
    asked = generated_classes
    straight, _ = conditional_runs
    evaluate_prior(straight / "checkpoints" / "last.pt", batch_size=8, num_samples=12, inception_path=weights)
    assert torch.cat(asked).tolist() == [1] * 10 + [0] * 2  # the held-out set: 10 faces, then 10 non-faces


def test_an_unreadable_held_out_image_is_left_out_of_the_priors_held_out_maps(tmp_path, tokenizer):
    """The prior's held-out maps count each readable image once: an unreadable one is left out, not
    replaced by its neighbour (whose map would count twice), in training and in kepler prior eval."""
    val = random_images(tmp_path / "val", count=3, seed=4)
    (val / "img3.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="skipping unreadable image .*img3.png"):
        assert main(["prior", "train", str(prior_config(tmp_path, tokenizer, steps=1)), f"run_dir={run}",
                     f"data.val={val}", "data.val_max_images=null"]) == 0
    assert json.loads((run / "metrics.json").read_text())["val_maps"] == 3
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        assert evaluate_prior(run / "checkpoints" / "last.pt", num_samples=0)["val_maps"] == 3


def test_sampling_any_number_goes_a_batch_at_a_time(prior_run, tmp_path, capsys, monkeypatch):
    """--num 10**9 allocated every map at once; samples are now drawn --batch-size at a time (files
    written as they come, the grid of the first 64), the same for the same seed and batch size."""
    drawn = []
    generate = CodeTransformer.generate
    monkeypatch.setattr(CodeTransformer, "generate", lambda model, num, *a, **k: drawn.append(num) or generate(
        model, num, *a, **k))
    checkpoint = str(prior_run / "checkpoints" / "last.pt")
    for name in ("a", "b"):
        assert main(["sample", checkpoint, "--num", "5", "--batch-size", "2", "--seed", "3", "--out",
                     str(tmp_path / name)]) == 0
    assert drawn == [2, 2, 1] * 2
    a, b = ([np.load(tmp_path / name / f"sample{i:04d}.npy") for i in range(5)] for name in "ab")
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert len(list((tmp_path / "a").glob("sample*.png"))) == 5 and (tmp_path / "a" / "grid.png").is_file()
    capsys.readouterr()
    assert main(["sample", checkpoint, "--temperature", "inf", "--out", str(tmp_path / "c")]) == 2
    assert capsys.readouterr().err == "kepler sample: error: temperature must be a finite number > 0, got inf\n"
    with pytest.raises(SystemExit):
        main(["sample", checkpoint, "--seed", "99999999999999999999999", "--out", str(tmp_path / "c")])
    assert "argument --seed: expected an integer from 0 to 2**63 - 1, got 99999999999999999999999" in \
        capsys.readouterr().err


def test_a_prior_with_ema_on_an_ema_tokenizer(tmp_path, capsys):
    """train.ema_decay on both stages: the prior is trained on the EMA tokenizer's codes and records so;
    its validation, kepler prior eval and kepler sample use its EMA weights (--raw-weights: its trained
    ones) and always the tokenizer weights it was trained on."""
    config = tmp_path / "tok.yaml"
    config.write_text(TOKENIZER.format(partitions=2))
    tok_run = tmp_path / "tok"
    assert main(["train", str(config), f"run_dir={tok_run}", "train.ema_decay=0.5", "optim.base_lr=1e-2"]) == 0
    tokenizer = tok_run / "checkpoints" / "last.pt"
    run = tmp_path / "prior"
    assert main(["prior", "train", str(prior_config(tmp_path, tokenizer, steps=2)), f"run_dir={run}",
                 "train.ema_decay=0.5"]) == 0
    assert "held-out maps, EMA weights)" in capsys.readouterr().out
    checkpoint = run / "checkpoints" / "last.pt"
    state = torch.load(checkpoint, weights_only=True)
    assert state["tokenizer"]["weights"] == "ema" and set(state["ema"]) == set(state["model"])
    tok_state = torch.load(tokenizer, weights_only=True)
    loaded_tokenizer = load_prior_tokenizer(load_model(checkpoint, raw_weights=True))
    assert torch.equal(loaded_tokenizer.decoder.conv_out.weight, tok_state["ema"]["decoder.conv_out.weight"])

    trained = json.loads((run / "metrics.json").read_text())
    assert trained["weights"] == "ema"
    for flag, weights, printed in (([], "ema", "EMA"), (["--raw-weights"], "trained", "trained")):
        out = tmp_path / f"eval_{weights}"
        assert main(["prior", "eval", str(checkpoint), "--device", "cpu", "--out", str(out), "--num-samples", "0",
                     *flag]) == 0
        assert f"(step 2, prior's {printed} weights, tokenizer's EMA weights)" in capsys.readouterr().out
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["weights"] == weights and metrics["tokenizer_weights"] == "ema"
        # The validation in training measured the EMA weights: prior eval of them gives its figures.
        same = metrics["bits_per_token"] == pytest.approx(trained["bits_per_token"], rel=1e-9)
        assert same == (weights == "ema"), (metrics["bits_per_token"], trained["bits_per_token"])
        assert main(["sample", str(checkpoint), "--num", "2", "--device", "cpu", "--out", str(tmp_path / weights),
                     *flag]) == 0
        assert f"prior's {printed} weights, tokenizer's EMA weights" in capsys.readouterr().out
