"""Pretrained folders (kepler.models.pretrained): exact round trip, every refusal by its message, and
``kepler export`` feeding every command that takes a checkpoint."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import kepler
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save
from test_models import tiny_model
from test_train import random_images, tiny_config

from kepler.cli import main
from kepler.models import VQModel
from kepler.io.pretrained import CARD_FILE, CONFIG_FILE, WEIGHTS_FILE, read_pretrained
from kepler.io.config import load_config
from kepler.train.trainer import train


@pytest.fixture
def saved(tmp_path):
    """A tiny model with non-default buffers (code counts), and the folder it was saved to."""
    torch.manual_seed(0)
    model = tiny_model()
    with torch.no_grad():
        model.quantize.code_counts.copy_(torch.randint(0, 50, model.quantize.code_counts.shape))
    return model, model.save_pretrained(tmp_path / "model", step=7)


def _set_weights(folder, blob: bytes, record_hash: bool) -> None:
    """Replace the weights file with ``blob``; with ``record_hash`` its SHA-256 goes into the config
    too (what a careless or malicious edit of both files looks like)."""
    (folder / WEIGHTS_FILE).write_bytes(blob)
    if record_hash:
        config = yaml.safe_load((folder / CONFIG_FILE).read_text())
        config["weights"]["sha256"] = hashlib.sha256(blob).hexdigest()
        (folder / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))


def test_round_trip_is_exact(saved):
    model, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == sorted([CARD_FILE, CONFIG_FILE, WEIGHTS_FILE])
    loaded = VQModel.from_pretrained(folder)
    expected, got = model.state_dict(), loaded.state_dict()
    assert list(got) == list(expected)
    for key in expected:
        assert got[key].dtype == expected[key].dtype and torch.equal(got[key], expected[key]), key
    assert not loaded.training
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])
        assert torch.equal(loaded.encode_to_indices(x), model.encode_to_indices(x))
    manifest = read_pretrained(folder)[0]
    assert manifest["step"] == 7 and manifest["model"]["quantizer"]["partitions"] == 4
    assert manifest["weights"]["sha256"] == hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()


def test_a_changed_weights_file_is_refused_by_its_checksum(saved):
    _, folder = saved
    recorded = yaml.safe_load((folder / CONFIG_FILE).read_text())["weights"]["sha256"]
    blob = bytearray((folder / WEIGHTS_FILE).read_bytes())
    blob[-1] ^= 1  # one bit of one weight
    _set_weights(folder, bytes(blob), record_hash=False)
    with pytest.raises(ValueError) as error:
        VQModel.from_pretrained(folder)
    assert str(error.value) == (f"{folder / WEIGHTS_FILE}: SHA-256 {hashlib.sha256(blob).hexdigest()} is not the "
                                f"{recorded} recorded in config.yaml (the file was changed or damaged)")


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_a_damaged_safetensors_file_is_refused(saved, damage):
    _, folder = saved
    blob = (folder / WEIGHTS_FILE).read_bytes()
    blob = blob[: len(blob) // 2] if damage == "truncated" else bytes(range(256)) * 4
    _set_weights(folder, blob, record_hash=True)
    with pytest.raises(ValueError, match=f"^{folder / WEIGHTS_FILE} is not a readable safetensors file: .+") as error:
        VQModel.from_pretrained(folder)
    assert "\n" not in str(error.value)


def test_missing_folder_and_files(saved, tmp_path):
    _, folder = saved
    with pytest.raises(FileNotFoundError, match=f"^model {tmp_path / 'nowhere'} does not exist"):
        VQModel.from_pretrained(tmp_path / "nowhere")
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"^pretrained model {folder}: model.safetensors is missing$"):
        VQModel.from_pretrained(folder)
    (folder / CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"^pretrained model {folder}: config.yaml is missing$"):
        VQModel.from_pretrained(folder)


def _edit_config(folder, edit) -> None:
    config = yaml.safe_load((folder / CONFIG_FILE).read_text())
    edit(config)
    (folder / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))


def test_a_config_that_does_not_match_the_weights_names_key_and_shapes(saved):
    _, folder = saved
    _edit_config(folder, lambda config: config["model"].update(embed_dim=16))
    with pytest.raises(ValueError) as error:
        VQModel.from_pretrained(folder)
    assert str(error.value).startswith(f"pretrained model {folder}: the weights do not match the model config: keys ")
    assert "('quant_conv.weight': (8, 8, 1, 1) in the file, (16, 8, 1, 1) in the model, ...)" in str(error.value)


def test_bad_config_files(saved):
    _, folder = saved
    path = folder / CONFIG_FILE
    _edit_config(folder, lambda config: config.update(format="something else"))
    with pytest.raises(ValueError, match=f"^{path} is not a kepler pretrained config: 'format' must be "
                                         "'kepler-pretrained/1', got 'something else'$"):
        VQModel.from_pretrained(folder)
    _edit_config(folder, lambda config: config.update(format="kepler-pretrained/1", weights={"file": "../x"}))
    with pytest.raises(ValueError, match="'weights' must map 'file' and 'sha256' to strings"):
        VQModel.from_pretrained(folder)
    _edit_config(folder, lambda config: config.update(weights={"file": "../x", "sha256": "00"}))
    with pytest.raises(ValueError, match=r"weights.file must be a file name in the same folder, got '\.\./x'$"):
        VQModel.from_pretrained(folder)
    path.write_text("model: [unclosed")
    with pytest.raises(ValueError, match=f"^{path} is not valid YAML: "):
        VQModel.from_pretrained(folder)


def test_non_finite_weights_are_refused(saved):
    model, folder = saved
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    weights["decoder.conv_out.bias"][0] = float("nan")
    _set_weights(folder, save(weights), record_hash=True)
    with pytest.raises(ValueError) as error:
        VQModel.from_pretrained(folder)
    assert str(error.value) == (f"pretrained model {folder}: 1 weights are not finite (NaN or inf), "
                                "the first in 'decoder.conv_out.bias'")


# ------------------------------------------------------------------------------ kepler export


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step training run: its checkpoint and metrics.json."""
    tmp = tmp_path_factory.mktemp("tiny_export")
    return train(load_config(tiny_config(tmp, steps=2, disc_start=100), [f"run_dir={tmp / 'run'}"]))


def test_export_writes_a_folder_with_the_runs_metrics(run, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", run["checkpoint"], "--out", str(out)]) == 0
    assert f"(metrics from {Path(run['run']).resolve() / 'metrics.json'})" in capsys.readouterr().out
    card = (out / CARD_FILE).read_text()
    assert f"| psnr | {run['psnr']:.2f} dB |" in card and "- Training steps: 2" in card
    state = torch.load(run["checkpoint"], weights_only=True)
    assert f"- Training data: {state['config']['data']['train']}, 32x32 crops" in card
    model = kepler.load(out)
    manifest = read_pretrained(out)[0]
    assert manifest["data"] == state["config"]["data"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state["model"].items())


def test_export_leaves_out_metrics_of_another_step(run, tmp_path):
    metrics_path = tmp_path / "run" / "metrics.json"
    checkpoint = tmp_path / "run" / "checkpoints" / "last.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(open(run["checkpoint"], "rb").read())
    metrics_path.write_text(json.dumps({**run, "step": 99}))
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "out")]) == 0
    assert "No held-out metrics were recorded" in (tmp_path / "out" / CARD_FILE).read_text()


def test_every_checkpoint_command_takes_an_exported_folder(run, tmp_path, capsys):
    folder = tmp_path / "exported"
    assert main(["export", run["checkpoint"], "--out", str(folder)]) == 0
    photo = random_images(tmp_path / "images", count=1) / "img0.png"
    for source, name in ((run["checkpoint"], "ckpt"), (str(folder), "dir")):
        assert main(["reconstruct", source, str(photo), "--out", str(tmp_path / f"recon_{name}")]) == 0
        assert main(["encode", source, str(photo), "--out", str(tmp_path / f"codes_{name}")]) == 0
        assert main(["decode", source, str(tmp_path / f"codes_{name}" / "img0.npy"),
                     "--out", str(tmp_path / f"dec_{name}")]) == 0
        assert main(["eval", source, "--data", str(tmp_path / "images"), "--out", str(tmp_path / f"eval_{name}")]) == 0
    # The folder computes exactly what the checkpoint does.
    for produced in ("recon_{}/img0_recon.png", "dec_{}/img0.png"):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / produced.format("dir"))),
                                      np.asarray(Image.open(tmp_path / produced.format("ckpt"))))
    np.testing.assert_array_equal(np.load(tmp_path / "codes_dir" / "img0.npy"), np.load(tmp_path / "codes_ckpt" / "img0.npy"))
    by_checkpoint, by_folder = (json.loads((tmp_path / f"eval_{n}" / "eval.json").read_text()) for n in ("ckpt", "dir"))
    assert by_folder["step"] == by_checkpoint["step"] == 2
    assert by_folder["resolutions"] == by_checkpoint["resolutions"]  # the training crop size from config.yaml's data


def test_a_folder_saved_without_training_data_is_evaluated_at_its_resolution(saved, tmp_path):
    _, folder = saved  # tiny_model: resolution 16, no data section
    images = random_images(tmp_path / "images", count=2)
    assert main(["eval", str(folder), "--data", str(images), "--out", str(tmp_path / "eval")]) == 0
    results = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert list(results["resolutions"]) == ["16"] and results["step"] == 7


def test_resume_from_a_folder_says_it_needs_a_checkpoint(saved, tmp_path, capsys):
    _, folder = saved
    assert main(["train", "sample", "--resume", str(folder)]) == 2
    assert capsys.readouterr().err == (f"kepler train: error: --resume: {folder} is a folder; training resumes from a "
                                       "checkpoint file (an exported model holds no optimizer state)\n")


def test_export_errors(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")]) == 2
    assert "kepler export: error: model" in capsys.readouterr().err


# ------------------------------------------------------------------------------ hostile folders


def test_a_config_is_validated_as_training_validates_it(saved, reference_input):
    """config.yaml is not covered by the weights' hash: an edited value that still fits the weights
    must be refused, not silently computed another way (norm_groups 5 of 16 channels ran as 1 group)."""
    model, folder = saved
    _edit_config(folder, lambda config: config["model"].update(norm_groups=3))
    with pytest.raises(ValueError) as error:
        kepler.load(folder)
    assert "norm_groups=3 does not divide the 8 channels of a block" in str(error.value)
    _edit_config(folder, lambda config: config["model"].update(norm_groups=4))
    with torch.no_grad():
        assert torch.equal(kepler.load(folder)(reference_input)[0], model.eval()(reference_input)[0])
    _edit_config(folder, lambda config: config.update(data={"size": 0}))
    with pytest.raises(ValueError) as error:
        kepler.load(folder)
    assert str(error.value) == f"pretrained model {folder}: config key 'data.size' must be >= 1, got 0"


@pytest.fixture
def reference_input():
    return torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_weights_of_another_dtype_or_negative_counts_are_refused(saved):
    model, folder = saved
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    weights["quant_conv.weight"] = weights["quant_conv.weight"].round().to(torch.int64)
    _set_weights(folder, save(weights), record_hash=True)
    with pytest.raises(ValueError) as error:
        kepler.load(folder)
    assert str(error.value) == (f"pretrained model {folder}: the weights do not match the model config: keys 1 of "
                                "another dtype ('quant_conv.weight': torch.int64 in the file, torch.float32 in the "
                                "model)")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    weights["quantize.code_counts"] = weights["quantize.code_counts"].to(torch.bool)
    _set_weights(folder, save(weights), record_hash=True)
    with pytest.raises(ValueError, match="'quantize.code_counts': torch.bool in the file, torch.int64 in the model"):
        kepler.load(folder)
    weights["quantize.code_counts"] = model.quantize.code_counts.clone()
    weights["quantize.code_counts"][1, 2] = -5
    _set_weights(folder, save(weights), record_hash=True)
    with pytest.raises(ValueError) as error:
        kepler.load(folder)
    assert str(error.value) == (f"pretrained model {folder}: quantize.code_counts holds negative counts (down to -5): "
                                "the weights were damaged or edited")
    weights["quantize.code_counts"] = model.quantize.code_counts.clone()
    weights["quant_conv.weight"] = weights["quant_conv.weight"].to(torch.float64)  # another float dtype is fine
    _set_weights(folder, save(weights), record_hash=True)
    assert kepler.load(folder).quant_conv.weight.dtype == torch.float32


FOLDER_KEYS = ["model.ch", "model.ch_mult", "model.norm_groups", "model.resolution", "model.embed_dim",
               "model.dropout", "model.quantizer.num_codes", "model.quantizer.partitions", "model.quantizer.type",
               "model.quantizer.backend", "data.size", "data.resize", "step", "format", "weights.file"]


@settings(max_examples=80)  # fixed seed, no database (the "kepler" profile, conftest.py)
@given(key=st.sampled_from(FOLDER_KEYS), value=st.one_of(
    st.none(), st.booleans(), st.integers(-3, 40), st.integers(2**31, 2**62), st.floats(allow_nan=True),
    st.text(max_size=5), st.lists(st.integers(-1, 5), max_size=3)))
def test_any_edit_of_an_exported_config_loads_the_same_model_or_is_refused_in_one_line(
        tmp_path_factory, key, value):
    """The folder's config.yaml is outside the weights' hash: whatever one key is changed to, loading
    gives a model computing exactly what the saved one did, or a one-line error (ValueError or
    FileNotFoundError), never a traceback of another kind nor a different model."""
    torch.manual_seed(0)
    model = tiny_model().eval()
    folder = model.save_pretrained(tmp_path_factory.mktemp("folder") / "model", step=7)
    config = yaml.safe_load((folder / CONFIG_FILE).read_text())
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
        if node.get(part) is None:  # the tiny model was saved without a data section
            node[part] = {}
        node = node[part]
    node[leaf] = value
    (folder / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    try:
        loaded = kepler.load(folder)
    except (ValueError, FileNotFoundError) as exc:
        assert "\n" not in str(exc)
        return
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0]), f"{key}={value!r} loaded another model"
