"""kepler/io: weights files read without running code and refused when damaged, RNG states saved and
restored exactly, config sections that cannot be left empty."""

import os
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kepler.cli import main
from kepler.io.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from kepler.io.config import load_config
from kepler.io.weights import RefusedGlobals, load_weights

RELEASED = Path(__file__).resolve().parent / "data" / "released_vqgan_group_p4"


def _flip_bytes(source: Path, target: Path, offset: int, count: int = 20, stride: int = 1000) -> Path:
    data = bytearray(source.read_bytes())
    for i in range(count):
        data[offset + i * stride] ^= 0xFF
    target.write_bytes(bytes(data))
    return target


def test_a_bit_flipped_checkpoint_is_refused_by_its_crcs(tmp_path, capsys):
    """torch's zip reader does not check CRC-32s: 20 flipped bytes in the weights converted with
    exit 0 and ten weights changed by up to 430. Both a Lightning file and a kepler checkpoint."""
    flipped = _flip_bytes(RELEASED / "last.ckpt", tmp_path / "last.ckpt", offset=1_500_000)
    assert main(["convert", str(flipped), "--config", str(RELEASED / "config.yaml"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kepler convert: error: checkpoint {flipped} is damaged: last/data/")
    assert err.endswith("does not match the CRC-32 its archive records (a bit flip or a bad copy); refused\n")
    path = save_checkpoint({"model": {"w": torch.arange(4096.0)}, "config": {}}, tmp_path / "run.pt")
    _flip_bytes(path, path, offset=path.stat().st_size // 2, count=1)
    with pytest.raises(ValueError, match=f"^checkpoint {path} is damaged: "):
        load_checkpoint(path)


def test_a_file_asking_for_a_module_torch_blocks_is_refused_without_a_flag_to_allow_it(tmp_path, capsys):
    """A plain pickle asking for os.system: its message named nothing (torch's paragraph) and the
    suggested --stub-global posix.system was then refused; now the global is named, and no flag is
    offered for what torch never unpickles."""

    class Payload:
        def __reduce__(self):
            return os.system, ("echo ran",)

    plain = tmp_path / "plain.ckpt"
    plain.write_bytes(pickle.dumps({"state_dict": Payload()}, protocol=4))
    assert main(["convert", str(plain), "--config", str(RELEASED / "config.yaml"), "--out", str(tmp_path / "o")]) == 2
    captured = capsys.readouterr()
    assert captured.err == (f"kepler convert: error: checkpoint {plain} asks for {os.system.__module__}.system, from "
                            "a module torch never unpickles; refused to unpickle it\n")
    assert "Warning" not in captured.out + captured.err  # torch's protocol warning stays inside


def test_a_plain_pickle_of_allowed_things_says_what_it_asks_for_or_why_it_is_unreadable(tmp_path):
    asks = tmp_path / "asks.pkl"
    asks.write_bytes(pickle.dumps({"w": shutil.copy}, protocol=2))
    with pytest.raises(RefusedGlobals) as error:
        load_weights(asks, f"weights {asks}")
    assert error.value.names == ["shutil.copy"]
    assert str(error.value) == (f"weights {asks} holds more than tensors and plain containers (it asks for "
                                "shutil.copy); refused to unpickle it")
    newer = tmp_path / "newer.pkl"
    newer.write_bytes(pickle.dumps({"w": [1, 2]}, protocol=5))  # plain data, a protocol torch cannot read
    with pytest.raises(ValueError) as error:
        load_weights(newer, f"weights {newer}")
    assert str(error.value) == f"weights {newer} could not be read as weights: Unsupported operand 149"


def _draw() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(), random.random()


def test_capture_and_restore_bring_back_every_rng():
    """torch, numpy (with its cached Gaussian) and Python: what resume restores, each checked."""
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    np.random.randn()  # leaves numpy with a cached Gaussian, which the state must carry
    state = capture_rng()
    first = _draw()
    for reseed in (torch.manual_seed, np.random.seed, random.seed):
        reseed(99)
        assert _draw() != first  # each generator is moved elsewhere...
        restore_rng(state)
        assert _draw() == first  # ...and brought back by the restore alone
        restore_rng(state)


def test_an_empty_config_section_is_named(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("loss:\ndata:\n  size: 32\n")
    with pytest.raises(ValueError) as error:
        load_config(config)
    assert str(error.value) == f"config section 'loss' in {config} is empty (null): give it keys or leave it out"
    with pytest.raises(ValueError, match=r"^config key 'seed' must be >= 0 and <= 9223372036854775807, got -1$"):
        load_config(None, ["seed=-1"])
