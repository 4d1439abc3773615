"""The DINOv2-feature discriminator (loss.disc: dino): loading, frozen backbone, heads only in
checkpoints, off with the path when its weights are missing, and training through the trainer."""

import json

import pytest
import torch

from kepler.models.dino_discriminator import DinoDiscriminator, default_dino_path, load_dino_discriminator
from kepler.models.vqgan_loss import VQGANLoss

RES = 28  # 2 x 2 patch tokens: a fast ViT on the CPU


def test_loads_the_release_layout_and_computes_one_logit_per_token(dino_weights):
    import timm

    disc, reason = load_dino_discriminator(dino_weights, layers=(2, 5, 8, 11), resolution=RES)
    assert reason is None
    # The file's weights are the backbone's (position embedding resampled from 37 x 37 to 2 x 2 patches).
    state = torch.load(dino_weights, weights_only=True)
    torch.testing.assert_close(disc.backbone.blocks[3].attn.qkv.weight, state["blocks.3.attn.qkv.weight"])
    assert disc.backbone.pos_embed.shape == (1, 1 + 4, 384)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    disc.eval()  # spectral norm's power iteration steps in training mode: the heads would change between calls
    logits = disc(x)
    assert logits.shape == (3, 1, 4 * 4)  # 4 blocks x 4 tokens
    # The backbone is timm's ViT: its features at block 5 are what the second head sees.
    with torch.no_grad():
        reference = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=RES)
        reference.load_state_dict(disc.backbone.state_dict())
        prepared = (torch.nn.functional.interpolate((x + 1) / 2, size=(RES, RES), mode="bilinear", antialias=True)
                    - disc.mean) / disc.std
        tokens = reference.forward_intermediates(prepared, indices=[5], intermediates_only=True, output_fmt="NLC")[0]
        torch.testing.assert_close(logits[..., 4:8], disc.heads[1](tokens.transpose(1, 2)))


def test_timm_safetensors_layout_loads(tmp_path):
    import timm
    from safetensors.torch import save_file

    state = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=RES).state_dict()
    save_file(state, tmp_path / "model.safetensors")
    disc, _ = load_dino_discriminator(tmp_path / "model.safetensors", resolution=RES)
    torch.testing.assert_close(disc.backbone.state_dict()["blocks.0.mlp.fc1.weight"], state["blocks.0.mlp.fc1.weight"])


def test_the_backbone_stays_frozen_in_eval_mode_and_out_of_the_state_dict(dino_weights):
    disc, _ = load_dino_discriminator(dino_weights, resolution=RES)
    disc.requires_grad_(True).train()
    assert not any(p.requires_grad for p in disc.backbone.parameters())
    assert all(p.requires_grad for p in disc.heads.parameters())
    assert not disc.backbone.training and disc.heads.training
    state = disc.state_dict()
    assert state and all(key.startswith("heads.") for key in state)
    # A checkpoint's heads load into a discriminator built from the same file; the backbone stays.
    other, _ = load_dino_discriminator(dino_weights, resolution=RES)
    backbone = {k: v.clone() for k, v in other.backbone.state_dict().items()}
    other.load_state_dict(state)
    for key, value in other.state_dict().items():
        assert torch.equal(value, state[key]), key
    for key, value in other.backbone.state_dict().items():
        assert torch.equal(value, backbone[key]), key
    # The generator's gradient reaches the images through the frozen ViT; detached images build no graph.
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    disc(x).mean().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad is None for p in disc.backbone.parameters())


def test_missing_weights_turn_the_gan_off_and_name_the_path(tmp_path, caplog):
    missing = tmp_path / "nowhere" / "dinov2_vits14_pretrain.pth"
    loss = VQGANLoss(perceptual_weight=0.0, disc_start=0, disc="dino", dino_weights=str(missing))
    assert loss.discriminator is None and not loss.gan_active(10)
    assert loss.disc_status == f"off: no weights at {missing}"
    assert f"GAN off (loss.disc is dino): no weights at {missing}" in caplog.text
    assert default_dino_path("vit_base_patch14_dinov2").name == "dinov2_vitb14_pretrain.pth"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"model": "vit_small_patch16_224"}, "dino_model must be one of vit_small_patch14_dinov2, "),
        ({"resolution": 30}, "dino_resolution must be a positive multiple of the ViT's patch, 14, got 30"),
        ({"layers": (2, 12)}, r"dino_layers must be distinct blocks in \[0, 11\] of vit_small_patch14_dinov2, got \[2, 12\]"),
        ({"layers": ()}, r"dino_layers must be distinct blocks"),
    ],
)
def test_bad_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DinoDiscriminator(**{"resolution": RES, **kwargs})


def test_weights_of_another_model_or_not_weights_are_refused(tmp_path, dino_weights):
    with pytest.raises(ValueError, match=f"DINOv2 weights {dino_weights} does not fit vit_base_patch14_dinov2"):
        load_dino_discriminator(dino_weights, model="vit_base_patch14_dinov2", resolution=RES)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=f"DINOv2 weights {bad} could not be read as safetensors"):
        load_dino_discriminator(bad, resolution=RES)
    with pytest.raises(ValueError, match="disc must be one of patchgan, dino, got 'stylegan'"):
        VQGANLoss(perceptual_weight=0.0, disc="stylegan")


def test_a_run_trains_the_heads_and_reports_the_discriminator(tmp_path, dino_weights, capsys):
    from test_train import tiny_config

    from kepler.cli import main
    from kepler.io.checkpoint import load_checkpoint

    config = tiny_config(tmp_path, steps=3, disc_start=0)
    run = tmp_path / "run"
    dino = ["loss.disc=dino", f"loss.dino_weights={dino_weights}", f"loss.dino_resolution={RES}", "loss.dino_layers=[5,11]"]
    assert main(["train", str(config), f"run_dir={run}", *dino]) == 0
    capsys.readouterr()
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all("d_loss" in r and "g_loss" in r for r in records if r["event"] == "train")
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert all(key.startswith("heads.") for key in state["discriminator"])
    assert json.loads((run / "metrics.json").read_text())["discriminator"] == "dino (vit_small_patch14_dinov2, blocks 5, 11)"
    # Without its weights file the run cannot resume: it would drop the trained heads.
    missing = tmp_path / "moved.pth"
    assert main(["train", str(config), f"run_dir={run}", *dino[:1], f"loss.dino_weights={missing}", *dino[2:],
                 "train.max_steps=4", "--resume"]) != 0
    assert f"has a trained discriminator, but this run's is off: no weights at {missing}" in capsys.readouterr().err
