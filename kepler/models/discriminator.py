"""PatchGAN discriminator (pix2pix's NLayerDiscriminator, as used by VQGAN) and the GAN losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NLayerDiscriminator(nn.Module):
    """PatchGAN: (B, in_channels, H, W) -> per-patch logits (B, 1, H', W').

    4x4 convolutions, stride 2 for the first ``n_layers`` and stride 1 for the last two, BatchNorm and
    LeakyReLU(0.2); channel width doubles per layer up to ``8 * ndf``. Weights start as in DCGAN
    (conv ~ N(0, 0.02), BatchNorm scale ~ N(1, 0.02)).
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, kernel_size=4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_dcgan_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _dcgan_init(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator: mean(relu(1 - real)) / 2 + mean(relu(1 + fake)) / 2."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating logistic loss of the discriminator."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's GAN term of taming's VQGAN: ``-mean(D(x_rec))``."""
    return -logits_fake.mean()


def non_saturating_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The non-saturating generator loss: ``mean(softplus(-D(x_rec)))``."""
    return F.softplus(-logits_fake).mean()


G_LOSSES = {"hinge": hinge_g_loss, "non_saturating": non_saturating_g_loss}
