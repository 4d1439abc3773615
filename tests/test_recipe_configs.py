"""The ImageNet recipe configs (imagenet_vq16: LlamaGen's VQ-16; imagenet_kepler16: the same with the
Kepler partition at 14 bits): they load, hold the values that define the recipe, differ only in the
quantizer, and train here for a few steps with the GAN on, shrunk to a tiny model on the embedded photos."""

import inspect
import json
import math

import pytest
import torch

from kepler.cli import main
from kepler.io.config import load_config, to_dict
from kepler.io.config_files import CONFIGS_DIR, builtin_configs
from kepler.nn import KeplerQuantizer, build_quantizer

RECIPES = ("imagenet_vq16", "imagenet_kepler16")

# A tiny model and data on the embedded photos, for 2 steps on 1 thread; everything else (the f16
# levels, the codebook, l2 norm, losses, optimizer, EMA, bf16) stays the recipe's. The GAN is on from
# step 0 so that its settings (hinge losses, disc weight, both optimizers' clipping) run too.
TINY = [
    "model.ch=8", "model.z_channels=8", "model.norm_groups=4", "model.resolution=32",
    "loss.disc_start=0", "loss.disc_ndf=8",
    "data.train=sample", "data.val=sample", "data.size=32", "data.resize=40", "data.batch_size=2",
    "data.num_workers=0", "data.val_batch_size=4", "data.val_max_images=4",
    "optim.grad_accum=2",
    "train.max_steps=2", "train.eval_every=2", "train.ckpt_every=2", "train.log_every=1", "train.grid_images=0",
    "train.progress=false", "train.threads=1", "device=cpu",
]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads_by_name_as_its_file(name):
    cfg = load_config(name)
    assert cfg.name == name
    assert cfg == load_config(CONFIGS_DIR / f"{name}.yaml")
    assert builtin_configs()[name].kind == "train"


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_shared_settings_are_llamagens(name):
    cfg = load_config(name)
    model, quantizer, loss, optim, train = cfg.model, cfg.model.quantizer, cfg.loss, cfg.optim, cfg.train
    # VQ-16: f16 (4 downsamplings) VQGAN of 128 channels, 256 latent channels, 8-d codes at 256x256
    assert len(model.ch_mult) - 1 == 4 and 2 ** (len(model.ch_mult) - 1) == 16
    assert (model.ch, list(model.ch_mult), model.num_res_blocks, model.z_channels) == (128, [1, 1, 2, 2, 4], 2, 256)
    assert model.embed_dim == 8 and cfg.data.size == 256 and model.resolution == 256
    # l2-normalized codes, beta 0.25 on the commitment term, no entropy loss (LlamaGen's default)
    assert quantizer.l2_norm is True and quantizer.beta == 0.25 and quantizer.legacy is False
    assert quantizer.entropy_weight == 0.0 and quantizer.ema_decay is None
    assert quantizer.kepler_kl_weight == 0.0 and quantizer.packing_weight == 0.0
    # losses
    assert (loss.rec_loss, loss.pixel_weight, loss.perceptual_weight, loss.codebook_weight) == ("l2", 1.0, 1.0, 1.0)
    assert (loss.disc_start, loss.disc_weight, loss.disc_loss, loss.gen_loss) == (20000, 0.5, "hinge", "hinge")
    assert (loss.disc_ndf, loss.disc_num_layers, loss.lecam_weight) == (64, 3, 0.0)
    # Adam(0.9, 0.95) at a constant 1e-4, unscaled, no weight decay, clipped at 1.0, 128 images a step
    assert (optim.name, optim.base_lr, list(optim.betas), optim.weight_decay) == ("adam", 1e-4, [0.9, 0.95], 0.0)
    assert (optim.scale_lr, optim.schedule, optim.warmup_steps, optim.grad_clip) == (False, "constant", 0, 1.0)
    assert cfg.data.batch_size * optim.grad_accum == 128
    # EMA of the weights, bf16, 40 epochs of ImageNet-1k at 128 a step
    assert train.ema_decay == 0.9999 and train.precision == "bf16"
    assert train.max_steps == 40 * (1281167 // 128)


def _bits_per_position(cfg) -> float:
    quantizer = build_quantizer(to_dict(cfg.model.quantizer), dim=cfg.model.embed_dim)
    return quantizer.tokens_per_position * math.log2(quantizer.codebook_size)


def test_vq16_is_plain_vq_of_16384_8d_codes():
    cfg = load_config("imagenet_vq16")
    quantizer = cfg.model.quantizer
    assert quantizer.type == "kepler" and quantizer.partitions == 1 and quantizer.num_codes == 16384
    assert cfg.model.embed_dim // quantizer.partitions == 8
    assert _bits_per_position(cfg) == 14


def test_kepler16_is_two_shared_128_code_partitions_at_the_same_bits():
    cfg = load_config("imagenet_kepler16")
    quantizer = cfg.model.quantizer
    assert quantizer.partitions == 2 and quantizer.num_codes == 128 and quantizer.shared_codebook is True
    assert quantizer.partition == "group" and cfg.model.embed_dim // quantizer.partitions == 4
    assert quantizer.num_codes ** quantizer.partitions == 16384 and _bits_per_position(cfg) == 14
    # The Kepler KL as kepler's defaults have it (the file does not set it).
    default_kl = inspect.signature(KeplerQuantizer).parameters["kepler_kl_weight"].default
    assert quantizer.kepler_kl_weight == default_kl


def test_the_two_recipes_differ_only_in_the_codebook():
    vq16, kepler16 = (to_dict(load_config(name)) for name in RECIPES)
    differ = {key for key, value in vq16["model"]["quantizer"].items() if kepler16["model"]["quantizer"][key] != value}
    assert differ == {"num_codes", "partitions"}
    for cfg in (vq16, kepler16):
        del cfg["name"], cfg["model"]["quantizer"]
    assert vq16 == kepler16


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_trains_a_few_steps_with_the_gan_on(name, tmp_path):
    run = tmp_path / "run"
    assert main(["train", name, *TINY, f"run_dir={run}"]) == 0
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in steps] == [1, 2]
    for record in steps:  # the GAN from the first step, the l2 reconstruction loss
        for key in ("loss", "l2", "quant_loss", "g_loss", "d_weight", "d_loss"):
            assert math.isfinite(record[key]), key
    (evaluation,) = [r for r in records if r["event"] == "eval"]
    assert evaluation["weights"] == "ema" and math.isfinite(evaluation["psnr"])

    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    cfg = load_config(name)
    quantizer = cfg.model.quantizer
    assert state["config"]["name"] == name and state["config"]["train"]["ema_decay"] == 0.9999
    assert state["config"]["model"]["quantizer"] == to_dict(quantizer)
    sub_dim = cfg.model.embed_dim // quantizer.partitions
    assert tuple(state["model"]["quantize.codebook"].shape) == (quantizer.num_codes, sub_dim)
    assert "quantize.codebook" in state["ema"]  # the codebook is averaged with the other weights
    assert json.loads((run / "metrics.json").read_text())["codebook_entries"] == quantizer.num_codes
