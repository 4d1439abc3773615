"""train.ema_decay: the moving average of the weights against a hand computation, its checkpoint entry,
and every way a model is loaded using it by default (``raw_weights`` / ``--raw-weights`` for the trained
weights). Resume and DDP equality are in tests/test_train.py."""

import json

import pytest
import torch
import yaml
from test_train import random_images, tiny_config
from torch import nn

from kepler.cli import main
from kepler.io.checkpoint import load_checkpoint, save_checkpoint
from kepler.io.config import load_config
from kepler.io.pretrained import CARD_FILE, CONFIG_FILE
from kepler.models.load import load_model
from kepler.train.ema import WeightEMA
from kepler.distributed import init_distributed
from kepler.train.trainer import Trainer, train


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.register_buffer("counts", torch.zeros(2, dtype=torch.int64))


def test_the_average_after_n_steps_is_the_hand_computed_one():
    torch.manual_seed(0)
    model = Tiny()
    ema = WeightEMA(model, decay=0.8)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(4, 3)
    trajectory = [{k: v.detach().double().clone() for k, v in model.named_parameters()}]
    for _ in range(3):
        opt.zero_grad()
        model.linear(x).square().sum().backward()
        opt.step()
        ema.update()
        model.counts += 1
        trajectory.append({k: v.detach().double().clone() for k, v in model.named_parameters()})
    # ema_0 = w_0; ema_n = 0.8 ema_{n-1} + 0.2 w_n: written out, w_0 weighs 0.8^3.
    for name in ("linear.weight", "linear.bias"):
        w = [t[name] for t in trajectory]
        expected = 0.8**3 * w[0] + 0.2 * 0.8**2 * w[1] + 0.2 * 0.8 * w[2] + 0.2 * w[3]
        torch.testing.assert_close(ema.state_dict()[name].double(), expected, rtol=0, atol=1e-6)
        assert not torch.allclose(expected, w[3], atol=1e-3)  # the steps moved the weights: not a copy
    assert set(ema.state_dict()) == {"linear.weight", "linear.bias"}  # buffers are not averaged
    # Swapped in for evaluation, the trained weights back after, bit for bit; buffers untouched.
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped_in():
        for name, value in ema.state_dict().items():
            assert torch.equal(model.get_parameter(name).detach(), value)
        assert torch.equal(model.counts, torch.full((2,), 3))
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained[name]), name


def test_averages_that_do_not_match_the_model_are_refused():
    ema = WeightEMA(Tiny(), decay=0.5)
    state = ema.state_dict()
    with pytest.raises(ValueError, match=r"^ckpt \(EMA weights\): the averages do not match the model's parameters: "
                                         r"keys 1 missing \('linear.bias'\)$"):
        ema.load_state_dict({"linear.weight": state["linear.weight"]}, "ckpt")
    with pytest.raises(ValueError, match=r"keys 1 not a floating-point parameter \('counts'\)"):
        ema.load_state_dict({**state, "counts": torch.zeros(2, dtype=torch.int64)}, "ckpt")
    with pytest.raises(ValueError, match=r"^ckpt \(EMA weights\): 1 weights are not finite .* 'linear.bias'"):
        ema.load_state_dict({**state, "linear.bias": torch.tensor([0.0, float("nan")])}, "ckpt")


def test_a_shared_parameter_is_averaged_under_each_of_its_names():
    """Each state-dict key of a parameter has its average: the loader replaces every one of them."""
    model = Tiny()
    model.alias = model.linear
    ema = WeightEMA(model, decay=0.5)
    assert set(ema.state_dict()) == {k for k in model.state_dict() if k != "counts"} == {
        "linear.weight", "linear.bias", "alias.weight", "alias.bias"}
    ema.load_state_dict(ema.state_dict(), "ckpt")


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.1"])
def test_the_decay_must_be_in_the_open_unit_interval(value):
    with pytest.raises(ValueError, match=rf"^config key 'train.ema_decay' must be > 0 and < 1, got {value}$"):
        load_config(None, [f"train.ema_decay={value}"])
    assert load_config(None, ["train.ema_decay=0.999"]).train.ema_decay == 0.999
    assert load_config(None).train.ema_decay is None


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny_ema")
    config = tiny_config(tmp, steps=2, disc_start=100)
    # A high learning rate, so that the average and the trained weights differ clearly.
    return train(load_config(config, [f"run_dir={tmp / 'run'}", "train.ema_decay=0.5", "optim.base_lr=1e-2"]))


def test_the_checkpoint_and_the_run_report_the_ema_weights(run):
    state = load_checkpoint(run["checkpoint"])
    # Every parameter of the VQModel is averaged; its one buffer, the code counts, is not.
    assert set(state["ema"]) == {k for k, v in state["model"].items() if v.is_floating_point()}
    assert "quantize.code_counts" in state["model"] and "quantize.codebook" in state["ema"]
    assert any(not torch.equal(state["ema"][k], state["model"][k]) for k in state["ema"])
    assert run["weights"] == "ema"
    with open(f"{run['run']}/log.jsonl") as log:
        records = [json.loads(line) for line in log]
    assert [r["weights"] for r in records if r["event"] == "eval"] == ["ema"]


def test_a_checkpoint_with_ema_loads_them_unless_raw_weights(run):
    state = load_checkpoint(run["checkpoint"])
    loaded = load_model(run["checkpoint"])
    assert loaded.weights == "ema" and "ema" not in loaded.checkpoint
    weights = loaded.model.state_dict()
    for name, value in weights.items():  # parameters from "ema", buffers from "model"
        assert torch.equal(value, state["ema"].get(name, state["model"][name])), name
    raw = load_model(run["checkpoint"], raw_weights=True)
    assert raw.weights == "trained"
    for name, value in raw.model.state_dict().items():
        assert torch.equal(value, state["model"][name]), name


def test_the_ema_weights_are_checked_as_the_trained_ones(run, tmp_path):
    state = load_checkpoint(run["checkpoint"])
    bad = tmp_path / "nan.pt"
    save_checkpoint({**state, "ema": {**state["ema"], "decoder.conv_out.bias": state["ema"]["decoder.conv_out.bias"]
                                      * float("nan")}}, bad)
    with pytest.raises(ValueError, match=rf"^checkpoint {bad} \(EMA weights\): 3 weights are not finite \(NaN or inf\), "
                                         r"the first in 'decoder.conv_out.bias'$"):
        load_model(bad)
    assert load_model(bad, raw_weights=True).weights == "trained"  # the trained weights are fine
    state["ema"]["encoder.conv_in.weight"] = state["ema"]["encoder.conv_in.weight"][:1]
    save_checkpoint(state, bad)
    with pytest.raises(ValueError, match=r"\(EMA weights\): the weights do not match the model config: keys 1 of "
                                         r"another shape \('encoder.conv_in.weight'"):
        load_model(bad)


def test_eval_reports_which_weights(run, tmp_path, capsys):
    images = random_images(tmp_path / "val", count=2)
    for flag, weights, printed in (([], "ema", "EMA weights"), (["--raw-weights"], "trained", "trained weights")):
        out = tmp_path / weights
        assert main(["eval", run["checkpoint"], "--data", str(images), "--out", str(out), *flag]) == 0
        assert f"(step 2, {printed})" in capsys.readouterr().out
        assert json.loads((out / "eval.json").read_text())["weights"] == weights
    ema, trained = (json.loads((tmp_path / w / "eval.json").read_text())["resolutions"]["32"]["psnr"]
                    for w in ("ema", "trained"))
    assert ema != trained  # two different models were evaluated


def test_export_writes_the_ema_weights_and_says_so(run, tmp_path, capsys):
    state = load_checkpoint(run["checkpoint"])
    assert main(["export", run["checkpoint"], "--out", str(tmp_path / "ema")]) == 0
    assert "kepler export: EMA weights" in capsys.readouterr().out
    manifest = yaml.safe_load((tmp_path / "ema" / CONFIG_FILE).read_text())
    assert manifest["ema_decay"] == 0.5
    card = (tmp_path / "ema" / CARD_FILE).read_text()
    assert "Weights: the exponential moving average (decay 0.5)" in card and "| psnr |" in card
    exported = load_model(tmp_path / "ema")
    assert exported.weights == "ema"
    assert torch.equal(exported.model.decoder.conv_out.weight, state["ema"]["decoder.conv_out.weight"])
    with pytest.raises(ValueError, match="holds only the EMA weights it was exported with"):
        load_model(tmp_path / "ema", raw_weights=True)

    assert main(["export", run["checkpoint"], "--out", str(tmp_path / "raw"), "--raw-weights"]) == 0
    assert "kepler export: trained weights" in capsys.readouterr().out
    assert "ema_decay" not in yaml.safe_load((tmp_path / "raw" / CONFIG_FILE).read_text())
    card = (tmp_path / "raw" / CARD_FILE).read_text()
    assert "Weights: the trained weights" in card and "| psnr |" not in card  # metrics.json is the EMA's
    raw = load_model(tmp_path / "raw")
    assert raw.weights == "trained"
    assert torch.equal(raw.model.decoder.conv_out.weight, state["model"]["decoder.conv_out.weight"])


@pytest.mark.parametrize("command", ["reconstruct", "encode"])
def test_the_image_commands_say_which_weights(run, tmp_path, capsys, command):
    photo = random_images(tmp_path / "images", count=1) / "img0.png"
    assert main([command, run["checkpoint"], str(photo), "--out", str(tmp_path / "a")]) == 0
    assert f"kepler {command}: {run['checkpoint']} (step 2, EMA weights)" in capsys.readouterr().out
    assert main([command, run["checkpoint"], str(photo), "--out", str(tmp_path / "b"), "--raw-weights"]) == 0
    assert f"kepler {command}: {run['checkpoint']} (step 2, trained weights)" in capsys.readouterr().out


def test_init_from_starts_from_the_ema_weights(run, tmp_path):
    state = load_checkpoint(run["checkpoint"])
    config = tiny_config(tmp_path, steps=1, disc_start=100)
    cfg = load_config(config, [f"run_dir={tmp_path / 'next'}", f"train.init_from={run['checkpoint']}",
                               "optim.base_lr=1e-30", "train.ema_decay=0.9", "train.eval_every=1"])
    trainer = Trainer(cfg, init_distributed("cpu"))
    for name, value in trainer.ema.state_dict().items():  # the average starts from the EMA weights
        assert torch.equal(value, state["ema"][name]), name
    trainer._close()
