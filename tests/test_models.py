"""VQModel, encoder/decoder, discriminator and losses (tiny shapes, CPU)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kepler.models import (
    LPIPS,
    Decoder,
    Encoder,
    NLayerDiscriminator,
    VQGANLoss,
    VQModel,
    adaptive_generator_weight,
    hinge_d_loss,
    load_lpips,
)
from kepler.models.lpips import VGG_FILENAME

ARCH = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), z_channels=8, resolution=16, norm_groups=4)


def tiny_model(**quantizer) -> VQModel:
    q = dict(num_codes=16, partitions=4)
    q.update(quantizer)
    return VQModel(embed_dim=8, quantizer=q, **ARCH)


def test_encoder_decoder_shapes_and_attention_placement():
    enc = Encoder(in_channels=3, **ARCH)
    dec = Decoder(out_ch=3, **ARCH)
    x = torch.randn(2, 3, 16, 16)
    z = enc(x)
    assert z.shape == (2, 8, 8, 8)
    assert dec(z).shape == (2, 3, 16, 16)
    # attention only at the configured resolution 8 (encoder level 1, decoder level of size 8)
    assert len(enc.down[0].attn) == 0 and len(enc.down[1].attn) == 1
    assert len(dec.up[0].attn) == 2 and len(dec.up[1].attn) == 0
    # the decoder has one more ResNet block per level than the encoder, as in taming
    assert len(dec.up[0].block) == len(enc.down[0].block) + 1


def test_f16_architecture_matches_taming_downsampling():
    enc = Encoder(ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(16,), z_channels=16,
                  resolution=256)
    assert enc(torch.randn(1, 3, 64, 64)).shape == (1, 16, 4, 4)


@pytest.mark.parametrize("size", [(16, 16), (24, 32), (8, 40)])
def test_vqmodel_is_fully_convolutional(size):
    model = tiny_model()
    x = torch.randn(2, 3, *size)
    rec, loss, info = model(x)
    assert rec.shape == x.shape
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert info.indices.shape == (2, size[0] // 2, size[1] // 2, 4)
    assert info.indices.dtype == torch.int64


def test_indices_round_trip_matches_forward():
    model = tiny_model().eval()
    x = torch.randn(3, 3, 16, 16)
    indices = model.encode_to_indices(x)
    with torch.no_grad():
        expected = model(x)[0]
    torch.testing.assert_close(model.decode_indices(indices), expected, rtol=0, atol=0)


def test_per_partition_codebooks_round_trip():
    model = tiny_model(shared_codebook=False).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.decode_indices(model.encode_to_indices(x)), model(x)[0])


def test_gradients_reach_encoder_decoder_and_codebook():
    model = tiny_model()
    rec, loss, _ = model(torch.randn(2, 3, 16, 16))
    (rec.abs().mean() + loss).backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.decoder.conv_out.weight.grad.abs().sum() > 0
    assert model.quantize.codebook.grad.abs().sum() > 0


def test_bad_inputs_are_named():
    model = tiny_model()
    with pytest.raises(ValueError, match="multiples of the downsampling factor 2"):
        model(torch.randn(1, 3, 15, 16))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        model(torch.randn(3, 16, 16))
    with pytest.raises(ValueError, match=r"indices must be \(B, H, W, P=4\), got shape \(4, 4, 4\)"):
        model.decode_indices(torch.zeros(4, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"indices must be in \[0, 16\), got \[0, 16\]"):
        model.decode_indices(torch.tensor([0, 16, 1, 2]).view(1, 1, 1, 4))
    with pytest.raises(TypeError, match="int32 or int64"):
        model.decode_indices(torch.zeros(1, 1, 1, 4))
    with pytest.raises(ValueError, match="ch_mult"):
        Encoder(ch=8, ch_mult=(), num_res_blocks=1, attn_resolutions=(), z_channels=4, resolution=16)


def test_discriminator_patch_logits_and_hinge_loss():
    disc = NLayerDiscriminator(in_channels=3, ndf=8, n_layers=2)
    logits = disc(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 1, 6, 6)
    real = torch.tensor([2.0, 0.5])
    fake = torch.tensor([-2.0, 0.5])
    # relu(1 - real) = [0, 0.5], relu(1 + fake) = [0, 1.5]
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (0.25 + 0.75))


def test_adaptive_weight_is_gradient_norm_ratio():
    w = torch.randn(4, requires_grad=True)
    nll = (3.0 * w).sum()
    g = (0.5 * w).sum()
    weight = adaptive_generator_weight(nll, g, w, disc_weight=0.8)
    expected = 0.8 * (3.0 * 2) / (0.5 * 2 + 1e-4)
    assert weight.item() == pytest.approx(expected, rel=1e-5)
    assert not weight.requires_grad


def test_gan_terms_start_at_disc_start():
    model = tiny_model()
    loss_fn = VQGANLoss(disc_start=5, perceptual_weight=0.0, disc_ndf=8, disc_num_layers=2)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    rec, q_loss, _ = model(x)
    before, logs_before = loss_fn.generator_loss(q_loss, x, rec, step=4, last_layer=model.last_layer)
    assert "g_loss" not in logs_before
    torch.testing.assert_close(before, (x - rec).abs().mean() + q_loss)
    _, logs_after = loss_fn.generator_loss(q_loss, x, rec, step=5, last_layer=model.last_layer)
    assert "g_loss" in logs_after and logs_after["d_weight"] > 0
    d_loss, _ = loss_fn.discriminator_loss(x, rec, step=4)
    assert d_loss.item() == 0.0
    d_loss, _ = loss_fn.discriminator_loss(x, rec, step=5)
    assert d_loss.item() > 0.0


def test_perceptual_loss_off_without_weights_says_where(tmp_path, caplog):
    missing = tmp_path / "nowhere" / VGG_FILENAME
    with caplog.at_level("WARNING", logger="kepler"):
        loss_fn = VQGANLoss(perceptual_weight=1.0, lpips_vgg_path=str(missing), disc_ndf=8)
    assert loss_fn.perceptual is None and loss_fn.perceptual_weight == 0.0
    assert f"perceptual loss off: no weights at {missing}" in caplog.text
    assert loss_fn.perceptual_status == f"off: no weights at {missing}"


def test_lpips_loads_local_weight_files(tmp_path):
    torch.manual_seed(0)
    reference = LPIPS()
    vgg = {f"features.{k}": v for k, v in reference.features.state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(1)  # extra torchvision keys are ignored
    # LPIPS linear weights are non-negative; keys as in the lpips package: lin<k>.model.1.weight
    lins = {f"lin{k}": v.abs() for k, v in reference.lins.state_dict().items()}
    torch.save(vgg, tmp_path / "vgg.pth")
    torch.save(lins, tmp_path / "lin.pth")
    model, reason = load_lpips(tmp_path / "vgg.pth", tmp_path / "lin.pth")
    assert reason is None
    torch.testing.assert_close(model.features[0].weight, reference.features[0].weight)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.all(model(x, x) == 0)
    d = model(x, -x)
    assert d.shape == (2, 1, 1, 1) and torch.all(d > 0)
    assert not any(p.requires_grad for p in model.parameters())
    model.train()
    assert not model.training


class _Planted:
    """A pickle that makes a directory when it is unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_lpips_refuses_weight_files_that_run_code(tmp_path):
    marker = tmp_path / "code_ran"
    torch.save({"features.0.weight": _Planted(marker)}, tmp_path / "vgg.pth")
    torch.save({}, tmp_path / "lin.pth")
    with pytest.raises(ValueError) as error:
        load_lpips(tmp_path / "vgg.pth", tmp_path / "lin.pth")
    assert not marker.exists()
    assert str(error.value) == (f"LPIPS VGG weights {tmp_path / 'vgg.pth'} asks for {os.mkdir.__module__}.mkdir, from "
                                "a module torch never unpickles; refused to unpickle it")


def test_lpips_missing_linear_weights(tmp_path):
    (tmp_path / "vgg.pth").write_bytes(b"")
    model, reason = load_lpips(tmp_path / "vgg.pth", tmp_path / "missing_lin.pth")
    assert model is None and reason == f"no weights at {tmp_path / 'missing_lin.pth'}"


def test_zero_init_residual_blocks_start_as_identity():
    enc = Encoder(in_channels=3, zero_init_residual=True, **ARCH)
    block = enc.down[0].block[0]
    x = torch.randn(1, 8, 8, 8)
    torch.testing.assert_close(block(x), x)
    attn = enc.mid.attn_1
    y = torch.randn(1, 16, 4, 4)
    torch.testing.assert_close(attn(y), y)
    model = VQModel(embed_dim=8, quantizer=dict(num_codes=16, partitions=4), zero_init_residual=True, **ARCH)
    assert torch.all(model.decoder.up[0].block[0].conv2.weight == 0)
    assert model.decoder.conv_out.weight.abs().sum() > 0


def test_self_attention_memory_is_linear_in_the_positions(tmp_path):
    """The middle block's attention over a 1260x900 photo at f4 (70875 positions) wrote the 20 GB
    position x position matrix: SDPA fell back to its math path on strided q, k, v. At 20000
    positions that matrix is 1.6 GB; the block must run under a 1 GiB data limit."""
    script = tmp_path / "attention.py"
    script.write_text(textwrap.dedent("""
        import resource, torch
        from kepler.models.autoencoder import AttnBlock
        block = AttnBlock(16, norm_groups=4).eval()
        x = torch.randn(1, 16, 100, 200)
        limit = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 + 2**30
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
        with torch.no_grad():
            print(tuple(block(x).shape))
    """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "(1, 16, 100, 200)"


class _FixedLogits(torch.nn.Module):
    """A discriminator whose logits are given: ``real`` for the first half of a batch, ``fake`` after."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        logits = self.logits if len(x) == len(self.logits) else self.logits[-len(x):]
        return logits * self.scale + 0.0 * x.mean()  # connected to x, as a discriminator's logits are


def test_generator_losses_and_the_l2_reconstruction_follow_their_formulas():
    model = tiny_model()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    rec, q_loss, _ = model(x)
    fake = torch.tensor([[-1.5], [0.7]])
    for gen_loss, expected_g in (("hinge", -fake.mean()), ("non_saturating", torch.nn.functional.softplus(-fake).mean())):
        loss_fn = VQGANLoss(disc_start=0, perceptual_weight=0.0, disc_ndf=8, disc_num_layers=2, gen_loss=gen_loss)
        _, logs = loss_fn.generator_loss(q_loss, x, rec, step=0, last_layer=model.last_layer,
                                         discriminator=_FixedLogits(fake))
        torch.testing.assert_close(logs["g_loss"], expected_g)
    l2 = VQGANLoss(perceptual_weight=0.0, disc_ndf=8, pixel_weight=0.5, rec_loss="l2")
    loss, logs = l2.generator_loss(q_loss, x, rec, step=0, last_layer=model.last_layer)
    torch.testing.assert_close(loss, 0.5 * (x - rec).square().mean() + q_loss)
    torch.testing.assert_close(logs["l2"], (x - rec).square().mean().detach())


def test_lecam_moving_averages_and_regularizer_by_hand():
    """After n discriminator steps the averages are the decayed sums of the mean logits (from 0), and
    the regularizer is mean(relu(real - ema_fake)^2) + mean(relu(ema_real - fake)^2) on the averages
    the step updated; the averages are in the task's checkpoint."""
    decay, weight = 0.9, 0.3
    loss_fn = VQGANLoss(disc_start=0, perceptual_weight=0.0, disc_ndf=8, lecam_weight=weight, lecam_decay=decay)
    x, rec = torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 16, 16)
    ema = torch.zeros(2, dtype=torch.float64)
    for step in range(3):
        real = torch.tensor([0.5 + step, -0.25])
        fake = torch.tensor([-1.0, 0.125 * step])
        d_loss, logs = loss_fn.discriminator_loss(x, rec, step=step, discriminator=_FixedLogits(torch.cat([real, fake])))
        ema = decay * ema + (1 - decay) * torch.stack([real.mean(), fake.mean()]).double()
        torch.testing.assert_close(loss_fn.lecam_ema.double(), ema)
        lecam = (real - ema[1]).clamp_min(0).square().mean() + (ema[0] - fake).clamp_min(0).square().mean()
        torch.testing.assert_close(logs["lecam"].double(), lecam.double(), rtol=1e-6, atol=1e-7)
        expected = hinge_d_loss(real, fake) + weight * lecam.float()
        torch.testing.assert_close(d_loss, expected, rtol=1e-6, atol=1e-7)
    frozen = loss_fn.lecam_ema.clone()
    loss_fn.eval()
    loss_fn.discriminator_loss(x, rec, step=5, discriminator=_FixedLogits(torch.ones(4)))
    assert torch.equal(loss_fn.lecam_ema, frozen)  # validation passes leave the averages alone


@pytest.mark.parametrize("kwargs, message", [
    ({"rec_loss": "l3"}, "rec_loss must be one of l1, l2, got 'l3'"),
    ({"gen_loss": "wgan"}, "gen_loss must be one of hinge, non_saturating, got 'wgan'"),
    ({"lecam_decay": 1.0}, r"lecam_decay must be in \[0, 1\), got 1.0"),
])
def test_loss_options_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        VQGANLoss(perceptual_weight=0.0, disc_ndf=8, **kwargs)
