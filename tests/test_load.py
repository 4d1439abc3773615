"""kepler.load, the one loader: every form a model arrives in, files written before the loaders moved,
the kind a command needs, and a saved backend that cannot run where the model is loaded."""

import logging
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import kepler
from kepler.cli import main
from kepler.io.pretrained import CONFIG_FILE
from kepler.models import CodeTransformer, VQModel
from kepler.models.load import load_model, load_prior_tokenizer

LEGACY = Path(__file__).resolve().parent / "data" / "legacy_main"


@pytest.fixture(scope="module")
def reference():
    return torch.load(LEGACY / "reference.pt", weights_only=True)


@pytest.mark.parametrize("form, path", [("checkpoint", "tok/checkpoints/last.pt"), ("export", "tok_export")])
def test_models_written_before_the_move_load_and_compute_the_same(form, path, reference):
    model = kepler.load(LEGACY / path)
    assert isinstance(model, VQModel) and not model.training
    with torch.no_grad():
        reconstruction, _, info = model(reference["x"])
    assert torch.equal(info.indices, reference[f"{form}_indices"])
    # Not to the bit: float32 convolutions round differently with the thread count (their blocking),
    # which other tests change; 1e-5 is a few hundred float32 roundings of values near 1.
    torch.testing.assert_close(reconstruction, reference[f"{form}_reconstruction"], rtol=0, atol=1e-5)


def test_a_prior_written_before_the_move_loads_with_its_tokenizer(reference, monkeypatch):
    monkeypatch.chdir(LEGACY)  # its tokenizer path is relative, as priors recorded it then
    prior = load_model("prior/checkpoints/last.pt", kind="prior")
    assert isinstance(prior.model, CodeTransformer) and prior.step == 2 and not prior.model.training
    with torch.no_grad():
        torch.testing.assert_close(prior.model.nll(reference["checkpoint_indices"]), reference["prior_nats"],
                                   rtol=0, atol=1e-9)
    tokenizer = load_prior_tokenizer(prior)
    assert not any(p.requires_grad for p in tokenizer.parameters())
    with torch.no_grad():
        assert torch.equal(tokenizer.encode_to_indices(reference["x"]), reference["checkpoint_indices"])


def test_what_each_form_reads_beside_the_model():
    checkpoint = load_model(LEGACY / "tok" / "checkpoints" / "last.pt", kind="tokenizer")
    export = load_model(LEGACY / "tok_export", kind="tokenizer")
    assert checkpoint.kind == export.kind == "tokenizer" and checkpoint.step == export.step == 2
    assert checkpoint.config["data"] == export.config["data"] and checkpoint.config["data"]["size"] == 16
    assert checkpoint.source == f"checkpoint {LEGACY / 'tok' / 'checkpoints' / 'last.pt'}"
    assert "opt_ae" in checkpoint.checkpoint and export.checkpoint == {}
    prior = load_model(LEGACY / "prior" / "checkpoints" / "last.pt")
    assert prior.kind == "prior" and set(prior.checkpoint["tokenizer"]) == {"checkpoint", "sha256", "layout"}
    # Written before train.ema_decay: no "ema" entry, the trained weights, with or without raw_weights.
    assert checkpoint.weights == export.weights == prior.weights == "trained"
    raw = load_model(LEGACY / "tok" / "checkpoints" / "last.pt", raw_weights=True)
    assert raw.weights == "trained"
    for name, value in raw.model.state_dict().items():
        assert torch.equal(value, checkpoint.model.state_dict()[name]), name


def test_the_wrong_kind_says_what_the_file_is(tmp_path, capsys):
    prior = LEGACY / "prior" / "checkpoints" / "last.pt"
    with pytest.raises(ValueError) as error:
        load_model(prior, kind="tokenizer")
    assert str(error.value) == (f"checkpoint {prior} is a prior (CodeTransformer), not a tokenizer; a prior is for "
                                "kepler sample and kepler prior eval")
    assert main(["encode", str(prior), str(tmp_path / "x.png"), "--out", str(tmp_path)]) == 2
    assert "is a prior (CodeTransformer), not a tokenizer" in capsys.readouterr().err
    tokenizer = LEGACY / "tok_export"
    assert main(["sample", str(tokenizer), "--out", str(tmp_path / "s")]) == 2
    assert capsys.readouterr().err == (
        f"kepler sample: error: pretrained model {tokenizer} is a tokenizer (VQModel), not a prior; a tokenizer is "
        "for kepler eval, reconstruct, encode, decode, export and a prior's tokenizer.checkpoint\n")
    # A prior given as a prior's tokenizer: named as a prior, not as an unknown 'model.order' key.
    config = tmp_path / "prior.yaml"
    config.write_text((LEGACY / "prior.yaml").read_text().replace("tok/checkpoints/last.pt", str(prior)))
    assert main(["prior", "train", str(config), f"run_dir={tmp_path / 'run'}"]) == 2
    assert f"checkpoint {prior} is a prior (CodeTransformer), not a tokenizer" in capsys.readouterr().err


def test_a_folder_that_is_no_model(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"pretrained model {tmp_path}: config.yaml is missing"):
        kepler.load(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"model .*nowhere does not exist \(a model is a checkpoint file"):
        kepler.load(tmp_path / "nowhere")


def test_a_saved_backend_that_cannot_run_here_is_rechosen(tmp_path, caplog, reference):
    """A model trained with quantizer.backend: cuda loads on a CPU machine (said in a warning), and
    computes what the same model with backend auto computes."""
    folder = tmp_path / "exported"
    shutil.copytree(LEGACY / "tok_export", folder)
    manifest = yaml.safe_load((folder / CONFIG_FILE).read_text())
    manifest["model"]["quantizer"]["backend"] = "cuda"
    (folder / CONFIG_FILE).write_text(yaml.safe_dump(manifest, sort_keys=False))
    with caplog.at_level(logging.WARNING, logger="kepler"):
        model = kepler.load(folder, device="cpu")
    if torch.cuda.is_available() and kepler.HAS_CUDA_EXT:
        pytest.skip("the cuda backend runs here")
    assert model.config["quantizer"]["backend"] == "auto"
    assert f"pretrained model {folder}: its quantizer backend 'cuda' cannot run on cpu" in caplog.text
    assert "using backend auto" in caplog.text
    with torch.no_grad():
        assert torch.equal(model.encode_to_indices(reference["x"]), reference["export_indices"])
