"""VQGAN-style convolutional encoder and decoder (the f16 architecture of taming-transformers).

Both are fully convolutional: the configured ``resolution`` only decides at which feature-map sizes
self-attention blocks are placed; any input whose sides are multiples of ``2 ** (len(ch_mult) - 1)``
works, so a model trained at one resolution reconstructs others.

``zero_init_residual=True`` starts every residual branch (a ResNet block's second conv, an attention
block's output projection) at zero, as guided-diffusion's ``zero_module`` does: each block starts as
the identity, which makes small models on small budgets learn much faster. taming initializes them
like every other conv (the default, False).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm of ``channels`` in ``groups`` groups (taming's 32), which must divide ``channels``: a
    silently different grouping would compute something else than the config says."""
    if channels % groups:
        raise ValueError(f"norm_groups={groups} does not divide the {channels} channels of a block: choose a "
                         "divisor of every level's width (ch * ch_mult)")
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> 3x3 conv, twice, plus a (1x1-projected where widths differ) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, norm_groups: int = 32):
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with a residual connection."""

    def __init__(self, channels: int, norm_groups: int = 32):
        super().__init__()
        self.norm = group_norm(channels, norm_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # (B, 3, 1, HW, C): q, k and v of one head with unit stride over C. SDPA's fused kernels (flash
        # on the CPU and GPU) need that layout and keep memory linear in HW; on a strided view it
        # falls back to writing the HW x HW matrix (20 GB for a 1260x900 photo at f4).
        qkv = self.qkv(self.norm(x)).reshape(b, 3, 1, c, h * w).transpose(-1, -2).contiguous()
        out = F.scaled_dot_product_attention(*qkv.unbind(dim=1))[:, 0]
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Stride-2 3x3 conv with (right, bottom) zero padding, halving H and W."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: ResNet blocks, each optionally followed by attention, then a resampler."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module], resample: nn.Module | None):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        self.resample = resample if resample is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return self.resample(x)


class _Middle(nn.Module):
    def __init__(self, channels: int, dropout: float, norm_groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, norm_groups)
        self.attn_1 = AttnBlock(channels, norm_groups)
        self.block_2 = ResnetBlock(channels, channels, dropout, norm_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def zero_init_residual_branches(module: nn.Module) -> None:
    """Zero the last layer of every residual branch under ``module`` (blocks start as identities)."""
    for block in module.modules():
        last = block.conv2 if isinstance(block, ResnetBlock) else block.proj_out if isinstance(block, AttnBlock) else None
        if last is not None:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)


def _check_architecture(ch: int, ch_mult: Sequence[int], num_res_blocks: int, resolution: int) -> None:
    if ch <= 0:
        raise ValueError(f"ch must be positive, got {ch}")
    if len(ch_mult) == 0 or any(m <= 0 for m in ch_mult):
        raise ValueError(f"ch_mult must be a non-empty list of positive ints, got {list(ch_mult)}")
    if num_res_blocks <= 0:
        raise ValueError(f"num_res_blocks must be positive, got {num_res_blocks}")
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> latent (B, z_channels, H / f, W / f), f = 2 ** (len(ch_mult) - 1)."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        z_channels: int,
        resolution: int,
        in_channels: int = 3,
        dropout: float = 0.0,
        norm_groups: int = 32,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        _check_architecture(ch, ch_mult, num_res_blocks, resolution)
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, padding=1)
        levels = []
        current_res = resolution
        block_in = ch
        for i, mult in enumerate(ch_mult):
            block_out = ch * mult
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dropout, norm_groups))
                block_in = block_out
                if current_res in attn_resolutions:
                    attns.append(AttnBlock(block_in, norm_groups))
            last = i == len(ch_mult) - 1
            levels.append(_Level(blocks, attns, None if last else Downsample(block_in)))
            if not last:
                current_res //= 2
        self.down = nn.ModuleList(levels)
        self.mid = _Middle(block_in, dropout, norm_groups)
        self.norm_out = group_norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, z_channels, kernel_size=3, padding=1)
        if zero_init_residual:
            zero_init_residual_branches(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h * f, w * f); the mirror of :class:`Encoder`."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        z_channels: int,
        resolution: int,
        out_ch: int = 3,
        dropout: float = 0.0,
        norm_groups: int = 32,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        _check_architecture(ch, ch_mult, num_res_blocks, resolution)
        block_in = ch * ch_mult[-1]
        current_res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, padding=1)
        self.mid = _Middle(block_in, dropout, norm_groups)
        levels = []
        for i in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[i]
            blocks, attns = [], []
            # One block more than the encoder per level, as in taming's decoder.
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout, norm_groups))
                block_in = block_out
                if current_res in attn_resolutions:
                    attns.append(AttnBlock(block_in, norm_groups))
            levels.append(_Level(blocks, attns, Upsample(block_in) if i != 0 else None))
            if i != 0:
                current_res *= 2
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, padding=1)
        if zero_init_residual:
            zero_init_residual_branches(self)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in self.up:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))
