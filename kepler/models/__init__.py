"""The Kepler image tokenizer: VQGAN encoder/decoder around :class:`kepler.nn.KeplerQuantizer`,
its PatchGAN discriminator and the LPIPS perceptual loss."""

from kepler.models.autoencoder import Decoder, Encoder
from kepler.models.discriminator import NLayerDiscriminator, hinge_d_loss
from kepler.models.vqgan_loss import VQGANLoss, adaptive_generator_weight
from kepler.models.lpips import LPIPS, load_lpips
from kepler.models.vqmodel import VQModel

__all__ = [
    "LPIPS",
    "Decoder",
    "Encoder",
    "NLayerDiscriminator",
    "VQGANLoss",
    "VQModel",
    "adaptive_generator_weight",
    "hinge_d_loss",
    "load_lpips",
]
