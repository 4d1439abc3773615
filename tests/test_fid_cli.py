"""The ADM evaluator's pipeline: the Inception network's features (random weights: the published
file is not on test machines), image sets, reference statistics and ``kepler fid`` with a stand-in
network; the missing-weights message with the real loader."""

import hashlib
import io

import pytest
import torch

from kepler.metrics import inception as inception_module
from kepler.metrics.inception import INCEPTION_FILENAME, inception_features, load_inception_network


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """torch-fidelity's FID Inception network with its random initialization, saved as a weights
    file: ``(path, its SHA-256 prefix, its state dict)``."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state):  # keep the random initialization
            pass

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    torch.manual_seed(0)
    weights = Unloaded("inception", ["2048"], feature_extractor_weights_path=empty).state_dict()
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

