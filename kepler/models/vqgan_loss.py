"""VQGAN training objective: L1 (+ LPIPS) reconstruction, PatchGAN hinge loss, quantizer loss.

Generator loss (taming's ``VQLPIPSWithDiscriminator``, optimizer 0)::

    nll   = mean(|x - x_rec| * pixel_weight + perceptual_weight * LPIPS(x, x_rec))
    g     = -mean(D(x_rec))
    loss  = nll + lambda * disc_factor(step) * g + codebook_weight * quantizer_loss

with the adaptive weight ``lambda = disc_weight * ||grad nll|| / (||grad g|| + 1e-4)`` (gradients with
respect to the decoder's last layer, clamped to [0, 1e4]) and ``disc_factor(step) = 0`` before
``disc_start``. Discriminator loss (optimizer 1): ``disc_factor(step) * hinge(D(x), D(x_rec))``.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from kepler.io.config import register_section
from kepler.models.discriminator import D_LOSSES, NLayerDiscriminator
from kepler.models.lpips import load_lpips

log = logging.getLogger("kepler")


def adaptive_generator_weight(
    nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, disc_weight: float
) -> torch.Tensor:
    """Balance the GAN term against reconstruction at ``last_layer`` (a weight tensor); detached scalar."""
    nll_grad = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.float().norm() / (g_grad.float().norm() + 1e-4)
    return torch.clamp(weight, 0.0, 1e4).detach() * disc_weight


@register_section("tokenizer", "loss")
class VQGANLoss(nn.Module):
    """Owns the discriminator and the (optional, frozen) LPIPS network.

    Its keyword arguments are the ``loss`` section of a training config, defaults included.

    Args:
        disc_start: optimizer step from which the GAN terms are on (taming's ImageNet VQGAN: 10000).
        codebook_weight: weight of the quantizer's loss.
        pixel_weight: weight of the L1 reconstruction term.
        perceptual_weight: weight of LPIPS; set to 0 automatically (with a warning) when the weight
            files are missing, see :func:`kepler.models.lpips.load_lpips`.
        disc_weight: the adaptive GAN weight's factor (see :func:`adaptive_generator_weight`).
        disc_factor: the GAN terms' factor once active (0 turns the GAN off).
        disc_num_layers, disc_ndf, disc_in_channels: the PatchGAN discriminator's depth, width and
            input channels.
        disc_loss: the discriminator loss, one of ``kepler.models.discriminator.D_LOSSES``.
        lpips_vgg_path, lpips_lin_path: local LPIPS weight files; None looks in
            ``<torch hub dir>/checkpoints`` (``vgg16-397923af.pth``, ``lpips_vgg_v0.1.pth``).
    """

    def __init__(
        self,
        disc_start: int = 10000,
        codebook_weight: float = 1.0,
        pixel_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        disc_weight: float = 0.8,
        disc_factor: float = 1.0,
        disc_num_layers: int = 3,
        disc_ndf: int = 64,
        disc_in_channels: int = 3,
        disc_loss: str = "hinge",
        lpips_vgg_path: str | None = None,
        lpips_lin_path: str | None = None,
    ):
        super().__init__()
        if disc_loss not in D_LOSSES:
            raise ValueError(f"disc_loss must be one of {sorted(D_LOSSES)}, got {disc_loss!r}")
        self.disc_start = int(disc_start)
        self.codebook_weight = codebook_weight
        self.pixel_weight = pixel_weight
        self.disc_weight = disc_weight
        self.disc_factor = disc_factor
        self.d_loss_fn = D_LOSSES[disc_loss]
        self.discriminator = NLayerDiscriminator(disc_in_channels, disc_ndf, disc_num_layers)
        self.perceptual_weight = perceptual_weight
        self.perceptual = None
        self.perceptual_status = "off (perceptual_weight is 0)"
        if perceptual_weight > 0:
            model, reason = load_lpips(lpips_vgg_path, lpips_lin_path)
            if model is None:
                self.perceptual_weight = 0.0
                self.perceptual_status = f"off: {reason}"
                log.warning("perceptual loss off: %s", reason)
            else:
                self.perceptual = model
                self.perceptual_status = "on"

    def gan_active(self, step: int) -> bool:
        return self.disc_factor > 0 and step >= self.disc_start

    def reconstruction_loss(self, x: torch.Tensor, x_rec: torch.Tensor) -> tuple[torch.Tensor, dict]:
        l1 = (x - x_rec).abs().mean()
        nll = self.pixel_weight * l1
        logs = {"l1": l1.detach()}
        if self.perceptual is not None:
            p_loss = self.perceptual(x.float(), x_rec.float()).mean()
            nll = nll + self.perceptual_weight * p_loss
            logs["p_loss"] = p_loss.detach()
        return nll, logs

    def generator_loss(
        self,
        codebook_loss: torch.Tensor,
        x: torch.Tensor,
        x_rec: torch.Tensor,
        step: int,
        last_layer: torch.Tensor,
        discriminator: nn.Module | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """Total autoencoder loss and detached logs. ``discriminator`` defaults to ``self.discriminator``
        (pass the unwrapped module under DDP)."""
        nll, logs = self.reconstruction_loss(x, x_rec)
        loss = nll + self.codebook_weight * codebook_loss.mean()
        logs["quant_loss"] = codebook_loss.detach().mean()
        if self.gan_active(step):
            disc = discriminator if discriminator is not None else self.discriminator
            g_loss = -disc(x_rec).float().mean()
            if self.training:
                d_weight = adaptive_generator_weight(nll, g_loss, last_layer, self.disc_weight)
            else:
                d_weight = torch.zeros((), device=x.device)
            loss = loss + d_weight * self.disc_factor * g_loss
            logs["g_loss"] = g_loss.detach()
            logs["d_weight"] = d_weight
        logs["ae_loss"] = loss.detach()
        return loss, logs

    def discriminator_loss(
        self, x: torch.Tensor, x_rec: torch.Tensor, step: int, discriminator: nn.Module | None = None
    ) -> tuple[torch.Tensor, dict]:
        """Discriminator loss; real and reconstructed images go through one forward (one BatchNorm
        batch), which keeps a DDP-wrapped discriminator to one forward per backward."""
        disc = discriminator if discriminator is not None else self.discriminator
        logits = disc(torch.cat([x.detach(), x_rec.detach()])).float()
        logits_real, logits_fake = logits.chunk(2)
        factor = self.disc_factor if self.gan_active(step) else 0.0
        d_loss = factor * self.d_loss_fn(logits_real, logits_fake)
        return d_loss, {
            "d_loss": d_loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
        }
