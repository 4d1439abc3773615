"""The FID Inception network on local weights; nothing is ever downloaded.

The network is torch-fidelity's port of the TF Inception graph that FID, the Inception Score and the
ADM evaluator use; its weights ``pt_inception-2015-12-05-6726825d.pth`` are looked up in
``<torch hub dir>/checkpoints`` by default. It is off, saying why, when the weights or the
``torch-fidelity`` package are missing, or when the file is not the published one (checked by its
SHA-256 and read with ``weights_only=True`` before torch-fidelity sees it). Two ways to use it:

* :func:`load_inception_network`: the features the ADM evaluator takes (pool, spatial, logits) of
  uint8 images, which :mod:`kepler.metrics.generative` turns into FID, sFID, Inception Score,
  precision and recall (``kepler fid``, ``kepler prior eval``);
* :func:`load_fid`: torchmetrics' ``FrechetInceptionDistance`` on it (the rFID of ``kepler eval``,
  summed across ranks).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from kepler.io.weights import load_weights, sha256_prefix_matches

INCEPTION_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
# Start of the published file's SHA-256 (torch hub's naming: <name>-<sha256 prefix>.pth).
INCEPTION_SHA256_PREFIX = "6726825d"
# sFID's layer, TF's mixed_6/conv, is torch-fidelity's Mixed_6d.branch1x1: TF's 17x17 blocks
# mixed_3 ... mixed_7 are Mixed_6a ... Mixed_6e, and a block's plain `conv` its 1x1 branch (the map by
# which torch-fidelity converted the TF graph's weights). ADM keeps its first 7 channels.
SPATIAL_LAYER = "Mixed_6d.branch1x1"
SPATIAL_CHANNELS = 7


def default_inception_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME


def read_inception_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The FID Inception state dict in ``path``, read once into memory and checked before use: its
    SHA-256 must start with :data:`INCEPTION_SHA256_PREFIX` (the published file's, carried by its name)
    and it is unpickled with ``weights_only=True``. ValueError, one line, otherwise."""
    data = Path(path).read_bytes()
    matches, digest = sha256_prefix_matches(data, INCEPTION_SHA256_PREFIX)
    if not matches:
        raise ValueError(
            f"{path} is not the FID Inception weights file {INCEPTION_FILENAME}: its SHA-256 starts with "
            f"{digest[:8]}, not {INCEPTION_SHA256_PREFIX}"
        )
    state = load_weights(data, f"FID Inception weights {path}")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"FID Inception weights {path}: not a state dict of tensors")
    return state


def _checked_inception_weights(weights_path: str | os.PathLike | None) -> tuple[io.BytesIO | None, str | None]:
    """The local FID Inception weights (default :func:`default_inception_path`) as torch-fidelity
    reads them, ``(file object, None)``, or ``(None, reason)``: missing file, missing torch-fidelity,
    or a file refused by :func:`read_inception_weights`."""
    path = Path(weights_path) if weights_path else default_inception_path()
    if not path.is_file():
        return None, f"no weights at {path}"
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:
        return None, "the torch-fidelity package (FID Inception network) is not installed"
    try:
        state = read_inception_weights(path)
    except ValueError as exc:
        return None, str(exc)
    # torch-fidelity unpickles its weights file with weights_only=False: it is handed our own
    # serialization of the checked tensors, never the file on disk.
    checked = io.BytesIO()
    torch.save(state, checked)
    checked.seek(0)
    return checked, None


def load_fid(weights_path: str | os.PathLike | None = None):
    """torchmetrics ``FrechetInceptionDistance`` on the local FID Inception weights: ``(metric, None)``
    or ``(None, reason)`` (see :func:`_checked_inception_weights`). It takes float images in [0, 1]."""
    checked, reason = _checked_inception_weights(weights_path)
    if checked is None:
        return None, reason
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=checked), None


class InceptionFeatures(NamedTuple):
    """What the ADM evaluator takes from the FID Inception network for N images, float32.

    ``pool (N, 2048)``: pool_3, for FID, precision and recall. ``spatial (N, 2023)``: the first
    :data:`SPATIAL_CHANNELS` channels of mixed_6/conv (17 x 17 x 7, flattened in TF's height, width,
    channel order), for sFID. ``logits (N, 1008)``: pool_3 times the classifier's weights without its
    bias (the TF graph's ``softmax/logits/MatMul``), for the Inception Score.
    """

    pool: torch.Tensor
    spatial: torch.Tensor
    logits: torch.Tensor


class InceptionNetwork(nn.Module):
    """torch-fidelity's FID Inception network on checked weights (:func:`load_inception_network`):
    uint8 images ``(N, 3, H, W)`` of any size (resized to 299 inside, as the TF graph does) ->
    :class:`InceptionFeatures`."""

    def __init__(self, weights: io.BytesIO):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                   feature_extractor_weights_path=weights)
        # torch-fidelity returns only its named outputs: the spatial layer's is kept as it passes.
        self.network.get_submodule(SPATIAL_LAYER).register_forward_hook(self._keep_spatial)
        self._spatial = None
        self.eval()

    def _keep_spatial(self, module, inputs, output) -> None:
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1).float()

    def forward(self, images: torch.Tensor) -> InceptionFeatures:
        pool, logits = self.network(images)
        spatial, self._spatial = self._spatial, None
        return InceptionFeatures(pool, spatial, logits)


def load_inception_network(weights_path: str | os.PathLike | None = None) -> tuple[InceptionNetwork | None, str | None]:
    """:class:`InceptionNetwork` on the local FID Inception weights (default
    :func:`default_inception_path`), in eval mode on the CPU: ``(network, None)``, or ``(None, reason)``
    (see :func:`_checked_inception_weights`)."""
    checked, reason = _checked_inception_weights(weights_path)
    if checked is None:
        return None, reason
    return InceptionNetwork(checked), None


@torch.no_grad()
def inception_features(network, batches: Iterable[np.ndarray | torch.Tensor], device: torch.device | str = "cpu"
                       ) -> InceptionFeatures:
    """The features ``network`` (an :class:`InceptionNetwork`, or any module that returns
    :class:`InceptionFeatures` of uint8 ``(B, 3, H, W)`` images) gives images that come as batches
    of uint8 ``(B, H, W, 3)`` arrays or tensors (ADM's layout, as in an ``.npz``), run on ``device``
    and concatenated on the CPU."""
    parts = []
    for batch in batches:
        images = torch.as_tensor(batch)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (B, H, W, 3), got {images.dtype} {tuple(images.shape)}")
        features = network(images.to(device).permute(0, 3, 1, 2).contiguous())
        parts.append([feature.cpu() for feature in features])
    if not parts:
        raise ValueError("no images to take Inception features of")
    return InceptionFeatures(*(torch.cat(column) for column in zip(*parts)))
