"""The ADM evaluator's pipeline: the Inception network's features (random weights: the published
file is not on test machines), image sets, reference statistics and ``kepler fid`` with a stand-in
network; the missing-weights message with the real loader."""

import hashlib
import io
import json
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from conftest import random_inception_weights
from torch import nn

from kepler.cli import main
from kepler.data import build_dataset, to_uint8
from kepler.metrics import feature_statistics, frechet_distance, inception_score, precision_recall
from kepler.metrics import inception as inception_module
from kepler.metrics.inception import INCEPTION_FILENAME, InceptionFeatures, inception_features, load_inception_network
from kepler.train.fid import FolderImages


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """torch-fidelity's FID Inception network with its random initialization, saved as a weights
    file: ``(path, its SHA-256 prefix, its state dict)``."""
    torch.manual_seed(0)
    weights = random_inception_weights()
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILENAME
    torch.save(weights, path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()[:8], weights


def test_the_network_gives_adms_pool_spatial_and_logit_features(random_inception, monkeypatch):
    path, prefix, weights = random_inception
    monkeypatch.setattr(inception_module, "INCEPTION_SHA256_PREFIX", prefix)
    network, reason = load_inception_network(path)
    assert reason is None
    loaded = network.network.state_dict()
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], weights[k]) for k in weights)
    # What reaches the sFID layer, and the pool features, caught on their way through the network.
    caught = {}
    network.network.Mixed_6c.register_forward_hook(lambda m, i, output: caught.update(mixed_6c=output.clone()))
    network.network.AvgPool.register_forward_hook(lambda m, i, output: caught.update(pool=output.flatten(1)))
    images = torch.randint(0, 256, (2, 16, 20, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    features = inception_features(network, [images])
    assert [tuple(f.shape) for f in features] == [(2, 2048), (2, 17 * 17 * 7), (2, 1008)]
    assert all(f.dtype == torch.float32 for f in features)
    assert torch.equal(features.pool, caught["pool"])
    # Logits without the classifier's bias (ADM's softmax input: pool_3 times softmax/logits' weights).
    torch.testing.assert_close(features.logits, caught["pool"] @ network.network.fc.weight.T, rtol=1e-5, atol=0)
    # sFID's: TF's mixed_6/conv, the 1x1 branch of the block after Mixed_6c, its first 7 channels in
    # TF's (height, width, channel) order.
    branch = network.network.Mixed_6d.branch1x1(caught["mixed_6c"])
    assert torch.equal(features.spatial, branch[:, :7].permute(0, 2, 3, 1).reshape(2, -1))
    assert features.spatial.abs().sum() > 0


def test_inception_features_take_adm_layout_batches():
    with pytest.raises(ValueError) as error:
        inception_features(lambda images: None, [torch.zeros(2, 3, 8, 8, dtype=torch.uint8)])
    assert str(error.value) == "images must be uint8 (B, H, W, 3), got torch.uint8 (2, 3, 8, 8)"
    with pytest.raises(ValueError) as error:
        inception_features(lambda images: None, [])
    assert str(error.value) == "no images to take Inception features of"


# ------------------------------------------------------------------ kepler fid with a stand-in network


def stand_in_features(images: torch.Tensor) -> InceptionFeatures:
    """Features of uint8 ``(B, 3, H, W)`` images: channel means and spreads (pool, logits x 10), and a
    2 x 2 average of the red channel (spatial); float32, rounded from float64 so that they do not
    depend on the batch an image comes in."""
    x = images.double() / 255
    pool = torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)
    spatial = F.adaptive_avg_pool2d(x[:, :1], 2).flatten(1)
    return InceptionFeatures(pool=pool.float(), spatial=spatial.float(), logits=10 * pool.float())


class StandIn(nn.Module):
    """A stand-in for the Inception network that notes the shape of each batch it is handed."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, images):
        self.seen.append((images.dtype, tuple(images.shape)))
        return stand_in_features(images)


@pytest.fixture
def stand_in(monkeypatch, tmp_path):
    """``load_inception_network`` replaced by :class:`StandIn`: yields the weights path it expects
    (``--inception``) and the networks it made."""
    weights, made = tmp_path / "inception.pth", []

    def load(path):
        assert path == str(weights)
        made.append(StandIn())
        return made[-1], None

    monkeypatch.setattr(inception_module, "load_inception_network", load)
    return weights, made


def images(count: int, seed: int, low: int = 0, size=(16, 16)) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, 256, (count, *size, 3), dtype=np.uint8)


def write_folder(folder, arrays) -> str:
    folder.mkdir()
    for i, array in enumerate(arrays):
        Image.fromarray(array).save(folder / f"img{i:02d}.png")
    return str(folder)


def expected_metrics(samples: np.ndarray, reference: np.ndarray) -> dict:
    """kepler.metrics on the stand-in's features of the two sets, computed here directly."""
    fake, real = (stand_in_features(torch.from_numpy(x).permute(0, 3, 1, 2)) for x in (samples, reference))
    precision, recall = precision_recall(real.pool, fake.pool)
    return {"fid": frechet_distance(*feature_statistics(fake.pool), *feature_statistics(real.pool)),
            "sfid": frechet_distance(*feature_statistics(fake.spatial), *feature_statistics(real.spatial)),
            "precision": precision, "recall": recall,
            **({"inception_score": inception_score(fake.logits)} if len(samples) >= 10 else {})}


def run_fid(*args, weights) -> int:
    return main(["fid", *map(str, args), "--inception", str(weights), "--device", "cpu"])


def test_fid_scores_an_npz_against_a_folder_an_npz_and_saved_statistics(stand_in, tmp_path, capsys):
    weights, made = stand_in
    samples, reference = images(12, 0), images(10, 1, low=3)
    np.savez(tmp_path / "samples.npz", samples)
    np.savez(tmp_path / "reference.npz", reference)
    folder = write_folder(tmp_path / "reference", reference)
    stats = tmp_path / "reference_stats.npz"
    assert run_fid(tmp_path / "samples.npz", folder, "--batch-size", "5", "--save-stats", stats, "--out",
                   tmp_path / "a", weights=weights) == 0
    metrics = json.loads((tmp_path / "a" / "fid.json").read_text())
    expected = expected_metrics(samples, reference)
    assert metrics == {"samples": str(tmp_path / "samples.npz"), "reference": folder, "num_samples": 12,
                       "num_reference": 10, **{key: pytest.approx(value, rel=1e-6) for key, value in expected.items()}}
    assert 0 < metrics["precision"] < 1 or 0 < metrics["recall"] < 1
    # The reference first, then the samples, as uint8 (B, 3, H, W) in batches of 5.
    assert made[0].seen == [(torch.uint8, (5, 3, 16, 16))] * 4 + [(torch.uint8, (2, 3, 16, 16))]
    assert capsys.readouterr().out == (
        f"kepler fid: 12 samples ({tmp_path / 'samples.npz'}) against 10 reference images ({folder})\n"
        f"  FID {metrics['fid']:.4f}, sFID {metrics['sfid']:.4f}\n  Inception Score {metrics['inception_score']:.4f}\n"
        f"  precision {metrics['precision']:.4f}, recall {metrics['recall']:.4f}\n"
        f"  wrote the reference's statistics to {stats}\n  wrote {tmp_path / 'a' / 'fid.json'}\n")
    # The same reference as an .npz, and as its saved statistics (whose network sees only the samples).
    for reference_arg, out in ((tmp_path / "reference.npz", "b"), (stats, "c")):
        assert run_fid(tmp_path / "samples.npz", reference_arg, "--out", tmp_path / out, weights=weights) == 0
        again = json.loads((tmp_path / out / "fid.json").read_text())
        assert {k: again[k] for k in expected} == {k: metrics[k] for k in expected}
    assert made[2].seen == [(torch.uint8, (12, 3, 16, 16))]
    with np.load(stats) as stored:
        assert sorted(stored.files) == ["mu", "mu_s", "pool_features", "sigma", "sigma_s"]
        real = stand_in_features(torch.from_numpy(reference).permute(0, 3, 1, 2))
        np.testing.assert_array_equal(stored["pool_features"], real.pool.numpy())
        np.testing.assert_allclose(stored["sigma_s"], np.cov(real.spatial.double().numpy(), rowvar=False))


def test_fid_reads_a_data_spec_at_size_and_says_what_is_off(stand_in, tmp_path, capsys):
    weights, made = stand_in
    samples = images(8, 2, size=(24, 24))
    np.savez(tmp_path / "samples.npz", samples)
    assert run_fid(tmp_path / "samples.npz", "faces", "--size", "24", "--out", tmp_path, weights=weights) == 0
    metrics = json.loads((tmp_path / "fid.json").read_text())
    faces = np.concatenate([to_uint8(image[None]) for image, _ in build_dataset({"val": "faces", "size": 24}, "val")])
    expected = expected_metrics(samples, faces)
    assert metrics["num_reference"] == 20 and made[0].seen[0] == (torch.uint8, (20, 3, 24, 24))
    assert {key: metrics[key] for key in expected} == pytest.approx(expected, rel=1e-6)
    assert metrics["inception_score_off_reason"] == "8 samples; the Inception Score needs at least 10 (one per split)"
    assert "  Inception Score: off: 8 samples; the Inception Score needs at least 10 (one per split)\n" in \
        capsys.readouterr().out
    np.savez(tmp_path / "few.npz", samples[:3])
    assert run_fid(tmp_path / "few.npz", "faces", "--size", "24", "--out", tmp_path, weights=weights) == 0
    assert json.loads((tmp_path / "fid.json").read_text())["precision_recall_off_reason"] == (
        "3 samples and 20 reference images; precision and recall need more than 3 of each")


def test_a_folder_is_read_as_it_is_a_size_at_a_time(tmp_path):
    sizes = [(16, 16), (16, 16), (20, 24), (20, 24), (20, 24), (20, 24), (16, 16)]
    arrays = [images(1, seed, size=size)[0] for seed, size in enumerate(sizes)]
    batches = list(FolderImages(write_folder(tmp_path / "mixed", arrays)).batches(3))
    assert [b.shape for b in batches] == [(2, 16, 16, 3), (3, 20, 24, 3), (1, 20, 24, 3), (1, 16, 16, 3)]
    np.testing.assert_array_equal(np.concatenate([b.reshape(len(b), -1) for b in batches[1:3]]),
                                  np.stack(arrays[2:6]).reshape(4, -1))


def test_fid_stops_without_the_weights_and_says_where(tmp_path, capsys):
    """The real loader: no stand-in."""
    np.savez(tmp_path / "samples.npz", images(4, 0))
    missing = tmp_path / "no_inception.pth"
    assert main(["fid", str(tmp_path / "samples.npz"), str(tmp_path / "samples.npz"), "--inception", str(missing)]) == 2
    assert capsys.readouterr().err == ("kepler fid: error: the FID Inception network is needed: no weights at "
                                       f"{missing} (give its weights with --inception; they are never downloaded)\n")


def _truncated_npz(path, array, keep_images: int) -> None:
    """An .npz whose arr_0 header promises ``array`` but whose data stops after ``keep_images``."""
    npy = io.BytesIO()
    np.lib.format.write_array(npy, array)
    data = npy.getvalue()
    cut = len(data) - (len(array) - keep_images) * array[0].nbytes
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("arr_0.npy", data[:cut])


def test_fid_bad_image_sets(stand_in, tmp_path, capsys):
    weights, _ = stand_in
    good = tmp_path / "good.npz"
    np.savez(good, images(5, 0))
    np.savez(tmp_path / "labels.npz", labels=np.zeros(5))
    np.savez(tmp_path / "floats.npz", np.zeros((2, 4, 4, 3), dtype=np.float32))
    np.savez(tmp_path / "one.npz", images(1, 0))
    (tmp_path / "text.npz").write_text("not a zip")
    _truncated_npz(tmp_path / "short.npz", images(4, 0), keep_images=2)
    assert run_fid(good, good, "--save-stats", tmp_path / "stats.npz", weights=weights) == 0
    np.savez(tmp_path / "partial_stats.npz", mu=np.zeros(6), sigma=np.eye(6))
    with np.load(tmp_path / "stats.npz") as stored:
        np.savez(tmp_path / "bad_stats.npz", **{**stored, "sigma": np.eye(5)})
    layout = "image sets are ADM's layout, arr_0: uint8 (N, H, W, 3)"
    cases = [
        ((tmp_path / "labels.npz", good), f"{tmp_path / 'labels.npz'} holds no arr_0: {layout}"),
        ((good, tmp_path / "floats.npz"), f"{tmp_path / 'floats.npz'}: arr_0 is float32 (2, 4, 4, 3); {layout}"),
        ((tmp_path / "text.npz", good), f"{tmp_path / 'text.npz'} is not an .npz file (not a zip archive)"),
        ((tmp_path / "short.npz", good), f"{tmp_path / 'short.npz'}: arr_0 ends after 2 of its 4 images"),
        ((good, tmp_path / "one.npz"), f"the reference {tmp_path / 'one.npz'}: its statistics need at least 2 images, "
                                       "got 1"),
        ((tmp_path / "stats.npz", good), "the samples are a statistics file: their images are needed (the Inception "
                                         "Score, precision and recall take each sample's features)"),
        ((good, tmp_path / "stats.npz", "--save-stats", tmp_path / "again.npz"),
         f"the reference is a statistics file already: there are no statistics to save to {tmp_path / 'again.npz'}"),
        ((good, tmp_path / "partial_stats.npz"),
         f"{tmp_path / 'partial_stats.npz'} is not a statistics file of kepler fid: it lacks mu_s, sigma_s, "
         "pool_features"),
        ((good, tmp_path / "bad_stats.npz"),
         f"{tmp_path / 'bad_stats.npz'}: the statistics' shapes do not fit together: mu (6,), sigma (5, 5), mu_s (4,), "
         "sigma_s (4, 4), pool_features (5, 6)"),
        ((good, good, "--save-stats", tmp_path / "nowhere" / "stats.npz"),
         f"--save-stats {tmp_path / 'nowhere' / 'stats.npz'}: its folder does not exist"),
    ]
    capsys.readouterr()
    for args, message in cases:
        assert run_fid(*args, weights=weights) == 2, message
        assert capsys.readouterr().err == f"kepler fid: error: {message}\n"
    assert run_fid(good, tmp_path / "no_such_thing", weights=weights) == 2
    assert capsys.readouterr().err.startswith(f"kepler fid: error: data '{tmp_path / 'no_such_thing'}' is not a data "
                                              "source: expected ")
