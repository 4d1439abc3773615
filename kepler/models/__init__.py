"""The Kepler image tokenizer: VQGAN encoder/decoder around :class:`kepler.nn.KeplerQuantizer`,
its PatchGAN discriminator and the LPIPS perceptual loss; the code prior over its index maps
(:class:`CodeTransformer`, sequence orders in :mod:`kepler.models.code_sequence`)."""

from kepler.models.autoencoder import Decoder, Encoder
from kepler.models.code_sequence import CodeLayout
from kepler.models.code_transformer import CodeTransformer
from kepler.models.transformer import KVCache
from kepler.models.logits import filter_logits, guide
from kepler.models.discriminator import NLayerDiscriminator, hinge_d_loss
from kepler.models.vqgan_loss import VQGANLoss, adaptive_generator_weight
from kepler.models.lpips import LPIPS, load_lpips
from kepler.models.vqmodel import VQModel

__all__ = [
    "LPIPS",
    "CodeLayout",
    "CodeTransformer",
    "KVCache",
    "Decoder",
    "Encoder",
    "NLayerDiscriminator",
    "VQGANLoss",
    "VQModel",
    "adaptive_generator_weight",
    "filter_logits",
    "guide",
    "hinge_d_loss",
    "load_lpips",
]
