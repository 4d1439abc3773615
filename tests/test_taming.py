"""Released Kepler Codebook / taming checkpoints: the released fixture reproduced, the other
partitions and taming's plain quantizer against the released algorithm, every mismatch's message,
``kepler convert`` and fine-tuning from a converted model (``train.init_from``)."""

import functools
import os
import re
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from PIL import Image
from test_train import random_images

from kepler.cli import main
from kepler.data import to_uint8
from kepler.models import VQModel
from kepler.models.taming import from_taming
from kepler.io.config import load_config
from kepler.models.load import load_model
from kepler.train.trainer import train

FIXTURE = Path(__file__).parent / "data" / "released_vqgan_group_p4"
CKPT, CONFIG = FIXTURE / "last.ckpt", FIXTURE / "config.yaml"
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def reference():
    return torch.load(FIXTURE / "reference.pt", weights_only=True)


@pytest.fixture(scope="module")
def converted():
    return from_taming(CKPT, CONFIG)


def assert_float32_rounding(released, ours32, ours64, what):
    """The released float32 result is the float64 value of the converted model up to float32
    rounding: no farther from it than twice our own float32 result, or one float32 step of the
    magnitude where ours happens to be exact."""
    truth = ours64.double()
    ours_error = (ours32.double() - truth).abs().max().item()
    allowed = 2 * max(ours_error, EPS32 * truth.abs().max().item())
    released_error = (released.double() - truth).abs().max().item()
    assert released_error <= allowed, f"{what}: released is {released_error:.3g} from float64, allowed {allowed:.3g}"


# ----------------------------------------------------------------------- the released fixture


def test_released_fixture_is_reproduced(reference, converted):
    model64 = from_taming(CKPT, CONFIG).double()
    x, h = reference["x"], reference["h"]
    with torch.no_grad():
        assert_float32_rounding(reference["h"], converted.latents(x), model64.latents(x.double()), "h")
        z_q, loss, info = converted.quantize(h)
        z_q64, loss64, _ = model64.quantize(h.double())
        assert torch.equal(info[2], reference["indices"])
        assert_float32_rounding(reference["z_q"], z_q, z_q64, "z_q")
        assert_float32_rounding(reference["vq_loss"], loss, loss64, "vq_loss")
        xrec = converted.decode(reference["z_q"])
        assert_float32_rounding(reference["xrec"], xrec, model64.decode(reference["z_q"].double()), "xrec")
        # End to end from the images: the same codes.
        assert torch.equal(converted.encode_to_indices(x), reference["indices"])


def test_vqmodel_from_taming_is_the_converter(reference):
    model = VQModel.from_taming(CKPT, CONFIG)
    assert torch.equal(model.encode_to_indices(reference["x"]), reference["indices"])


# ------------------------------------------------- self-built checkpoints in the released format


def taming_state_dict(model: VQModel) -> dict:
    """Test-only builder: ``model``'s weights under taming's names (the inverse of the converter's
    renaming), plus a discriminator under ``loss.`` as Lightning saves it."""
    levels = len(model.decoder.up)
    state = {}
    for key, tensor in model.state_dict().items():
        if key == "quantize.codebook":
            state["quantize.embedding.weight"] = tensor.clone()
            continue
        if key.startswith("quantize."):
            continue
        parts = key.split(".")
        if parts[:2] == ["decoder", "up"]:
            parts[2] = str(levels - 1 - int(parts[2]))
        resample = "downsample" if parts[0] == "encoder" else "upsample"
        parts = [{"shortcut": "nin_shortcut", "resample": resample}.get(p, p) for p in parts]
        if "qkv" in parts:
            at = parts.index("qkv")
            for name, piece in zip("qkv", tensor.chunk(3)):
                state[".".join(parts[:at] + [name] + parts[at + 1 :])] = piece.clone()
        else:
            state[".".join(parts)] = tensor.clone()
    state["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
    return state


def released_config(partition: str | None, partitions: int, n_embed: int, embed_dim: int, **dd) -> dict:
    """A released YAML config (``partition=None``: taming's own VQModel, no partitions)."""
    ddconfig = dict(double_z=False, z_channels=embed_dim, resolution=32, in_channels=3, out_ch=3, ch=32,
                    ch_mult=[1, 1, 2], num_res_blocks=1, attn_resolutions=[8], dropout=0.0, **dd)
    params = {"embed_dim": embed_dim, "n_embed": n_embed, "ddconfig": ddconfig,
              "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                             "params": {"disc_start": 1, "disc_weight": 0.8, "codebook_weight": 1.0}}}
    if partition is not None:
        params.update(scale=1, partitions=partitions,
                      partitionconfig={"target": f"taming.modules.partition.partition.{partition}",
                                       "params": {"partitions": partitions}},
                      keplerlossconfig={"target": "taming.modules.losses.kepler.KeplerLoss",
                                        "params": {"use": False, "kl_weight": 1e-8}})
    return {"model": {"base_learning_rate": 4.5e-6, "target": "taming.models.vqgan.VQModel", "params": params}}


def released_quantize(h: torch.Tensor, codebook: torch.Tensor, partition: str | None, partitions: int):
    """The released search, as read in VectorQuantizer_kepler and its partition classes: latents
    (b, c, h, w) -> (b, h, w, c), cut into rows by the partition class, nearest codeword by
    ``z^2 + e^2 - 2 z.e`` (float64 here: no near ties), codewords put back. Taming's
    VectorQuantizer2 is ``GroupPartition`` with one partition. Returns the flat indices and z_q."""
    z = h.double().permute(0, 2, 3, 1)
    e = codebook.double()
    if partition in (None, "GroupPartition"):
        rows = z.reshape(-1, z.shape[-1] // partitions)
    elif partition == "CustomPartition":
        paired = z.reshape(*z.shape[:3], z.shape[3] // 2, 2).permute(0, 1, 2, 4, 3)
        rows = paired.reshape(-1, paired.shape[-1] * 2 // partitions)
    else:  # LayerPartition
        channel_maps = z.permute(0, 3, 1, 2)
        rows = channel_maps.reshape(-1, channel_maps.shape[-1] * channel_maps.shape[-2] // partitions)
    distances = (rows**2).sum(1, keepdim=True) + (e**2).sum(1) - 2 * rows @ e.T
    indices = distances.argmin(1)
    codes = e[indices]
    if partition in (None, "GroupPartition"):
        z_q = codes.reshape(z.shape)
    elif partition == "CustomPartition":
        z_q = codes.reshape(paired.shape).permute(0, 1, 2, 4, 3).reshape(z.shape)
    else:
        z_q = codes.reshape(channel_maps.shape).permute(0, 2, 3, 1)
    return indices, z_q.permute(0, 3, 1, 2)


def build_released(tmp_path: Path, config: dict, seed: int = 0) -> tuple[Path, Path, VQModel]:
    """A random kepler model of ``config`` whose codebook spreads over its latents, saved as a
    released Lightning checkpoint + YAML."""
    from kepler.models.taming import taming_config

    torch.manual_seed(seed)
    model = VQModel.from_config(taming_config(config)["model"]).eval()
    with torch.no_grad():
        spread = model.latents(torch.rand(2, 3, 32, 32) * 2 - 1).std()
        model.quantize.codebook.copy_(torch.randn_like(model.quantize.codebook) * spread)
    ckpt = {"state_dict": taming_state_dict(model), "global_step": 7, "epoch": 1,
            "pytorch-lightning_version": "1.0.8", "optimizer_states": [], "lr_schedulers": []}
    torch.save(ckpt, tmp_path / "last.ckpt")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "last.ckpt", tmp_path / "config.yaml", model


@pytest.mark.parametrize("partition, partitions, n_embed, embed_dim, ch_mult, attn", [
    ("GroupPartition", 4, 64, 32, [1, 1, 2], [8]),
    ("CustomPartition", 4, 64, 32, [1, 1, 2], [8]),
    ("CustomPartition", 2, 32, 32, [1, 2], [16]),
    ("LayerPartition", 4, 64, 64, [1, 1, 1], []),  # needs H*W == embed_dim: 8 x 8 latents of 64 channels
    (None, 1, 64, 32, [1, 1, 2], [8]),  # taming's VectorQuantizer2
])
def test_self_built_checkpoints_follow_the_released_algorithm(tmp_path, partition, partitions, n_embed, embed_dim,
                                                              ch_mult, attn):
    config = released_config(partition, partitions, n_embed, embed_dim)
    config["model"]["params"]["ddconfig"].update(ch_mult=ch_mult, attn_resolutions=attn)
    ckpt, yaml_path, original = build_released(tmp_path, config)
    model = from_taming(ckpt, yaml_path)
    expected_partition = {None: "group", "GroupPartition": "group", "CustomPartition": "custom",
                          "LayerPartition": "layer"}[partition]
    assert model.quantize.partition.name == expected_partition and model.quantize.partitions == partitions
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        h = model.latents(x)
        z_q, _, info = model.quantize(h)
        released_indices, released_z_q = released_quantize(
            h, torch.load(ckpt, weights_only=True)["state_dict"]["quantize.embedding.weight"], partition, partitions)
        assert info[2].shape == (3, *h.shape[2:], partitions)
        assert torch.equal(info[2].reshape(-1), released_indices)
        assert len(released_indices.unique()) > n_embed // 4  # a search that means something
        torch.testing.assert_close(z_q.double(), released_z_q, rtol=0, atol=0)
        torch.testing.assert_close(model(x)[0], original(x)[0], rtol=0, atol=0)


def test_released_kepler_loss_becomes_the_kl_weight(tmp_path):
    config = released_config("GroupPartition", 4, 64, 32)
    config["model"]["params"]["keplerlossconfig"]["params"].update(use=True, kl_weight=1e-3, n_e=64)
    from kepler.models.taming import taming_config

    quantizer = taming_config(config)["model"]["quantizer"]
    assert quantizer["kepler_kl_weight"] == 1e-3 and quantizer["kl_prior"] == "grid" and quantizer["kl_prior_seed"] == 0
    ckpt, yaml_path, _ = build_released(tmp_path, config)
    assert "quantize.kl_prior_points" in from_taming(ckpt, yaml_path).state_dict()


# -------------------------------------------------------------------------------- mismatches


def _fixture_config(**changes) -> dict:
    config = OmegaConf.to_container(OmegaConf.load(CONFIG))
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        section = config
        for key in parents:
            section = section[key]
        section[last] = value
    return config


@pytest.mark.parametrize("change, message", [
    ({"model.params.ddconfig.ch": 64},
     "'encoder.conv_in.weight' has shape (32, 3, 3, 3) in the checkpoint, the config needs (64, 3, 3, 3)"),
    ({"model.params.n_embed": 128},
     "'quantize.embedding.weight' has shape (64, 8) in the checkpoint, the config needs (128, 8)"),
    ({"model.params.partitions": 2, "model.params.partitionconfig.params.partitions": 2},
     "'quantize.embedding.weight' has shape (64, 8) in the checkpoint, the config needs (64, 16)"),
    ({"model.params.ddconfig.attn_resolutions": [8, 16]},
     "'encoder.down.1.attn.0.norm.weight' is missing (the config needs it, of shape (32,))"),
    ({"model.params.ddconfig.attn_resolutions": []},
     "30 weight(s) the config does not describe, the first 'encoder.down.2.attn.0.norm.weight' of shape (64,)"),
])
def test_config_that_does_not_match_the_checkpoint(tmp_path, change, message):
    with pytest.raises(ValueError) as error:
        from_taming(CKPT, _fixture_config(**change))
    assert str(error.value) == f"checkpoint {CKPT}: {message}"


@pytest.mark.parametrize("change, message", [
    ({"model.params.partitionconfig.target": "taming.modules.partition.partition.RandomPartition"},
     "model.params.partitionconfig.target 'taming.modules.partition.partition.RandomPartition' is not a released "
     "partition; kepler converts GroupPartition, CustomPartition, LayerPartition"),
    ({"model.params.partitionconfig.params.partitions": 2},
     "model.params.partitionconfig.params.partitions=2 differs from model.params.partitions=4"),
    ({"model.target": "taming.models.vqgan.GumbelVQ"},
     "model.target 'taming.models.vqgan.GumbelVQ' is not taming.models.vqgan.VQModel, the model kepler converts"),
    ({"model.params.ddconfig.double_z": True},
     "model.params.ddconfig.double_z is True; kepler's VQModel has only double_z=False"),
    ({"model.params.remap": "used.npy"}, "model.params.remap is 'used.npy'; kepler has no index remapping"),
    ({"model.params.ddconfig": {"ch": 32}}, "model.params.ddconfig.out_ch is missing"),
])
def test_config_that_kepler_cannot_express(change, message):
    with pytest.raises(ValueError) as error:
        from_taming(CKPT, _fixture_config(**change))
    assert str(error.value) == f"taming config: {message}"


def test_config_errors_name_the_file(tmp_path):
    path = tmp_path / "released.yaml"
    path.write_text(yaml.safe_dump(_fixture_config(**{"model.params.ddconfig.double_z": True})))
    with pytest.raises(ValueError, match=re.escape(f"config file {path}: model.params.ddconfig.double_z is True")):
        from_taming(CKPT, path)


def test_checkpoint_without_a_state_dict(tmp_path):
    path = tmp_path / "weights.ckpt"
    torch.save({"model": {"a": torch.zeros(1)}, "epoch": 3}, path)
    with pytest.raises(ValueError) as error:
        from_taming(path, CONFIG)
    assert str(error.value) == (f"checkpoint {path} has no 'state_dict' mapping (a Lightning checkpoint keeps the "
                                f"weights there); it holds 'model', 'epoch'")


def test_released_group_norm_variant_is_named(tmp_path):
    state = torch.load(CKPT, weights_only=True)
    state["state_dict"]["encoder.norm_out.gn.weight"] = torch.ones(64)
    torch.save(state, tmp_path / "gn.ckpt")
    with pytest.raises(ValueError, match=re.escape("'.gn.' weights come from the released taming/bn.py myGroupNorm")):
        from_taming(tmp_path / "gn.ckpt", CONFIG)


def lightning_checkpoint(path: Path, extra: dict) -> Path:
    """The fixture saved as Lightning would, with ``extra`` entries beside the weights."""
    state = torch.load(CKPT, weights_only=True)
    torch.save({**state, **extra}, path)
    return path


def lightning_1x_callbacks(patch: pytest.MonkeyPatch) -> dict:
    """Lightning 1.x keyed ``callbacks`` by the callback's class: pickled as a reference to
    pytorch_lightning's ModelCheckpoint. Stand-in modules (under ``patch``) let this test write it
    without pytorch_lightning installed."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    for name in names:
        patch.setitem(sys.modules, name, types.ModuleType(name))
    model_checkpoint = type("ModelCheckpoint", (), {"__module__": names[-1]})
    sys.modules[names[-1]].ModelCheckpoint = model_checkpoint
    return {model_checkpoint: {"best_model_score": torch.tensor(0.5), "best_model_path": "last.ckpt"}}


def test_lightning_objects_are_refused_until_named(tmp_path, reference, monkeypatch, capsys):
    """Lightning's callbacks (keyed by class) and OmegaConf hyper-parameters are refused by
    weights_only: the error names every global; --stub-global reads them as inert placeholders,
    --trust-global imports them."""
    with monkeypatch.context() as patch:
        callbacks = lightning_1x_callbacks(patch)
        path = lightning_checkpoint(tmp_path / "lightning.ckpt", {
            "callbacks": callbacks, "hyper_parameters": OmegaConf.create({"n_embed": 64, "ch_mult": [1, 1, 2]})})
    with pytest.raises(ValueError) as error:
        from_taming(path, CONFIG)
    message = str(error.value)
    assert message.startswith(f"checkpoint {path} holds more than tensors and plain containers (it asks for ")
    names = re.search(r"it asks for ([^)]*)\)", message).group(1).split(", ")
    assert names == sorted(names)
    assert {"omegaconf.dictconfig.DictConfig", "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"} <= set(names)
    assert "--stub-global pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint" in message
    assert "--trust-global NAME" in message and "torch.serialization.add_safe_globals" in message
    assert "\n" not in message
    # Trusting imports: pytorch_lightning is not installed here.
    with pytest.raises(ValueError) as error:
        from_taming(path, CONFIG, trusted_globals=names)
    assert str(error.value) == ("trusted global 'pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint' "
                                "is not an importable module.name")
    model = from_taming(path, CONFIG, stubbed_globals=names)
    assert torch.equal(model.encode_to_indices(reference["x"]), reference["indices"])
    # The importable ones can be trusted instead, the rest stubbed.
    trusted = [name for name in names if not name.startswith("pytorch_lightning.")]
    model = from_taming(path, CONFIG, trusted_globals=trusted,
                        stubbed_globals=["pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"])
    assert torch.equal(model.encode_to_indices(reference["x"]), reference["indices"])
    # The command line: refused, then read with a flag per global.
    out = tmp_path / "converted"
    assert main(["convert", str(path), "--config", str(CONFIG), "--out", str(out)]) == 2
    assert "--stub-global omegaconf.dictconfig.DictConfig" in capsys.readouterr().err
    flags = [arg for name in names for arg in ("--stub-global", name)]
    assert main(["convert", str(path), "--config", str(CONFIG), "--out", str(out), *flags]) == 0


class _Planted:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_stubbing_runs_nothing(tmp_path, monkeypatch):
    """A stubbed global is a placeholder, never the original: a file whose weights are not tensors
    is still refused, and modules torch blocks stay blocked."""
    with monkeypatch.context() as patch:
        callbacks = lightning_1x_callbacks(patch)
        weights = {"state_dict": {"encoder.conv_in.weight": next(iter(callbacks))}}
        torch.save(weights, tmp_path / "class_as_weight.ckpt")
    with pytest.raises(ValueError) as error:
        from_taming(tmp_path / "class_as_weight.ckpt", CONFIG,
                    stubbed_globals=["pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"])
    assert str(error.value) == (f"checkpoint {tmp_path / 'class_as_weight.ckpt'}: state_dict entry "
                                "'encoder.conv_in.weight' is not a named tensor")
    marker = tmp_path / "code_ran"
    path = lightning_checkpoint(tmp_path / "planted.ckpt", {"hyper_parameters": _Planted(marker)})
    with pytest.raises(ValueError) as error:
        from_taming(path, CONFIG, stubbed_globals=[f"{os.mkdir.__module__}.mkdir"])
    assert str(error.value) == (f"checkpoint {path} asks for {os.mkdir.__module__}.mkdir, from a module torch never "
                                "unpickles; refused to unpickle it")
    assert not marker.exists()


def test_trusted_global_must_be_importable():
    with pytest.raises(ValueError) as error:
        from_taming(CKPT, CONFIG, trusted_globals=["no_such_module.Thing"])
    assert str(error.value) == "trusted global 'no_such_module.Thing' is not an importable module.name"


# --------------------------------------------------------------------------- kepler convert


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("convert") / "released_p4"
    assert main(["convert", str(CKPT), "--config", str(CONFIG), "--out", str(out)]) == 0
    return out


def test_convert_writes_a_kepler_checkpoint_and_config(converted_dir, reference):
    loaded = load_model(converted_dir / "model.pt")
    model = loaded.model
    assert loaded.step == 0 and loaded.config["data"]["size"] == 32
    assert load_model(converted_dir).model.state_dict().keys() == model.state_dict().keys()  # the folder too
    for key, tensor in from_taming(CKPT, CONFIG).state_dict().items():
        assert torch.equal(model.state_dict()[key], tensor), key
    assert torch.equal(model.encode_to_indices(reference["x"]), reference["indices"])
    cfg = load_config(converted_dir / "config.yaml")
    assert OmegaConf.to_container(cfg.model) == loaded.config["model"]
    assert cfg.model.quantizer.partition == "group" and cfg.model.norm_groups == 32
    assert cfg.optim.base_lr == 4.5e-6 and cfg.loss.disc_ndf == 8 and cfg.loss.disc_num_layers == 2
    assert Path(cfg.train.init_from) == (converted_dir / "model.pt").resolve()


def test_converted_model_works_with_every_command(tmp_path, converted_dir, converted, reference, capsys):
    image = tmp_path / "image.png"
    Image.fromarray(to_uint8(reference["x"][0])).save(image)
    model_pt = str(converted_dir / "model.pt")
    assert main(["reconstruct", model_pt, str(image), "--out", str(tmp_path / "recon")]) == 0
    assert main(["encode", model_pt, str(image), "--out", str(tmp_path / "codes")]) == 0
    assert main(["decode", model_pt, str(tmp_path / "codes" / "image.npy"), "--out", str(tmp_path / "decoded")]) == 0
    x = torch.from_numpy(np.asarray(Image.open(image), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    codes = np.load(tmp_path / "codes" / "image.npy")
    assert np.array_equal(codes, converted.encode_to_indices(x)[0].numpy())
    pair = np.asarray(Image.open(tmp_path / "recon" / "image_recon.png"))
    with torch.no_grad():
        assert np.array_equal(pair[:, 32:], to_uint8(converted(x)[0][0]))
    assert (tmp_path / "decoded" / "image.png").is_file()
    capsys.readouterr()
    assert main(["eval", model_pt, "--data", str(random_images(tmp_path / "val", count=2)), "--batch-size", "2"]) == 0
    assert "psnr" in capsys.readouterr().out


def test_convert_never_replaces_an_input_or_an_earlier_conversion(tmp_path, capsys):
    """--out the released folder would replace its config.yaml with kepler's; an output holding an
    input, or an earlier conversion without --overwrite, is refused before anything is written."""
    released = tmp_path / "released"
    released.mkdir()
    ckpt, config = shutil.copy(CKPT, released / "last.ckpt"), shutil.copy(CONFIG, released / "config.yaml")
    before = Path(config).read_bytes()
    assert main(["convert", str(ckpt), "--config", str(config), "--out", str(released)]) == 2
    assert capsys.readouterr().err == (f"kepler convert: error: --out {released}: config.yaml would overwrite the "
                                       f"config being converted ({released / 'config.yaml'}); write the conversion "
                                       "into another folder\n")
    assert Path(config).read_bytes() == before and not (released / "model.pt").exists()
    model_pt = released / "model.pt"
    shutil.copy(CKPT, model_pt)  # a checkpoint named like the output
    assert main(["convert", str(model_pt), "--config", str(CONFIG), "--out", str(released), "--overwrite"]) == 2
    assert "model.pt would overwrite the checkpoint being converted" in capsys.readouterr().err
    out = tmp_path / "out"
    assert main(["convert", str(ckpt), "--config", str(config), "--out", str(out)]) == 0
    first = (out / "model.pt").read_bytes()
    capsys.readouterr()
    assert main(["convert", str(ckpt), "--config", str(config), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"kepler convert: error: --out {out} holds an earlier conversion (model.pt, "
                                       "config.yaml); pass --overwrite to replace it\n")
    assert main(["convert", str(ckpt), "--config", str(config), "--out", str(out), "--overwrite"]) == 0
    assert (out / "model.pt").read_bytes() == first  # the same conversion again


def test_convert_checks_a_config_before_it_builds_the_model(tmp_path, capsys, monkeypatch):
    """ch: 100000 tried to allocate 360 GB, and sizes that fit were allocated before the mismatch was
    reported: the model is built on the meta device first. n_embed: abc was a traceback."""
    devices = []
    init = VQModel.__init__

    @functools.wraps(init)  # the config schema reads the constructor's signature
    def spy(self, **arguments):
        devices.append(torch.get_default_device().type)
        init(self, **arguments)

    monkeypatch.setattr(VQModel, "__init__", spy)
    config = yaml.safe_load(CONFIG.read_text())
    config["model"]["params"]["ddconfig"]["ch"] = 100000
    (tmp_path / "huge.yaml").write_text(yaml.safe_dump(config))
    assert main(["convert", str(CKPT), "--config", str(tmp_path / "huge.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.endswith(f"checkpoint {CKPT}: 'encoder.conv_in.weight' has shape (32, 3, 3, 3) in "
                                            "the checkpoint, the config needs (100000, 3, 3, 3)\n")
    assert devices == ["meta"]
    config["model"]["params"]["ddconfig"]["ch"] = 32
    config["model"]["params"]["n_embed"] = "abc"
    (tmp_path / "abc.yaml").write_text(yaml.safe_dump(config))
    assert main(["convert", str(CKPT), "--config", str(tmp_path / "abc.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err == (f"kepler convert: error: checkpoint {CKPT}: config key "
                                       "'model.quantizer.num_codes' must be an integer, got 'abc'\n")


def test_convert_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: kepler convert" in out and "--stub-global" in out and "--trust-global" in out


def test_convert_command_errors(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing.ckpt"), "--config", str(CONFIG), "--out", str(tmp_path)]) == 2
    assert f"kepler convert: error: checkpoint {tmp_path / 'missing.ckpt'} does not exist" in capsys.readouterr().err
    assert main(["convert", str(CKPT), "--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path)]) == 2
    assert f"config file {tmp_path / 'missing.yaml'} does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------- fine-tuning: train.init_from


def test_training_starts_from_the_converted_weights(tmp_path, converted_dir, converted):
    images = random_images(tmp_path / "images")
    overrides = [f"run_dir={tmp_path / 'run'}", f"data.train={images}", f"data.val={images}", "data.batch_size=2",
                 "data.resize=32", "train.max_steps=2", "train.eval_every=2", "train.ckpt_every=2",
                 "train.progress=false", "loss.perceptual_weight=0", "optim.base_lr=1e-12", "optim.scale_lr=false"]
    metrics = train(load_config(converted_dir / "config.yaml", overrides))
    trained = load_model(metrics["checkpoint"])
    assert trained.step == 2
    trained = trained.model
    # Two Adam steps at lr 1e-12 move no weight by more than ~2e-12: the run began at the converted weights.
    for key, tensor in converted.state_dict().items():
        if tensor.is_floating_point():
            torch.testing.assert_close(trained.state_dict()[key], tensor, rtol=0, atol=1e-9, msg=key)


def test_init_from_errors(tmp_path, converted_dir):
    with pytest.raises(ValueError) as error:
        load_config(converted_dir / "config.yaml", [f"train.init_from={tmp_path / 'none.pt'}"])
    assert str(error.value) == f"config key 'train.init_from': {tmp_path / 'none.pt'} does not exist"
    with pytest.raises(ValueError) as error:
        load_config(None, ["train.init_from=5"])
    assert str(error.value) == "config key 'train.init_from' must be a string or null, got 5"
    images = random_images(tmp_path / "images")
    cfg = load_config(converted_dir / "config.yaml", [f"run_dir={tmp_path / 'run'}", f"data.train={images}",
                                                     f"data.val={images}", "model.ch=64", "loss.perceptual_weight=0"])
    with pytest.raises(ValueError) as error:
        train(cfg)
    assert str(error.value).startswith(f"train.init_from {cfg.train.init_from}: the weights do not match "
                                       "the model config: keys ")
