"""VQModel: VQGAN encoder -> 1x1 conv -> a quantizer (``kepler.nn``) -> 1x1 conv -> VQGAN decoder."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kepler.io.config import register_section
from kepler.models.autoencoder import Decoder, Encoder
from kepler.nn import build_quantizer


@register_section("tokenizer", "model", exclude=("quantizer",))
class VQModel(nn.Module):
    """Kepler image tokenizer.

    Its keyword arguments are the ``model`` section of a training config, defaults included.

    Args:
        ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, resolution, in_channels, out_ch,
            dropout, norm_groups: the encoder/decoder architecture (taming's ``ddconfig``, whose
            f16 VQGAN the defaults are); the downsampling factor is ``f = 2 ** (len(ch_mult) - 1)``.
        zero_init_residual: residual branches start at zero (blocks start as identities: small
            models learn far faster on a CPU budget).
        embed_dim: width of the quantized latent (the codeword dimension before partitioning).
        quantizer: the quantizer's config section: ``type`` (a name registered with
            :func:`kepler.nn.register_quantizer`, default ``"kepler"``) and that class's keyword
            arguments (``num_codes``, ``partitions``, ...); ``dim`` is ``embed_dim``.

    Only the quantizer protocol (:mod:`kepler.nn.protocol`) of ``self.quantize`` is used. Images are
    (B, in_channels, H, W) floats in [-1, 1] with H and W multiples of ``f``; index maps are
    (B, H / f, W / f, P) int64 with P = ``self.quantize.tokens_per_position``.
    """

    def __init__(
        self,
        *,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        z_channels: int = 256,
        resolution: int = 256,
        in_channels: int = 3,
        out_ch: int = 3,
        dropout: float = 0.0,
        norm_groups: int = 32,
        zero_init_residual: bool = False,
        embed_dim: int = 256,
        quantizer: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        # The ``model`` config section this model was built from (lists, not tuples): what
        # save_pretrained writes beside the weights.
        self.config = dict(
            ch=ch, ch_mult=list(ch_mult), num_res_blocks=num_res_blocks, attn_resolutions=list(attn_resolutions),
            z_channels=z_channels, resolution=resolution, in_channels=in_channels, out_ch=out_ch, dropout=dropout,
            norm_groups=norm_groups, zero_init_residual=zero_init_residual, embed_dim=embed_dim,
            quantizer=dict(quantizer or {}),
        )
        arch = dict(
            ch=ch,
            ch_mult=tuple(ch_mult),
            num_res_blocks=num_res_blocks,
            attn_resolutions=tuple(attn_resolutions),
            z_channels=z_channels,
            resolution=resolution,
            dropout=dropout,
            norm_groups=norm_groups,
            zero_init_residual=zero_init_residual,
        )
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        self.embed_dim = embed_dim
        self.encoder = Encoder(in_channels=in_channels, **arch)
        self.decoder = Decoder(out_ch=out_ch, **arch)
        self.quant_conv = nn.Conv2d(z_channels, embed_dim, kernel_size=1)
        try:
            self.quantize = build_quantizer(quantizer, dim=embed_dim)
        except ValueError as exc:  # the quantizer knows embed_dim only as its `dim`
            raise ValueError(f"model.quantizer (dim = model.embed_dim = {embed_dim}): {exc}") from None
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)

    def _check_image(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"x must be a (B, C, H, W) image batch, got shape {tuple(x.shape)}")
        f = self.downsample_factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(
                f"x height and width must be multiples of the downsampling factor {f}, got {tuple(x.shape[-2:])}"
            )

    def latents(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> the latents before quantization, (B, embed_dim, H/f, W/f) float32."""
        self._check_image(x)
        # The quantizer computes distances in fp32 itself; keep its input fp32 under autocast too.
        return self.quant_conv(self.encoder(x)).float()

    def encode(self, x: torch.Tensor):
        """x (B, C, H, W) -> ``(z_q (B, embed_dim, H/f, W/f), quantizer loss, info)``; info as returned
        by the quantizer: ``(perplexity, min_encodings, indices, utilization)``."""
        z_q, loss, info = self.quantize(self.latents(x))
        return z_q, loss, info

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """z_q (B, embed_dim, h, w) -> image (B, out_ch, h * f, w * f)."""
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, x: torch.Tensor):
        """x -> ``(reconstruction, quantizer loss, info)``."""
        z_q, loss, info = self.encode(x)
        return self.decode(z_q), loss, info

    @torch.no_grad()
    def encode_to_indices(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> code indices (B, H/f, W/f, P) int64."""
        _, _, info = self.encode(x)
        return info[2]

    @torch.no_grad()
    def decode_indices(self, indices: torch.Tensor, **decoding) -> torch.Tensor:
        """Code indices (B, h, w, P) int64 in [0, K) -> image (B, out_ch, h * f, w * f).

        ``decoding``: keyword arguments of the quantizer's ``indices_to_latents`` (``num_stages=s``
        decodes a residual quantizer's first ``s`` stages)."""
        return self.decode(self.quantize.indices_to_latents(indices, **decoding))

    # The peak of a forward without grads over the largest feature map it holds, measured on the CPU:
    # 6.5-7x for f16 models of 64 and 128 channels at 448x640, 8x for the demo model at 1260x900.
    ACTIVATION_FACTOR = 8

    def inference_bytes(self, height: int, width: int, batch: int = 1) -> int:
        """Estimated peak memory in bytes of encoding and decoding ``batch`` images of ``height x
        width`` without grads (float32): :data:`ACTIVATION_FACTOR` times the largest feature map (a
        level's channels times its positions) plus the parameters. Self-attention adds little: SDPA
        keeps it linear in the positions (see :class:`kepler.models.autoencoder.AttnBlock`)."""
        levels = self.config["ch_mult"]
        largest = max(self.config["ch"] * mult * (height // 2**i) * (width // 2**i) for i, mult in enumerate(levels))
        parameters = sum(p.numel() * p.element_size() for p in self.parameters())
        return self.ACTIVATION_FACTOR * 4 * batch * largest + parameters

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output conv weight, where the adaptive GAN weight is measured."""
        return self.decoder.conv_out.weight

    @classmethod
    def from_config(cls, model_cfg: Mapping[str, Any]) -> VQModel:
        """Build from the ``model`` section of a training config (plain containers)."""
        return cls(**model_cfg)

    def save_pretrained(self, directory: str | os.PathLike, **card) -> Path:
        """Write this model to ``directory`` for others: weights (safetensors), config and model card.
        See :func:`kepler.models.pretrained.save_pretrained` (``card``: its keyword arguments)."""
        from kepler.models.pretrained import save_pretrained

        return save_pretrained(self, directory, **card)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: torch.device | str = "cpu") -> VQModel:
        """A model written by :meth:`save_pretrained` (or ``kepler export``), in eval mode on ``device``.
        ``directory`` is a local folder, e.g. one downloaded in full; every file is checked
        (:func:`kepler.load`)."""
        from kepler.models.load import load_model

        return load_model(directory, device, kind="tokenizer").model

    @classmethod
    def from_taming(cls, checkpoint, config, trusted_globals=(), stubbed_globals=()) -> VQModel:
        """The model of a released Kepler Codebook or taming-transformers Lightning checkpoint and its
        YAML config, computing what the released model computes: see :func:`kepler.models.taming.from_taming`."""
        from kepler.models.taming import from_taming

        return from_taming(checkpoint, config, trusted_globals, stubbed_globals)
