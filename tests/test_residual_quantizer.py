"""ResidualQuantizer (``type: residual``): every stage searches its own residual, the error falls with
the stages, quantize dropout decodes every prefix, and a residual tokenizer goes through the CLI and
the code prior."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import device_backend_params
from PIL import Image
from skimage import data as skimage_data
from test_quantizer import compiled_training_matches_eager
from test_train import random_images, tiny_config

import kepler
from kepler.cli import main
from kepler.data import build_dataset, collate, to_unit
from kepler.metrics import psnr
from kepler.io.images import save_image
from kepler.nn import KeplerQuantizer, ResidualQuantizer, build_quantizer


def brute_force_stages(quantizer: ResidualQuantizer, z: torch.Tensor) -> list[torch.Tensor]:
    """Each stage's ``(B, H, W, P)`` indices by exhaustive float64 search on the residual it sees
    (group partitions: channel chunks), the residual updated in float32 as the forward does."""
    batch, channels, height, width = z.shape
    parts, sub_dim = quantizer.partitions, channels // quantizer.partitions
    residual = z.to(torch.float32)
    found = []
    for index in range(quantizer.num_quantizers):
        codebook = quantizer.stage(index).codebook.detach()
        if codebook.dim() == 2:
            codebook = codebook.expand(parts, -1, -1)
        rows = residual.permute(0, 2, 3, 1).reshape(-1, parts, sub_dim)  # (N, P, d)
        distances = torch.stack([torch.cdist(rows[:, p].double(), codebook[p].double()) for p in range(parts)], 1)
        best = distances.argmin(dim=-1)  # (N, P)
        codes = torch.stack([codebook[p][best[:, p]] for p in range(parts)], 1)
        residual = residual - codes.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
        found.append(best.view(batch, height, width, parts))
    return found


STAGE_LAYOUTS = {
    "one_partition": dict(partitions=1),
    "kepler_shared": dict(partitions=2, shared_codebook=True),
    "kepler_per_partition": dict(partitions=2, shared_codebook=False),
    "shared_stages": dict(partitions=2, shared_stages=True),
}


@pytest.mark.parametrize("device, backend", device_backend_params())
@pytest.mark.parametrize("layout", sorted(STAGE_LAYOUTS))
def test_each_stage_takes_the_nearest_code_of_its_residual(layout, device, backend):
    torch.manual_seed(0)
    quantizer = ResidualQuantizer(num_quantizers=3, num_codes=16, dim=8, backend=backend,
                                  **STAGE_LAYOUTS[layout]).to(device).eval()
    z = torch.randn(3, 8, 5, 7, device=device)
    out = quantizer(z)  # eval mode: each stage's k-means runs before its search, nothing changes after
    expected = brute_force_stages(quantizer, z)
    parts = quantizer.partitions
    assert out.indices.shape == (3, 5, 7, 3 * parts)
    for index, stage_indices in enumerate(expected):
        assert torch.equal(out.indices[..., index * parts : (index + 1) * parts], stage_indices), index
    assert torch.equal(quantizer.indices_to_latents(out.indices), out.z_q)


@pytest.mark.parametrize("partition", ["group", "custom", "layer"])
def test_the_stages_give_what_they_give_on_the_latent_map_by_hand(partition):
    """The residual quantizer hands group/custom stages each position as a (C, 1, 1) latent of its
    own (one layout copy a forward): codes, z_q, losses and the upkeep's random picks must be those of
    its stages run one by one on the (B, C, H, W) map itself."""
    options = dict(num_codes=8, dim=16, partitions=4, partition=partition, ema_decay=0.9, dead_code_threshold=1)
    torch.manual_seed(0)
    quantizer = ResidualQuantizer(num_quantizers=3, **options).train()
    by_hand = [KeplerQuantizer(**options, legacy=False, init="kmeans").train() for _ in range(3)]
    for stage, twin in zip(quantizer.stages, by_hand):
        twin.load_state_dict(stage.state_dict())
    for step in range(3):
        z = torch.randn(2, 16, 4, 4)
        torch.manual_seed(step)
        out = quantizer(z)
        torch.manual_seed(step)
        residual, z_q, loss, indices = z, torch.zeros_like(z), 0.0, []
        for twin in by_hand:
            stage_out = twin(residual)
            z_q, residual = z_q + stage_out.z_q, residual - stage_out.z_q
            loss, indices = loss + stage_out.loss, indices + [stage_out.indices]
        assert torch.equal(out.indices, torch.cat(indices, dim=-1)) and torch.equal(out.z_q, z_q)
        torch.testing.assert_close(out.loss, loss, rtol=1e-6, atol=0)
        for stage, twin in zip(quantizer.stages, by_hand):
            assert torch.equal(stage.codebook, twin.codebook)


def test_later_stages_are_initialized_on_their_own_residuals():
    """k-means of stage s runs on r_s: the later codebooks are the scale of what is left, not of z."""
    torch.manual_seed(0)
    quantizer = ResidualQuantizer(num_quantizers=3, num_codes=8, dim=4).eval()
    z = 10 * torch.randn(8, 4, 4, 4)
    quantizer(z)
    scales = [quantizer.stage(s).codebook.detach().norm(dim=-1).mean().item() for s in range(3)]
    assert scales[0] > 1.3 * scales[1] > 1.3**2 * scales[2], scales  # on z alone all three would be alike


def real_latents() -> torch.Tensor:
    """Latents with the structure of real images: 4x4 patches of photos as 48 channels, (3, 48, 16, 16)."""
    photos = [skimage_data.astronaut(), skimage_data.coffee(), skimage_data.chelsea()]
    maps = []
    for photo in photos:
        image = torch.from_numpy(np.array(Image.fromarray(photo).resize((64, 64)))).permute(2, 0, 1)
        maps.append(F.pixel_unshuffle(image.float().unsqueeze(0) / 127.5 - 1, 4))
    return torch.cat(maps)


@pytest.mark.parametrize("latents", ["random", "real"])
@pytest.mark.parametrize("partitions", [1, 4])
def test_the_error_does_not_grow_with_the_stages_used(latents, partitions):
    """At init after k-means, each stage's codes are its residuals' cluster means, so the squared error
    over the batch can only fall stage by stage (to float32 rounding); it must also actually fall."""
    torch.manual_seed(0)
    z = torch.randn(3, 48, 16, 16) if latents == "random" else real_latents()
    quantizer = ResidualQuantizer(num_quantizers=6, num_codes=32, dim=48, partitions=partitions).eval()
    out = quantizer(z)
    errors = [z.square().sum().item()] + [
        (quantizer.indices_to_latents(out.indices, num_stages=s) - z).square().sum().item() for s in range(1, 7)
    ]
    assert all(later <= earlier * (1 + 1e-6) for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.9 * errors[1] < 0.9 * errors[0], errors


def test_quantize_dropout_decodes_every_prefix():
    torch.manual_seed(0)
    quantizer = ResidualQuantizer(num_quantizers=4, num_codes=8, dim=4, quantize_dropout=1.0).train()
    z = torch.randn(64, 4, 2, 2)
    out = quantizer(z)
    prefixes = torch.stack([quantizer.indices_to_latents(out.indices, num_stages=s) for s in range(1, 5)])
    used = []
    for sample in range(64):
        matches = [s + 1 for s in range(4) if torch.equal(prefixes[s, sample], out.z_q[sample])]
        assert len(matches) == 1, (sample, matches)
        used.append(matches[0])
    assert set(used) == {1, 2, 3, 4}
    # The indices of a prefix alone decode the same as all the indices with num_stages.
    for s in range(1, 5):
        assert torch.equal(quantizer.indices_to_latents(out.indices[..., :s], num_stages=s), prefixes[s - 1])
    # Eval mode, or no dropout: every sample decodes from every stage.
    full = quantizer.eval()(z)
    assert torch.equal(full.z_q, quantizer.indices_to_latents(full.indices))


def test_eval_stages_decode_a_prefix_in_eval_mode_only():
    torch.manual_seed(0)
    quantizer = ResidualQuantizer(num_quantizers=3, num_codes=8, dim=4)
    z = torch.randn(2, 4, 3, 3)
    quantizer.eval()(z)  # k-means on this batch
    quantizer.set_eval_stages(2)
    out = quantizer(z)
    assert out.indices.shape[-1] == 3  # every stage is still searched and returned
    assert torch.equal(out.z_q, quantizer.indices_to_latents(out.indices, num_stages=2))
    assert torch.equal(quantizer.train()(z).z_q, quantizer.indices_to_latents(out.indices))  # training: all
    quantizer.set_eval_stages(None)
    assert torch.equal(quantizer.eval()(z).z_q, quantizer.indices_to_latents(out.indices))
    with pytest.raises(ValueError, match="num_stages=4 is more than the quantizer's 3 stages"):
        quantizer.set_eval_stages(4)


def test_quantize_dropout_fraction_and_minimum():
    torch.manual_seed(0)
    quantizer = ResidualQuantizer(num_quantizers=4, num_codes=8, dim=4, quantize_dropout=0.5,
                                  quantize_dropout_min_stages=2).train()
    z = torch.randn(400, 4, 1, 1)
    out = quantizer(z)
    prefixes = torch.stack([quantizer.indices_to_latents(out.indices, num_stages=s) for s in range(1, 5)])
    used = torch.tensor([max(s + 1 for s in range(4) if torch.equal(prefixes[s, b], out.z_q[b])) for b in range(400)])
    assert int(used.min()) == 2
    # Half the samples keep all 4 stages, the other half draw 2, 3 or 4: 4/6 of them in all.
    assert 0.55 < (used == 4).float().mean().item() < 0.78


def test_utilization_counts_each_codebook_once():
    """Partitions of a stage share its codebook: a code one partition used is used. Stages have their
    own codebooks; with shared_stages every token indexes one."""
    torch.manual_seed(0)
    for shared_stages, books in ((False, 2), (True, 1)):
        quantizer = ResidualQuantizer(num_quantizers=2, num_codes=16, dim=8, partitions=2,
                                      shared_stages=shared_stages).eval()
        out = quantizer(torch.randn(2, 8, 3, 3))
        assert quantizer.shared_codebook == shared_stages and quantizer.codebook_entries == 16 * books
        codes = out.indices.reshape(-1, 2, 2)  # (positions, stages, partitions)
        used = sum(len(torch.unique(codes[:, s] if not shared_stages else codes)) for s in range(books))
        assert out.utilization.item() == pytest.approx(used / (16 * books))
        assert quantizer.code_counts.shape == (4, 16)


def test_loss_is_the_sum_of_the_stage_losses_and_reaches_every_codebook():
    torch.manual_seed(0)
    quantizer = ResidualQuantizer(num_quantizers=3, num_codes=8, dim=4, entropy_weight=0.1).train()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = quantizer(z)
    out.loss.backward()
    for stage in quantizer.stages:
        assert stage.codebook.grad is not None and stage.codebook.grad.abs().sum() > 0
    assert z.grad.abs().sum() > 0
    assert set(quantizer.loss_terms) == {"entropy_per_sample", "entropy_batch"}
    assert quantizer.loss_term_names() == ("entropy_per_sample", "entropy_batch")


@pytest.mark.parametrize("options", [dict(), dict(ema_decay=0.9, dead_code_threshold=1, quantize_dropout=0.5)],
                         ids=["plain", "ema-deadcode-dropout"])
def test_torch_compile_fullgraph_training_matches_eager(options):
    torch.manual_seed(0)
    eager = ResidualQuantizer(num_quantizers=3, num_codes=8, dim=8, partitions=2, **options)
    traced = ResidualQuantizer(num_quantizers=3, num_codes=8, dim=8, partitions=2, **options)
    compiled_training_matches_eager(eager, traced, (4, 8, 3, 3))


@pytest.mark.parametrize("options, error, match", [
    (dict(num_quantizers=0), ValueError, "num_quantizers must be >= 1, got 0"),
    (dict(quantize_dropout=1.5), ValueError, "quantize_dropout must be <= 1, got 1.5"),
    (dict(quantize_dropout=-0.1), ValueError, r"quantize_dropout must be >= 0.0, got -0.1"),
    (dict(quantize_dropout_min_stages=5), ValueError,
     "quantize_dropout_min_stages=5 is more than the num_quantizers=4 stages"),
    (dict(partitions=3), ValueError, "dim=8 must be divisible by partitions=3"),
    (dict(num_codes=2**21), ValueError, r"ResidualQuantizer would have 2097152 codes per token; at most 1048576"),
])
def test_arguments_are_checked(options, error, match):
    with pytest.raises(error, match=match):
        build_quantizer({"type": "residual", "num_quantizers": 4, "num_codes": 8, **options}, dim=8)


def test_decoding_checks_its_stages_and_indices():
    quantizer = ResidualQuantizer(num_quantizers=4, num_codes=8, dim=8, partitions=2)
    indices = torch.zeros(1, 2, 2, 8, dtype=torch.int64)
    with pytest.raises(ValueError, match="num_stages=5 is more than the quantizer's 4 stages"):
        quantizer.indices_to_latents(indices, num_stages=5)
    with pytest.raises(ValueError, match="num_stages must be >= 1, got 0"):
        quantizer.indices_to_latents(indices, num_stages=0)
    with pytest.raises(ValueError, match=r"indices must be \(B, H, W, S\*P=8\) or \(B, H, W, 4\) for 2 stages, "
                       r"got shape \(1, 2, 2, 6\)"):
        quantizer.indices_to_latents(indices[..., :6], num_stages=2)
    with pytest.raises(ValueError, match=r"indices must be \(B, H, W, S\*P=8\), got shape \(1, 2, 2, 6\)"):
        quantizer.indices_to_latents(indices[..., :6])
    bad = indices.clone()
    bad[0, 0, 0, 1] = 8
    with pytest.raises(ValueError, match=r"indices must be in \[0, 8\), got \[0, 8\]"):
        quantizer.indices_to_latents(bad)
    bad[0, 0, 0, 1] = 0
    bad[0, 0, 0, 7] = 99  # past the decoded stages: not read
    assert torch.equal(quantizer.indices_to_latents(bad, num_stages=2), quantizer.indices_to_latents(indices, num_stages=2))
    with pytest.raises(TypeError, match="indices must be an int32 or int64 torch.Tensor"):
        quantizer.indices_to_latents(indices.float())


RESIDUAL_SECTION = "quantizer: {type: residual, num_quantizers: 3, num_codes: 16, partitions: 2}"


def residual_tokenizer(tmp_path) -> tuple:
    """A tiny residual tokenizer trained 2 steps through the CLI: 3 stages of 2 sub-codes of K=16."""
    path = tiny_config(tmp_path, steps=2, disc_start=2)
    path.write_text(path.read_text().replace("quantizer: {num_codes: 16, partitions: 4}", RESIDUAL_SECTION))
    run = tmp_path / "tok"
    assert main(["train", str(path), f"run_dir={run}"]) == 0
    return run, json.loads((run / "metrics.json").read_text())


def test_a_residual_tokenizer_trains_encodes_and_decodes_through_the_cli(tmp_path, capsys):
    run, metrics = residual_tokenizer(tmp_path)
    assert metrics["step"] == 2 and np.isfinite(metrics["psnr"]) and metrics["codebook_entries"] == 3 * 16
    checkpoint = run / "checkpoints" / "last.pt"
    photo = random_images(tmp_path / "images", count=1) / "img0.png"  # 48 x 40
    assert main(["reconstruct", str(checkpoint), str(photo), "--out", str(tmp_path / "recon")]) == 0
    pair = np.asarray(Image.open(tmp_path / "recon" / "img0_recon.png"))
    assert main(["encode", str(checkpoint), str(photo), "--out", str(tmp_path / "codes")]) == 0
    codes = np.load(tmp_path / "codes" / "img0.npy")
    assert codes.shape == (20, 24, 6) and 0 <= codes.min() and codes.max() < 16
    assert main(["decode", str(checkpoint), str(tmp_path / "codes" / "img0.npy"), "--out", str(tmp_path / "dec")]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "dec" / "img0.png")), pair[:, 48:])
    # --stages: all 3 is the full decode; the first stage alone is another, coarser image.
    code_file = str(tmp_path / "codes" / "img0.npy")
    for stages in (3, 1):
        assert main(["decode", str(checkpoint), code_file, "--stages", str(stages), "--out", str(tmp_path / f"s{stages}")]) == 0
    assert (tmp_path / "s3" / "img0.png").read_bytes() == (tmp_path / "dec" / "img0.png").read_bytes()
    coarse = kepler.load(checkpoint).decode_indices(torch.from_numpy(codes)[None], num_stages=1)
    assert (tmp_path / "s1" / "img0.png").read_bytes() == save_image(coarse[0], tmp_path / "coarse.png").read_bytes()
    assert (tmp_path / "s1" / "img0.png").read_bytes() != (tmp_path / "s3" / "img0.png").read_bytes()
    assert main(["decode", str(checkpoint), code_file, "--stages", "4", "--out", str(tmp_path / "s4")]) == 2
    assert "--stages must be in [1, 3] (the tokenizer's stages), got 4" in capsys.readouterr().err
    # kepler eval --stages S: the held-out PSNR of the first S stages' reconstruction.
    model = kepler.load(checkpoint).eval()
    held_out = build_dataset({"size": 32, "resize": 40}, "val", spec=str(tmp_path / "val_images"))
    images, _ = collate([held_out[i] for i in range(len(held_out))])
    for stages in (1, 3):
        assert main(["eval", str(checkpoint), "--data", str(tmp_path / "val_images"), "--stages", str(stages),
                     "--out", str(tmp_path / f"eval{stages}")]) == 0
        result = json.loads((tmp_path / f"eval{stages}" / "eval.json").read_text())
        assert result["stages"] == stages
        with torch.no_grad():
            latents = model.quantize.indices_to_latents(model.encode_to_indices(images), num_stages=stages)
            expected = psnr(to_unit(images), to_unit(model.decode(latents).float())).mean().item()
        assert result["resolutions"]["32"]["psnr"] == pytest.approx(expected, rel=1e-5)
    assert "first 3 stage(s)" in capsys.readouterr().out
    # Exported and loaded back, it decodes the same codes to the same latents, stage by stage.
    assert main(["export", str(checkpoint), "--out", str(tmp_path / "exported")]) == 0
    exported, trained = kepler.load(tmp_path / "exported"), kepler.load(checkpoint)
    assert isinstance(exported.quantize, ResidualQuantizer) and exported.quantize.num_quantizers == 3
    indices = torch.from_numpy(codes).unsqueeze(0)
    for stages in (1, 3):
        assert torch.equal(exported.quantize.indices_to_latents(indices, num_stages=stages),
                           trained.quantize.indices_to_latents(indices, num_stages=stages))


PRIOR = """
name: prior
tokenizer: {{checkpoint: {tokenizer}}}
model: {{d_model: 32, num_layers: 2, num_heads: 2, order: {order}}}
data: {{train: {train}, val: {val}, size: 16, resize: 24, batch_size: 2, samples_per_epoch: 8, val_batch_size: 4,
        val_max_images: 4}}
optim: {{name: adamw, base_lr: 1.0e-3, scale_lr: false}}
train: {{max_steps: 3, eval_every: 3, ckpt_every: 3, log_every: 1, progress: false, threads: 1}}
"""


@pytest.mark.parametrize("order", ["factorized", "flat"])
def test_a_prior_trains_on_residual_codes_and_samples(tmp_path, order):
    """The stages of a position are its sub-codes, coarse to fine: kepler prior train works unchanged,
    in the factorized order (RQ-Transformer's: one step a position, its stages predicted one after
    another by the sub-code head) and in the flat one."""
    run, _ = residual_tokenizer(tmp_path)
    config = tmp_path / "prior.yaml"
    config.write_text(PRIOR.format(tokenizer=run / "checkpoints" / "last.pt", train=tmp_path / "train_images",
                                   val=tmp_path / "val_images", order=order))
    prior = tmp_path / "prior"
    assert main(["prior", "train", str(config), f"run_dir={prior}"]) == 0
    metrics = json.loads((prior / "metrics.json").read_text())
    assert metrics["tokens_per_map"] == 8 * 8 * 6 and np.isfinite(metrics["bits_per_token"])
    assert metrics["bits_per_position"] == pytest.approx(6 * metrics["bits_per_token"])
    out = tmp_path / "samples"
    assert main(["sample", str(prior / "checkpoints" / "last.pt"), "--num", "2", "--out", str(out), "--seed", "1"]) == 0
    maps = [np.load(out / f"sample{i:04d}.npy") for i in range(2)]
    assert all(m.shape == (8, 8, 6) and 0 <= m.min() and m.max() < 16 for m in maps)
    assert (out / "sample0001.png").is_file()
