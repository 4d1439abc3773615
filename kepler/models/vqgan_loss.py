"""VQGAN training objective: L1/L2 (+ LPIPS) reconstruction, GAN losses (PatchGAN or a DINOv2-feature
discriminator), quantizer loss.

Generator loss (taming's ``VQLPIPSWithDiscriminator``, optimizer 0)::

    nll   = pixel_weight * mean(rec(x, x_rec)) + perceptual_weight * mean(LPIPS(x, x_rec))
    g     = -mean(D(x_rec))             (gen_loss "hinge", taming's)
          =  mean(softplus(-D(x_rec)))  (gen_loss "non_saturating")
    loss  = nll + lambda * disc_factor(step) * g + codebook_weight * quantizer_loss

with ``rec`` the absolute (``rec_loss: l1``, taming's) or squared (``l2``) error, the adaptive weight
``lambda = disc_weight * ||grad nll|| / (||grad g|| + 1e-4)`` (gradients with respect to the decoder's
last layer, clamped to [0, 1e4]) and ``disc_factor(step) = 0`` before ``disc_start``.
Discriminator loss (optimizer 1): ``disc_factor(step) * (d_loss(D(x), D(x_rec)) + lecam_weight *
R_LC)``, with LeCam's regularizer (Yu et al., CVPR 2021, in their code's form)
``R_LC = mean(relu(D(x) - ema_fake)^2) + mean(relu(ema_real - D(x_rec))^2)``, where ``ema_real`` and
``ema_fake`` are exponential moving averages (decay ``lecam_decay``, from 0) of the mean real and
fake logits, updated at every discriminator step with the means over all ranks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from kepler.distributed import all_reduce_sum, world_size
from kepler.io.config import register_section
from kepler.models.dino_discriminator import load_dino_discriminator
from kepler.models.discriminator import D_LOSSES, G_LOSSES, NLayerDiscriminator
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

    ``discriminator`` is None when ``disc="dino"`` and its ViT weights are missing: the GAN terms are
    then off, and :attr:`disc_status` says so with the path.

    Its keyword arguments are the ``loss`` section of a training config, defaults included.

    Args:
        disc_start: optimizer step from which the GAN terms are on (taming's ImageNet VQGAN: 10000).
        codebook_weight: weight of the quantizer's loss.
        pixel_weight: weight of the L1 reconstruction term.
        perceptual_weight: weight of LPIPS; set to 0 automatically (with a warning) when the weight
            files are missing, see :func:`kepler.models.lpips.load_lpips`.
        disc_weight: the adaptive GAN weight's factor (see :func:`adaptive_generator_weight`).
        disc_factor: the GAN terms' factor once active (0 turns the GAN off).
        disc: the discriminator, ``"patchgan"`` (taming's) or ``"dino"``
            (:class:`kepler.models.dino_discriminator.DinoDiscriminator`: trainable heads on the
            tokens of several blocks of a frozen DINOv2 ViT).
        disc_num_layers, disc_ndf, disc_in_channels: the PatchGAN discriminator's depth, width and
            input channels.
        dino_model: the DINOv2 ViT (a timm name, e.g. ``vit_small_patch14_dinov2`` (ViT-S/14) or
            ``vit_base_patch14_dinov2`` (ViT-B/14)).
        dino_weights: its weights file (dinov2's ``.pth`` or timm's ``.safetensors``); None looks for
            the release file in ``<torch hub dir>/checkpoints`` (e.g. ``dinov2_vits14_pretrain.pth``).
            Never downloaded: without the file the GAN is off (logged with the path).
        dino_layers: the ViT blocks (0-based) whose tokens get a head.
        dino_resolution: the side images are resized to for the ViT (a multiple of 14).
        disc_loss: the discriminator loss, one of ``kepler.models.discriminator.D_LOSSES``.
        rec_loss: the pixel reconstruction term, ``"l1"`` (taming's) or ``"l2"``.
        gen_loss: the generator's GAN term, ``"hinge"`` (``-mean(D)``, taming's) or
            ``"non_saturating"`` (``mean(softplus(-D))``).
        lecam_weight: weight of LeCam's regularizer in the discriminator loss (0: off).
        lecam_decay: decay of its moving averages of the real and fake logits, in [0, 1).
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
        rec_loss: str = "l1",
        gen_loss: str = "hinge",
        lecam_weight: float = 0.0,
        lecam_decay: float = 0.999,
        disc: str = "patchgan",
        dino_model: str = "vit_small_patch14_dinov2",
        dino_weights: str | None = None,
        dino_layers: Sequence[int] = (2, 5, 8, 11),
        dino_resolution: int = 224,
    ):
        super().__init__()
        if disc_loss not in D_LOSSES:
            raise ValueError(f"disc_loss must be one of {sorted(D_LOSSES)}, got {disc_loss!r}")
        if rec_loss not in REC_LOSSES:
            raise ValueError(f"rec_loss must be one of {', '.join(REC_LOSSES)}, got {rec_loss!r}")
        if gen_loss not in G_LOSSES:
            raise ValueError(f"gen_loss must be one of {', '.join(G_LOSSES)}, got {gen_loss!r}")
        if disc not in DISCRIMINATORS:
            raise ValueError(f"disc must be one of {', '.join(DISCRIMINATORS)}, got {disc!r}")
        if not 0 <= lecam_decay < 1:
            raise ValueError(f"lecam_decay must be in [0, 1), got {lecam_decay}")
        self.rec_loss = rec_loss
        self.g_loss_fn = G_LOSSES[gen_loss]
        self.lecam_weight = lecam_weight
        self.lecam_decay = lecam_decay
        # (ema_real, ema_fake): LeCam's moving averages of the mean logits, saved with the checkpoint.
        self.register_buffer("lecam_ema", torch.zeros(2))
        self.disc_start = int(disc_start)
        self.codebook_weight = codebook_weight
        self.pixel_weight = pixel_weight
        self.disc_weight = disc_weight
        self.disc_factor = disc_factor
        self.d_loss_fn = D_LOSSES[disc_loss]
        if disc == "patchgan":
            self.discriminator = NLayerDiscriminator(disc_in_channels, disc_ndf, disc_num_layers)
            self.disc_status = "patchgan"
        else:
            self.discriminator, reason = load_dino_discriminator(dino_weights, dino_model, dino_layers, dino_resolution)
            if self.discriminator is None:
                self.disc_status = f"off: {reason}"
                log.warning("GAN off (loss.disc is dino): %s", reason)
            else:
                self.disc_status = f"dino ({dino_model}, blocks {', '.join(map(str, dino_layers))})"
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
        return self.discriminator is not None and self.disc_factor > 0 and step >= self.disc_start

    def reconstruction_loss(self, x: torch.Tensor, x_rec: torch.Tensor) -> tuple[torch.Tensor, dict]:
        error = x - x_rec
        l1 = error.abs().mean()
        logs = {"l1": l1.detach()}
        if self.rec_loss == "l2":
            pixel = error.square().mean()
            logs["l2"] = pixel.detach()
        else:
            pixel = l1
        nll = self.pixel_weight * pixel
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
            g_loss = self.g_loss_fn(disc(x_rec).float())
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
        active = self.gan_active(step)
        factor = self.disc_factor if active else 0.0
        d_loss = self.d_loss_fn(logits_real, logits_fake)
        logs = {"logits_real": logits_real.detach().mean(), "logits_fake": logits_fake.detach().mean()}
        if self.lecam_weight > 0:
            if active and self.training:
                self._update_lecam_ema(logs["logits_real"], logs["logits_fake"])
            lecam = lecam_regularizer(logits_real, logits_fake, self.lecam_ema[0], self.lecam_ema[1])
            d_loss = d_loss + self.lecam_weight * lecam
            logs["lecam"] = lecam.detach()
        d_loss = factor * d_loss
        return d_loss, {"d_loss": d_loss.detach(), **logs}

    @torch.no_grad()
    def _update_lecam_ema(self, mean_real: torch.Tensor, mean_fake: torch.Tensor) -> None:
        """One step of LeCam's moving averages, with the means over every rank (so all ranks agree)."""
        means = all_reduce_sum(torch.stack([mean_real, mean_fake]).float()) / world_size()
        self.lecam_ema.mul_(self.lecam_decay).add_(means.to(self.lecam_ema), alpha=1 - self.lecam_decay)


def lecam_regularizer(
    logits_real: torch.Tensor, logits_fake: torch.Tensor, ema_real: torch.Tensor, ema_fake: torch.Tensor
) -> torch.Tensor:
    """LeCam's regularizer (Yu et al. 2021, their code's form): ``mean(relu(D(x) - ema_fake)^2) +
    mean(relu(ema_real - D(x_rec))^2)``; the moving averages are constants to autograd."""
    return (logits_real - ema_fake.detach()).relu().square().mean() + (ema_real.detach() - logits_fake).relu().square().mean()


REC_LOSSES = ("l1", "l2")
DISCRIMINATORS = ("patchgan", "dino")
