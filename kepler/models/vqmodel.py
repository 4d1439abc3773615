"""VQModel: VQGAN encoder -> 1x1 conv -> KeplerQuantizer -> 1x1 conv -> VQGAN decoder."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from kepler.models.autoencoder import Decoder, Encoder


class VQModel(nn.Module):
    """Kepler image tokenizer.

    Args:
        ch, ch_mult, num_res_blocks, attn_resolutions, z_channels, resolution, in_channels, out_ch,
            dropout, norm_groups, zero_init_residual: the encoder/decoder architecture (taming's
            ``ddconfig``); the downsampling factor is ``f = 2 ** (len(ch_mult) - 1)``.
        embed_dim: width of the quantized latent (the codeword dimension before partitioning).
        quantizer: keyword arguments of :class:`kepler.nn.KeplerQuantizer` (``num_codes``,
            ``partitions``, ``beta``, ...); ``dim`` is ``embed_dim``.

    Images are (B, in_channels, H, W) floats in [-1, 1] with H and W multiples of ``f``; index maps
    are (B, H / f, W / f, P) int64 with P = ``quantizer["partitions"]``.
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
        from kepler.nn import KeplerQuantizer

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
        self.quantize = KeplerQuantizer(dim=embed_dim, **dict(quantizer or {}))
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)

    def _check_image(self, x: torch.Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"x must be a (B, C, H, W) image batch, got shape {tuple(x.shape)}")
        f = self.downsample_factor
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(
                f"x height and width must be multiples of the downsampling factor {f}, got {tuple(x.shape[-2:])}"
            )

    def encode(self, x: torch.Tensor):
        """x (B, C, H, W) -> ``(z_q (B, embed_dim, H/f, W/f), quantizer loss, info)``; info as returned
        by the quantizer: ``(perplexity, min_encodings, indices, utilization)``."""
        self._check_image(x)
        z = self.quant_conv(self.encoder(x))
        # The quantizer computes distances in fp32 itself; keep its input fp32 under autocast too.
        z_q, loss, info = self.quantize(z.float())
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
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, h, w, P) int64 -> image (B, out_ch, h * f, w * f)."""
        if indices.dim() != 4:
            raise ValueError(f"indices must be (B, h, w, P), got shape {tuple(indices.shape)}")
        b, h, w, _ = indices.shape
        z_q = self.quantize.get_codebook_entry(indices.long(), (b, h, w, self.embed_dim))
        return self.decode(z_q)

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output conv weight, where the adaptive GAN weight is measured."""
        return self.decoder.conv_out.weight

    @classmethod
    def from_config(cls, model_cfg: Mapping[str, Any]) -> VQModel:
        """Build from the ``model`` section of a training config (a dict or DictConfig)."""
        cfg = dict(model_cfg)
        cfg["quantizer"] = dict(cfg.get("quantizer") or {})
        return cls(**cfg)
