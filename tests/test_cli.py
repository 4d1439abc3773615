"""The ``kepler`` command line: every command's help, errors, and the image/code round trip."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import random_images, tiny_config

import kepler
from kepler.cli import main
from kepler.cli.models import memory_size
from kepler.io.config import load_config
from kepler.train.trainer import train

COMMANDS = ["train", "prior", "study", "fid", "eval", "reconstruct", "encode", "decode", "export", "convert", "sample",
            "data", "doctor"]


def test_the_commands_are_these():
    """A new command is added to COMMANDS, so that the help tests below cover it."""
    import argparse

    from kepler.cli import build_parser

    (subparsers,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert list(subparsers.choices) == COMMANDS


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny_cli")
    config = tiny_config(tmp, steps=2, disc_start=100)
    return train(load_config(config, [f"run_dir={tmp / 'run'}"]))["checkpoint"]


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: kepler {command}" in capsys.readouterr().out


def test_python_dash_m_kepler():
    proc = subprocess.run([sys.executable, "-m", "kepler", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage: kepler" in proc.stdout


def test_no_command_and_unknown_command_are_usage_errors(capsys):
    for argv in ([], ["fly"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    assert "invalid choice: 'fly'" in capsys.readouterr().err


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_train_errors(tmp_path, capsys):
    err = _error(["train", str(tmp_path / "missing.yaml")], capsys)
    assert err.startswith("kepler train: error: config file") and "missing.yaml does not exist" in err
    config = tiny_config(tmp_path)
    assert "unknown config key 'optim.lr'" in _error(["train", str(config), "optim.lr=1"], capsys)
    assert "override 'optim.base_lr' must look like key=value" in _error(["train", str(config), "optim.base_lr"], capsys)
    err = _error(["train", str(config), "--resume", str(tmp_path / "nope.pt")], capsys)
    assert "--resume: checkpoint" in err and "nope.pt does not exist" in err


def test_eval_errors(tmp_path, checkpoint, capsys):
    err = _error(["eval", str(tmp_path / "missing.pt")], capsys)
    assert "kepler eval: error: model" in err and "missing.pt does not exist (a model is a checkpoint file" in err
    err = _error(["eval", str(checkpoint), "--data", str(tmp_path / "nowhere")], capsys)
    assert "is not a data source: expected the embedded photos 'sample'" in err
    err = _error(["eval", str(checkpoint), "--data", "faces", "--resolution", "31"], capsys)
    assert "resolution 31 is not a multiple of the downsampling factor 2" in err


def test_eval_command(tmp_path, checkpoint, capsys):
    images = random_images(tmp_path / "val", count=2)
    assert main(["eval", str(checkpoint), "--data", str(images), "--resolution", "32", "40",
                 "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "psnr" in out and "LPIPS off: no weights at" in out
    assert (tmp_path / "out" / "eval.json").is_file()


def test_reconstruct_encode_decode_round_trip(tmp_path, checkpoint, capsys):
    images = random_images(tmp_path / "images", count=2)
    photo = images / "img0.png"  # 48 x 40
    assert main(["reconstruct", str(checkpoint), str(photo), "--out", str(tmp_path / "recon")]) == 0
    pair = np.asarray(Image.open(tmp_path / "recon" / "img0_recon.png"))
    assert pair.shape == (40, 96, 3)
    np.testing.assert_array_equal(pair[:, :48], np.asarray(Image.open(photo)))

    assert main(["encode", str(checkpoint), str(photo), "--out", str(tmp_path / "codes")]) == 0
    codes = np.load(tmp_path / "codes" / "img0.npy")
    assert codes.shape == (20, 24, 4) and codes.dtype == np.int64
    assert main(["decode", str(checkpoint), str(tmp_path / "codes" / "img0.npy"), "--out", str(tmp_path / "dec")]) == 0
    decoded = np.asarray(Image.open(tmp_path / "dec" / "img0.png"))
    np.testing.assert_array_equal(decoded, pair[:, 48:])

    assert main(["encode", str(checkpoint), str(photo), "--size", "32", "--out", str(tmp_path / "c32")]) == 0
    assert np.load(tmp_path / "c32" / "img0.npy").shape == (16, 16, 4)


def test_decode_stages_needs_a_residual_tokenizer(tmp_path, checkpoint, capsys):
    codes = tmp_path / "codes.npy"
    np.save(codes, np.zeros((4, 4, 4), dtype=np.int64))
    err = _error(["decode", str(checkpoint), str(codes), "--stages", "1", "--out", str(tmp_path / "o")], capsys)
    assert "kepler decode: error: --stages needs a residual tokenizer (type: residual); this one's quantizer is 'kepler'" in err
    err = _error(["eval", str(checkpoint), "--data", str(random_images(tmp_path / "v", count=1)), "--stages", "1"], capsys)
    assert "kepler eval: error: stages needs a residual tokenizer (type: residual); this one's quantizer is 'kepler'" in err


def test_an_image_over_the_memory_budget_is_refused_before_it_runs(tmp_path, checkpoint, capsys):
    """A 1260x900 photo asked 20 GB of a machine and met the OOM killer: every command that takes
    images now estimates its peak first and refuses one over --max-memory (default: what the device
    has available), pointing to --size."""
    model = kepler.load(checkpoint)
    photo = random_images(tmp_path / "images", count=1) / "img0.png"  # 48 x 40
    need = model.inference_bytes(40, 48)
    budget_gib = 0.9 * need / 2**30
    fits = max(s for s in range(2, 41, 2) if model.inference_bytes(s, s) <= budget_gib * 2**30)
    for command in ("reconstruct", "encode"):
        err = _error([command, str(checkpoint), str(photo), "--max-memory", str(budget_gib), "--out",
                      str(tmp_path / "o")], capsys)
        assert err == (f"kepler {command}: error: image {photo} (48x40) needs about {memory_size(need)} at full "
                       f"size, more than the {memory_size(int(budget_gib * 2**30))} budget (--max-memory): resize it "
                       f"with --size {fits}, or raise --max-memory\n")
    assert main(["encode", str(checkpoint), str(photo), "--size", str(fits), "--max-memory", str(budget_gib),
                 "--out", str(tmp_path / "codes")]) == 0
    codes = tmp_path / "codes" / "img0.npy"
    err = _error(["decode", str(checkpoint), str(codes), "--max-memory", str(budget_gib * 0.5), "--out",
                  str(tmp_path / "o")], capsys)
    assert err.startswith(f"kepler decode: error: code map {codes} ({fits}x{fits}) needs about ")


def test_image_command_errors(tmp_path, checkpoint, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"nope")
    err = _error(["reconstruct", str(checkpoint), str(broken), "--out", str(tmp_path / "o")], capsys)
    assert f"cannot read image {broken}" in err
    good = random_images(tmp_path / "images", count=1) / "img0.png"
    err = _error(["encode", str(checkpoint), str(good), "--size", "33", "--out", str(tmp_path / "o")], capsys)
    assert "--size 33 must be a multiple of the downsampling factor 2" in err
    wrong_shape = tmp_path / "wrong.npy"
    np.save(wrong_shape, np.zeros((4, 4), dtype=np.int64))
    err = _error(["decode", str(checkpoint), str(wrong_shape), "--out", str(tmp_path / "o")], capsys)
    assert "expected an integer (H, W, 4) code map" in err
    out_of_range = tmp_path / "range.npy"
    np.save(out_of_range, np.full((2, 2, 4), 16, dtype=np.int64))
    err = _error(["decode", str(checkpoint), str(out_of_range), "--out", str(tmp_path / "o")], capsys)
    assert "code indices must be in [0, 16)" in err
    err = _error(["decode", str(checkpoint), str(tmp_path / "absent.npy"), "--out", str(tmp_path / "o")], capsys)
    assert "cannot read code map" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["reconstruct", str(checkpoint), str(good)])  # --out is required
    assert exit_info.value.code == 2


def test_version(capsys):
    import kepler

    for flag in ("--version", "-V"):
        with pytest.raises(SystemExit) as exit_info:
            main([flag])
        assert exit_info.value.code == 0
        assert capsys.readouterr().out.strip() == f"kepler {kepler.__version__}"


@pytest.mark.parametrize("command", ["eval", "reconstruct", "encode", "decode"])
def test_unusable_output_locations_fail_before_any_work(tmp_path, checkpoint, capsys, monkeypatch, command):
    import kepler.cli.models

    # Any work (loading the model) after a bad --out is a failure of this test.
    monkeypatch.setattr(kepler.cli.models, "_tokenizer", lambda args: pytest.fail("loaded the model before checking --out"))
    monkeypatch.setattr("kepler.train.evaluate.evaluate", lambda *a, **k: pytest.fail("evaluated before checking --out"))
    a_file = tmp_path / "eval.json"
    a_file.write_text("{}")
    inputs = {"eval": [], "reconstruct": ["x.png"], "encode": ["x.png"], "decode": ["x.npy"]}[command]
    err = _error([command, str(checkpoint), *inputs, "--out", str(a_file)], capsys)
    assert err == f"kepler {command}: error: --out {a_file} is a file, not a folder\n"
    err = _error([command, str(checkpoint), *inputs, "--out", str(a_file / "sub")], capsys)
    assert err.startswith(f"kepler {command}: error: --out {a_file / 'sub'}: cannot create the folder")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        err = _error([command, str(checkpoint), *inputs, "--out", str(locked)], capsys)
        assert err == f"kepler {command}: error: --out {locked}: the folder is not writable\n"


@pytest.mark.parametrize("option", ["--batch-size", "--max-images"])
@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_eval_counts_must_be_positive(checkpoint, capsys, option, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(checkpoint), option, value])
    assert exit_info.value.code == 2
    assert f"argument {option}: expected a positive integer, got" in capsys.readouterr().err


def test_empty_code_map_and_empty_checkpoint_are_one_line_errors(tmp_path, checkpoint, capsys):
    empty_codes = tmp_path / "empty.npy"
    np.save(empty_codes, np.zeros((0, 4, 4), dtype=np.int64))
    err = _error(["decode", str(checkpoint), str(empty_codes), "--out", str(tmp_path / "o")], capsys)
    assert err == f"kepler decode: error: {empty_codes}: the code map is empty (int64 (0, 4, 4))\n"
    zero_bytes = tmp_path / "zero.pt"
    zero_bytes.write_bytes(b"")
    err = _error(["encode", str(zero_bytes), "x.png", "--out", str(tmp_path / "o")], capsys)
    assert err == f"kepler encode: error: checkpoint {zero_bytes} is empty (0 bytes), e.g. an interrupted copy\n"


def test_decompression_bomb_is_a_one_line_error(tmp_path, checkpoint, capsys, monkeypatch):
    photo = random_images(tmp_path / "images", count=1) / "img0.png"  # 48 x 40 = 1920 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # PIL raises above twice the limit
    err = _error(["encode", str(checkpoint), str(photo), "--out", str(tmp_path / "codes")], capsys)
    assert err.startswith(f"kepler encode: error: cannot read image {photo}: Image size (1920 pixels) exceeds")
    assert err.count("\n") == 1


def _doctored(checkpoint, path, *, config=None, model_config=None, weights=None):
    """A copy of ``checkpoint`` with its config, model config or weights replaced."""
    state = torch.load(checkpoint, weights_only=True)
    if config is not None:
        state["config"] = config
    if model_config is not None:
        state["config"]["model"] = model_config
    if weights is not None:
        state["model"] = weights(state["model"])
    torch.save(state, path)
    return path


def test_checkpoints_that_do_not_describe_their_weights(tmp_path, checkpoint, capsys):
    image = random_images(tmp_path / "images", count=1) / "img0.png"
    state = torch.load(checkpoint, weights_only=True)
    model = state["config"]["model"]

    def encode_error(path):
        return _error(["encode", str(path), str(image), "--out", str(tmp_path / "o")], capsys)

    # A few KB asking for a 16-billion-parameter model: refused before anything is allocated.
    huge = _doctored(checkpoint, tmp_path / "huge.pt", model_config={**model, "ch": 4096, "ch_mult": [1] * 8},
                     weights=lambda w: {})
    err = encode_error(huge)
    assert err.startswith(f"kepler encode: error: checkpoint {huge}: the weights do not match the model config: "
                          "keys ") and " missing ('encoder.conv_in.weight', " in err and err.count("\n") == 1
    for config in ({}, "a string", {"model": "a string"}):
        path = _doctored(checkpoint, tmp_path / "bad_config.pt", config=config)
        assert encode_error(path) == (f"kepler encode: error: checkpoint {path} has no model config "
                                      "(its config must map 'model' to a section)\n")
    path = _doctored(checkpoint, tmp_path / "unknown.pt", model_config={**model, "channels": 8})
    assert encode_error(path) == f"kepler encode: error: unknown config key 'model.channels' in checkpoint {path}\n"
    wider = _doctored(checkpoint, tmp_path / "wider.pt", model_config={**model, "embed_dim": 2 * model["embed_dim"]})
    err = encode_error(wider)
    assert "of another shape ('quant_conv.weight': (8, 8, 1, 1) in the file, (16, 8, 1, 1) in the model, ...)" in err
    assert err.count("\n") == 1
    extra = _doctored(checkpoint, tmp_path / "extra.pt", weights=lambda w: {**w, "stray": torch.zeros(1)})
    assert encode_error(extra).endswith("keys 1 unexpected ('stray')\n")
    # Stride-0 views: a file of one float per tensor that claims the model's full size.
    expanded = _doctored(checkpoint, tmp_path / "expanded.pt",
                         weights=lambda w: {k: v.flatten()[:1].clone().view([1] * v.dim()).expand(v.shape)
                                            if v.dim() and v.numel() else v for k, v in w.items()})
    assert "(overlapping or stride-0 tensors)" in encode_error(expanded)


def test_resume_with_a_changed_model_names_the_keys(tmp_path, checkpoint, capsys):
    config = tiny_config(tmp_path, steps=3)
    err = _error(["train", str(config), f"run_dir={tmp_path / 'run'}", "model.embed_dim=16", "--resume", str(checkpoint)],
                 capsys)
    assert err.startswith(f"kepler train: error: --resume checkpoint {checkpoint}: the weights do not match the model "
                          "config: keys ") and "of another shape ('quant_conv.weight'" in err and err.count("\n") == 1


def test_checkpoint_with_non_finite_weights_is_refused(tmp_path, checkpoint, capsys):
    def poison(weights):
        weights["decoder.conv_out.bias"][0] = float("nan")
        weights["quantize.codebook"][1, :2] = float("inf")
        return weights

    path = _doctored(checkpoint, tmp_path / "nan.pt", weights=poison)
    image = random_images(tmp_path / "images", count=1) / "img0.png"
    err = _error(["encode", str(path), str(image), "--out", str(tmp_path / "o")], capsys)
    first = next(k for k in torch.load(path, weights_only=True)["model"] if k in ("decoder.conv_out.bias", "quantize.codebook"))
    assert err == f"kepler encode: error: checkpoint {path}: 3 weights are not finite (NaN or inf), the first in {first!r}\n"
