"""FID and Inception Score on the local FID Inception network; nothing is ever downloaded.

Both use torchmetrics (``FrechetInceptionDistance``, ``InceptionScore``) with the FID Inception
network of pytorch-fid / torch-fidelity, whose weights ``pt_inception-2015-12-05-6726825d.pth`` are
looked up in ``<torch hub dir>/checkpoints`` by default. A metric is off, saying why, when the
weights or the ``torch-fidelity`` package are missing, or when the file is not the published one
(checked by its SHA-256 and read with ``weights_only=True`` before torch-fidelity sees it).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import torch

from kepler.io.weights import load_weights, sha256_prefix_matches

INCEPTION_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
# Start of the published file's SHA-256 (torch hub's naming: <name>-<sha256 prefix>.pth).
INCEPTION_SHA256_PREFIX = "6726825d"
# The Inception Score's usual splits (Salimans et al.; torchmetrics' default): mean and std over them.
INCEPTION_SCORE_SPLITS = 10


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


def load_inception_score(weights_path: str | os.PathLike | None = None):
    """torchmetrics ``InceptionScore`` (:data:`INCEPTION_SCORE_SPLITS` splits) on the local FID
    Inception weights: ``(metric, None)`` or ``(None, reason)``, as :func:`load_fid`. It takes float
    images in [0, 1]; ``compute()`` is ``(mean, std)`` over the splits."""
    checked, reason = _checked_inception_weights(weights_path)
    if checked is None:
        return None, reason
    from torchmetrics.image.fid import NoTrainInceptionV3
    from torchmetrics.image.inception import InceptionScore

    # InceptionScore takes no weights path: it is handed the network its default would build
    # (the logits_unbiased output), built on the checked weights.
    network = NoTrainInceptionV3(name="inception-v3-compat", features_list=["logits_unbiased"],
                                 feature_extractor_weights_path=checked)
    with warnings.catch_warnings():
        # It keeps every sample's 1008 logits (4 KB): 200 MB at 50k samples, not worth a warning per run.
        warnings.filterwarnings("ignore", message="Metric `InceptionScore` will save all extracted features")
        return InceptionScore(feature=network, splits=INCEPTION_SCORE_SPLITS, normalize=True), None
