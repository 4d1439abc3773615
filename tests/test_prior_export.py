"""Exported priors: kepler export and CodeTransformer.save_pretrained / from_pretrained round trip bit
for bit, carry their tokenizer (refused when it is another), and kepler sample takes the folder."""

import shutil

import numpy as np
import pytest
import torch
import yaml
from test_prior_train import FACES, prior_config, tokenizer, train_tokenizer  # noqa: F401 (tokenizer: a fixture)

from kepler.cli import main
from kepler.io.config import defaults
from kepler.io.files import file_sha256
from kepler.io.pretrained import CARD_FILE, CONFIG_FILE, PRIOR_TOKENIZER, WEIGHTS_FILE
from kepler.models import CodeTransformer, VQModel
from kepler.models.load import load_model, load_prior_tokenizer


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):  # noqa: F811 (the fixture imported above)
    """A class-conditional prior with EMA weights (2 steps) on the faces, and its export."""
    folder = tmp_path_factory.mktemp("export")
    run = folder / "run"
    assert main(["prior", "train", str(prior_config(folder, tokenizer, 2)), f"run_dir={run}", *FACES,
                 "model.num_classes=2", "train.ema_decay=0.5"]) == 0
    checkpoint = run / "checkpoints" / "last.pt"
    assert main(["export", str(checkpoint), "--out", str(folder / "prior")]) == 0
    return checkpoint, folder / "prior"


def test_export_round_trips_bit_for_bit_with_its_tokenizer(exported, tokenizer, capsys):  # noqa: F811
    checkpoint, folder = exported
    assert sorted(path.name for path in folder.iterdir()) == sorted([CARD_FILE, CONFIG_FILE, PRIOR_TOKENIZER,
                                                                     WEIGHTS_FILE])
    trained = load_model(checkpoint)  # its EMA weights, as exported
    prior = CodeTransformer.from_pretrained(folder)
    expected, got = trained.model.state_dict(), prior.state_dict()
    assert list(got) == list(expected) and not prior.training
    assert all(torch.equal(got[key], expected[key]) and got[key].dtype == expected[key].dtype for key in expected)
    assert prior.config == trained.model.config and prior.null_class == 2
    assert list(prior.config) == list(defaults("prior")["model"])  # every config key, nothing else
    manifest = yaml.safe_load((folder / CONFIG_FILE).read_text())
    assert manifest["kind"] == "prior" and manifest["ema_decay"] == 0.5 and manifest["step"] == 2
    assert manifest["model"]["class_dropout"] == 0.1  # resolved: the folder does not depend on today's default
    record = manifest["tokenizer"]
    assert record["sha256"] == file_sha256(folder / PRIOR_TOKENIZER) and record["weights"] == "trained"
    assert record["layout"] == {"height": 8, "width": 8, "tokens_per_position": 2, "codebook_size": 16,
                                "shared_codebook": True}
    # The tokenizer inside is the one the prior was trained on, weight for weight.
    inside = load_prior_tokenizer(load_model(folder))
    original = load_model(tokenizer).model
    assert all(torch.equal(value, original.state_dict()[key]) for key, value in inside.state_dict().items())
    card = (folder / CARD_FILE).read_text()
    assert "a kepler code prior" in card and "| bits_per_token |" in card and "| unigram_bits_per_token |" in card
    assert "2 classes (class dropout 0.1 to a learned null class" in card
    assert f"`{PRIOR_TOKENIZER}/`: the tokenizer (an exported tokenizer folder), SHA-256 `{record['sha256']}`" in card
    assert "## Held-out metrics" in (folder / PRIOR_TOKENIZER / CARD_FILE).read_text()  # its own run's


def test_kepler_sample_takes_the_folder(exported, tmp_path):
    checkpoint, folder = exported
    for name, source in (("checkpoint", checkpoint), ("folder", folder)):
        assert main(["sample", str(source), "--num", "3", "--class", "1", "--cfg-scale", "2", "--seed", "4",
                     "--device", "cpu", "--out", str(tmp_path / name)]) == 0
    for index in range(3):
        assert np.array_equal(np.load(tmp_path / "checkpoint" / f"sample{index:04d}.npy"),
                              np.load(tmp_path / "folder" / f"sample{index:04d}.npy"))
    # A copy of the tokenizer folder elsewhere serves as well (the same SHA-256).
    shutil.copytree(folder / PRIOR_TOKENIZER, tmp_path / "tok_copy")
    assert main(["sample", str(folder), "--num", "1", "--class", "0", "--tokenizer", str(tmp_path / "tok_copy"),
                 "--out", str(tmp_path / "copy")]) == 0


def test_another_tokenizer_or_changed_weights_are_refused(exported, tmp_path, capsys):
    _, original = exported
    folder = tmp_path / "prior"
    shutil.copytree(original, folder)
    recorded = file_sha256(folder / PRIOR_TOKENIZER)
    other = train_tokenizer(tmp_path, partitions=2, seed=9)  # the same layout, other weights
    shutil.rmtree(folder / PRIOR_TOKENIZER)
    assert main(["export", str(other), "--out", str(folder / PRIOR_TOKENIZER)]) == 0
    capsys.readouterr()
    assert main(["sample", str(folder), "--class", "0", "--out", str(tmp_path / "s")]) == 2
    assert capsys.readouterr().err == (
        f"kepler sample: error: tokenizer {folder / PRIOR_TOKENIZER} has SHA-256 {file_sha256(folder / PRIOR_TOKENIZER)}"
        f", but pretrained model {folder} was trained on a tokenizer with SHA-256 {recorded}: its codes would be "
        "decoded by another model\n")
    weights = folder / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(ValueError, match=f"^{weights}: SHA-256 [0-9a-f]{{64}} is not the [0-9a-f]{{64}} recorded in "
                                         f"{CONFIG_FILE} \\(the file was changed or damaged\\)$"):
        CodeTransformer.from_pretrained(folder)


def test_a_prior_folder_is_a_prior(exported, tmp_path, capsys):
    _, folder = exported
    with pytest.raises(ValueError) as error:
        VQModel.from_pretrained(folder)
    assert str(error.value) == (f"pretrained model {folder} is a prior (CodeTransformer), not a tokenizer; a prior is "
                                "for kepler sample and kepler prior eval")
    assert main(["prior", "eval", str(folder), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"kepler prior: error: pretrained model {folder} is an exported prior: kepler "
                                       "prior eval takes the training checkpoint it was exported from (its baselines "
                                       "need the training maps' code counts)\n")
    config = yaml.safe_load((folder / CONFIG_FILE).read_text())
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    (copy / CONFIG_FILE).write_text(yaml.safe_dump({**config, "kind": "lpips"}))
    with pytest.raises(ValueError, match=f"^{copy / CONFIG_FILE}: 'kind' must be one of tokenizer, prior, got 'lpips'$"):
        load_model(copy)


def test_save_pretrained_needs_the_tokenizer_of_the_priors_codes(exported, tmp_path):
    checkpoint, _ = exported
    loaded = load_model(checkpoint)
    prior, tokenizer = loaded.model, load_prior_tokenizer(loaded)  # noqa: F811
    folder = prior.save_pretrained(tmp_path / "api", tokenizer, step=2)
    again = load_model(folder)
    assert again.step == 2 and again.weights == "trained" and again.config["data"] == {}
    assert all(torch.equal(value, prior.state_dict()[key]) for key, value in again.model.state_dict().items())
    assert "No held-out bits were recorded with this model." in (folder / CARD_FILE).read_text()
    with pytest.raises(ValueError, match="^a prior is saved with its tokenizer \\(the VQModel whose index maps it "
                                         "models\\), got tokenizer=NoneType$"):
        prior.save_pretrained(tmp_path / "none", None)
    four = load_model(train_tokenizer(tmp_path, partitions=4)).model
    with pytest.raises(ValueError, match=r"^the tokenizer makes index maps of CodeLayout\(height=8, width=8, "
                                         r"tokens_per_position=4, .*\), but the prior models CodeLayout\(height=8, "
                                         r"width=8, tokens_per_position=2, .*\)$"):
        prior.save_pretrained(tmp_path / "four", four)
    with pytest.raises(ValueError, match="^tokenizer is a prior's: a tokenizer is saved alone$"):
        tokenizer.save_pretrained(tmp_path / "tok", tokenizer=tokenizer)
