"""LPIPS perceptual distance on VGG16 features (Zhang et al. 2018), from local weight files only.

Two files are needed and never downloaded:

* VGG16 ImageNet weights in torchvision's layout (``features.<i>.weight``), by default
  ``<torch hub dir>/checkpoints/vgg16-397923af.pth`` (where ``torchvision`` caches them);
* the LPIPS linear-layer weights (``lin<k>.model.1.weight``, the ``vgg.pth`` of the ``lpips``
  package v0.1), by default ``<torch hub dir>/checkpoints/lpips_vgg_v0.1.pth`` or the copy inside an
  installed ``lpips`` package.

:func:`load_lpips` returns ``(None, reason)`` when a file is missing, so the caller can say clearly
that the perceptual term is off; both files are read with ``weights_only=True``
(:func:`kepler.io.weights.load_weights`), so a file that holds more than tensors is refused, unread.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn

from kepler.io.weights import load_weights

VGG_FILENAME = "vgg16-397923af.pth"
LIN_FILENAME = "lpips_vgg_v0.1.pth"
# VGG16 ``features`` indices just after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_SLICE_ENDS = (4, 9, 16, 23, 30)
_CHANNELS = (64, 128, 256, 512, 512)


def default_vgg_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG_FILENAME


def default_lin_paths() -> list[Path]:
    paths = [Path(torch.hub.get_dir()) / "checkpoints" / LIN_FILENAME]
    spec = importlib.util.find_spec("lpips")
    if spec is not None and spec.origin is not None:
        paths.append(Path(spec.origin).parent / "weights" / "v0.1" / "vgg.pth")
    return paths


def _vgg16_features() -> nn.Sequential:
    """torchvision's VGG16 ``features`` stack (conv 3x3 + ReLU, max-pool between stages)."""
    cfg = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
    layers: list[nn.Module] = []
    in_ch = 3
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_ch, v, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
            in_ch = v
    return nn.Sequential(*layers)


class _Linear(nn.Module):
    """LPIPS's per-channel weighting: dropout (inactive in eval) then a 1x1 conv without bias."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class LPIPS(nn.Module):
    """Perceptual distance between image batches in [-1, 1]: (B, 3, H, W) x 2 -> (B, 1, 1, 1).

    Frozen: its parameters never require grad, and it stays in eval mode.
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        self.features = _vgg16_features()[: _SLICE_ENDS[-1]]
        self.lins = nn.ModuleList(_Linear(c) for c in _CHANNELS)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        # Always eval: the network is a fixed metric.
        return super().train(False)

    def load_weights(self, vgg_state: dict, lin_state: dict) -> None:
        """Load torchvision VGG16 weights (``features.*`` keys; others ignored) and LPIPS ``lin*`` weights."""
        features = {k[len("features.") :]: v for k, v in vgg_state.items() if k.startswith("features.")}
        self.features.load_state_dict(features)
        lins = {}
        for k, v in lin_state.items():
            if not k.startswith("lin"):
                continue
            idx, rest = k[3:].split(".", 1)
            lins[f"{idx}.{rest}"] = v
        self.lins.load_state_dict(lins)

    def _stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs, start = [], 0
        for end in _SLICE_ENDS:
            x = self.features[start:end](x)
            outs.append(x)
            start = end
        return outs

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        fx = self._stages((x - self.shift) / self.scale)
        fy = self._stages((y - self.shift) / self.scale)
        total = 0.0
        for a, b, lin in zip(fx, fy, self.lins):
            a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
            b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
            total = total + lin((a - b) ** 2).mean(dim=(2, 3), keepdim=True)
        return total


def load_lpips(vgg_path: str | os.PathLike | None = None, lin_path: str | os.PathLike | None = None):
    """Build :class:`LPIPS` from local files; returns ``(model, None)`` or ``(None, reason)``.

    ``vgg_path`` / ``lin_path`` default to the locations in the module docstring. Nothing is
    downloaded; a missing file gives a reason such as ``"no weights at /path/vgg16-397923af.pth"``, a
    file that is not plain weights a ValueError (:func:`kepler.io.weights.load_weights`).
    """
    vgg = Path(vgg_path) if vgg_path else default_vgg_path()
    if not vgg.is_file():
        return None, f"no weights at {vgg}"
    lin_candidates = [Path(lin_path)] if lin_path else default_lin_paths()
    lin = next((p for p in lin_candidates if p.is_file()), None)
    if lin is None:
        return None, f"no weights at {lin_candidates[0]}"
    model = LPIPS()
    model.load_weights(
        load_weights(vgg, f"LPIPS VGG weights {vgg}"),
        load_weights(lin, f"LPIPS linear weights {lin}"),
    )
    return model, None
