"""Evaluation: metrics, the Frechet distance against scipy, evaluate() on a tiny checkpoint."""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import random_inception_weights
from test_train import tiny_config
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from kepler.data import build_dataset
from kepler.io.config import load_config
from kepler.metrics import inception as inception_module
from kepler.metrics import mean_colour, psnr, ssim
from kepler.metrics.inception import INCEPTION_FILENAME, load_fid, load_inception_network
from kepler.models.load import load_model
from kepler.train.evaluate import _shard, evaluate, format_table, run_validation
from kepler.train.trainer import train


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny_eval")
    config = tiny_config(tmp, steps=2, disc_start=100)
    return train(load_config(config, [f"run_dir={tmp / 'run'}"]))["checkpoint"], tmp / "val_images"


class _Features(nn.Module):
    """Stand-in feature extractor: the input rows are the features."""

    def __init__(self, dim):
        super().__init__()
        self.num_features = dim

    def forward(self, x):
        return x.flatten(1)


def _scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


@pytest.mark.parametrize("dim", [3, 7])
def test_frechet_distance_matches_scipy(dim):
    rng = np.random.default_rng(dim)
    real = rng.normal(size=(400, dim))
    mixing = rng.normal(size=(dim, dim)) * 0.5 + np.eye(dim)
    fake = rng.normal(size=(300, dim)) @ mixing + 0.3
    fid = FrechetInceptionDistance(feature=_Features(dim))
    fid.update(torch.from_numpy(real), real=True)
    fid.update(torch.from_numpy(fake), real=False)
    assert float(fid.compute()) == pytest.approx(_scipy_frechet(real, fake), rel=1e-6, abs=1e-8)


def test_psnr_ssim_and_baseline():
    x = torch.rand(2, 3, 16, 16)
    assert torch.all(ssim(x, x) > 0.999)
    y = (x + 0.1).clamp(0, 1)
    mse = (x - y).square().flatten(1).mean(1)
    torch.testing.assert_close(psnr(x, y), 10 * torch.log10(1 / mse))
    flat = mean_colour(x)
    assert flat.shape == x.shape and torch.allclose(flat[:, :, 3, 5], x.mean(dim=(2, 3)))


def test_shards_have_equal_batch_counts_and_count_each_image_once():
    for n, world in [(3, 2), (10, 4), (1, 2), (8, 2)]:
        shards = [_shard(n, 2, r, world) for r in range(world)]
        assert len({len(s) for s in shards}) == 1
        counted = sorted(i for s in shards for batch in s for i, c in batch if c)
        assert counted == list(range(n))


@pytest.mark.parametrize("loader", [load_fid, load_inception_network])
def test_missing_inception_weights_say_where(tmp_path, loader):
    metric, reason = loader(tmp_path / "inception.pth")
    assert metric is None and reason == f"no weights at {tmp_path / 'inception.pth'}"


class _Planted:
    """A pickle that makes a directory when it is unpickled: proof that a loader ran the file's code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _plant(path, marker):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"Conv2d_1a_3x3.conv.weight": _Planted(marker)}, path)
    return path


def test_hostile_inception_weights_are_never_unpickled(tmp_path, monkeypatch):
    marker = tmp_path / "code_ran"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    default = _plant(tmp_path / "torch_home" / "hub" / "checkpoints" / INCEPTION_FILENAME, marker)
    explicit = _plant(tmp_path / "evil.pth", marker)
    for path, loader in ((None, load_fid), (explicit, load_fid), (explicit, load_inception_network)):
        metric, reason = loader(path)
        assert metric is None and not marker.exists()
        shown = default if path is None else explicit
        digest = hashlib.sha256(shown.read_bytes()).hexdigest()
        assert reason == (f"{shown} is not the FID Inception weights file {INCEPTION_FILENAME}: "
                          f"its SHA-256 starts with {digest[:8]}, not 6726825d")
    # A file whose hash prefix matches (32 bits: forgeable) is still read with weights_only=True.
    monkeypatch.setattr(inception_module, "INCEPTION_SHA256_PREFIX", digest[:8])
    metric, reason = load_fid(explicit)
    assert metric is None and not marker.exists()
    assert reason == (f"FID Inception weights {explicit} asks for {os.mkdir.__module__}.mkdir, from a module torch "
                      "never unpickles; refused to unpickle it")


def test_checked_inception_weights_reach_the_network(tmp_path, monkeypatch):
    weights = random_inception_weights()
    path = tmp_path / INCEPTION_FILENAME
    torch.save(weights, path)
    monkeypatch.setattr(inception_module, "INCEPTION_SHA256_PREFIX", hashlib.sha256(path.read_bytes()).hexdigest()[:8])
    metric, reason = load_fid(path)
    assert reason is None
    loaded = metric.inception.state_dict()
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], weights[k]) for k in weights)


def test_evaluate_writes_json_at_each_resolution(tiny_checkpoint, tmp_path):
    checkpoint, val_images = tiny_checkpoint
    results = evaluate(checkpoint, data=str(val_images), resolutions=(None, 48), out=tmp_path,
                       lpips_vgg_path=str(tmp_path / "no_vgg.pth"), inception_path=str(tmp_path / "no_inc.pth"))
    assert set(results["resolutions"]) == {"32", "48"}
    for metrics in results["resolutions"].values():
        assert metrics["images"] == 3
        for key in ("psnr", "ssim", "l1", "baseline_psnr", "utilization", "perplexity"):
            assert np.isfinite(metrics[key])
        assert 0 < metrics["utilization"] <= 1
    assert results["lpips"] == f"off: no weights at {tmp_path / 'no_vgg.pth'}"
    assert results["rfid"] == f"off: no weights at {tmp_path / 'no_inc.pth'}"
    packing = results["packing"]
    assert packing["num_codes"] == 16 and packing["mean_quantization_error"] > 0
    assert json.loads((tmp_path / "eval.json").read_text())["resolutions"]["48"]["images"] == 3
    for resolution, metrics in results["resolutions"].items():
        counts = torch.tensor(metrics["code_counts"])  # (P, K); latents are (res / 2)^2 positions of P=4 tokens
        assert counts.shape == (4, 16) and int(counts.sum()) == metrics["images"] * (int(resolution) // 2) ** 2 * 4
        assert metrics["utilization"] == pytest.approx((counts.sum(dim=0) > 0).double().mean().item())
        shared = counts.sum(dim=0).double() / counts.sum()  # one codebook shared by the P tokens
        entropy = -(shared[shared > 0] * shared[shared > 0].log()).sum()
        assert metrics["perplexity"] == pytest.approx(entropy.exp().item(), rel=1e-5)
    table = format_table(results)
    assert "resolution" in table and "baseline_psnr" in table and table.count("\n") == 2


def test_validation_keeps_training_usage_and_computes_rfid(tiny_checkpoint):
    checkpoint, val_images = tiny_checkpoint
    model = load_model(checkpoint).model
    before = model.quantize.code_counts.clone()
    dataset = build_dataset({"size": 32}, "val", spec=val_images)

    class ColourStats(nn.Module):
        num_features = 6

        def forward(self, x):
            return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)

    fid = FrechetInceptionDistance(feature=ColourStats())
    metrics, grid, code_counts = run_validation(model, dataset, batch_size=2, device=torch.device("cpu"),
                                                fid=fid, grid_images=2)
    assert torch.equal(model.quantize.code_counts, before)
    assert np.isfinite(metrics["rfid"]) and metrics["rfid"] >= 0
    assert grid[0].shape == grid[1].shape == (2, 3, 32, 32)
    assert int(code_counts.sum()) == len(dataset) * 16 * 16 * 4  # 32 x 32 images, f=2, P=4


def test_evaluate_bad_resolution(tiny_checkpoint):
    checkpoint, val_images = tiny_checkpoint
    with pytest.raises(ValueError, match="resolution 33 is not a multiple of the downsampling factor 2"):
        evaluate(checkpoint, data=str(val_images), resolutions=(33,))


def test_evaluate_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model .*missing.pt does not exist \(a model is a checkpoint file or an exported folder\)"):
        evaluate(tmp_path / "missing.pt")
    bogus = tmp_path / "bogus.pt"
    torch.save({"weights": torch.zeros(1)}, bogus)
    with pytest.raises(ValueError, match="is not a kepler checkpoint"):
        evaluate(bogus)


def test_load_model_checks_the_weights_before_building_the_model(tiny_checkpoint, tmp_path):
    checkpoint, _ = tiny_checkpoint
    state = torch.load(checkpoint, weights_only=True)
    state["config"]["model"].update(ch=4096, ch_mult=[1] * 8)  # 16 billion parameters if it were built
    state["model"] = {}
    torch.save(state, tmp_path / "huge.pt")
    with pytest.raises(ValueError, match=r"the weights do not match the model config: keys \d+ missing"):
        load_model(tmp_path / "huge.pt")


class _KnownError(nn.Module):
    """A tokenizer whose reconstruction is its input plus 0.2 in [-1, 1] (0.1 in [0, 1]): its held-out
    figures are known exactly (its quantizer still runs, for the code statistics)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.quantize = model.quantize

    def forward(self, x):
        _, loss, info = self.model(x)
        return x + 0.2, loss, info


def test_validation_figures_of_a_known_reconstruction_error(tiny_checkpoint):
    """PSNR of mid-grey images reconstructed 0.1 too bright (in [0, 1]) is 20 dB exactly: computed on
    [-1, 1] images it would read 13.98 dB; SSIM of two constant images is the luminance term
    (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1), C1 = 0.01^2; L1 is measured in [-1, 1]."""
    checkpoint, _ = tiny_checkpoint
    model = _KnownError(load_model(checkpoint).model)
    grey = [(torch.zeros(3, 32, 32), ())] * 3
    metrics = run_validation(model, grey, batch_size=2, device=torch.device("cpu")).metrics
    assert metrics["psnr"] == pytest.approx(20.0, abs=1e-4)
    assert metrics["ssim"] == pytest.approx((2 * 0.5 * 0.6 + 1e-4) / (0.5**2 + 0.6**2 + 1e-4), abs=1e-5)
    assert metrics["l1"] == pytest.approx(0.2, abs=1e-6)
    assert metrics["baseline_psnr"] == pytest.approx(100.0)  # a constant image is its own mean colour
    assert metrics["images"] == 3 and metrics["unreadable_images"] == 0


def test_an_unreadable_held_out_image_is_left_out_not_counted_twice(tiny_checkpoint, tmp_path):
    """kepler eval replaced an unreadable file by the next readable one and reported 4 images for 3;
    it now counts the 3 once each, as the folder without the bad file does."""
    checkpoint, val_images = tiny_checkpoint
    readable = tmp_path / "readable"
    shutil.copytree(val_images, readable)
    with_bad = tmp_path / "with_bad"
    shutil.copytree(val_images, with_bad)
    (with_bad / "img0_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")  # sorts first
    with pytest.warns(UserWarning, match="skipping unreadable image .*img0_broken.png"):
        bad = evaluate(checkpoint, data=str(with_bad))["resolutions"]["32"]
    good = evaluate(checkpoint, data=str(readable))["resolutions"]["32"]
    assert bad["images"] == good["images"] == 3 and bad["unreadable_images"] == 1
    for key in ("psnr", "ssim", "l1", "utilization", "perplexity", "code_counts"):
        assert bad[key] == good[key], key
