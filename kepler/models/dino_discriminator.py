"""A discriminator on the frozen features of a DINOv2 ViT (``loss.disc: dino``).

The design of StyleGAN-T's projected discriminator, which the 2025-2026 tokenizers that lead rFID
(GigaTok, UniTok, SFTok, BAR) train against: the image goes through a frozen self-supervised ViT,
and a small trainable head on the tokens of each of several blocks says real or fake per token. The
heads see features a generator cannot easily fool with textures that only a PatchGAN's small
receptive field misses.

The ViT is timm's (``vit_small_patch14_dinov2``, ``vit_base_patch14_dinov2`` and their ``_reg4``
versions), built without weights and loaded from a local file (never downloaded), in either layout:
facebookresearch/dinov2's ``dinov2_vit?14_pretrain.pth`` (what ``torch.hub`` caches) or timm's
``model.safetensors``; the position embedding is resampled to ``resolution`` by timm's checkpoint
filter. :func:`load_dino_discriminator` returns ``(None, reason)`` when the file is missing, as
:func:`kepler.models.lpips.load_lpips` does.

Only the heads are trained and saved: the ViT stays frozen and in eval mode whatever
``requires_grad_`` / ``train`` say, and its weights are left out of :meth:`state_dict` (they come from
the weights file again on ``--resume``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from kepler.io.weights import load_weights

DINO_MODELS = (
    "vit_small_patch14_dinov2",
    "vit_base_patch14_dinov2",
    "vit_small_patch14_reg4_dinov2",
    "vit_base_patch14_reg4_dinov2",
)
# ImageNet's channel statistics, which DINOv2 was trained with (timm's IMAGENET_DEFAULT_MEAN/STD).
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def default_dino_path(model: str) -> Path:
    """Where ``torch.hub`` caches the DINOv2 release of ``model``: ``<hub>/checkpoints/<file of its URL>``."""
    import timm

    url = timm.models.get_pretrained_cfg(f"{model}.lvd142m").url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[1]


class LocalBatchNorm(nn.Module):
    """Batch norm of ``(B, C, L)`` tokens over groups of ``virtual_batch`` samples (StyleGAN-T's):
    statistics of a few images at a time, so a large batch does not average the signal away. No
    running statistics: the discriminator is only ever used in training mode."""

    def __init__(self, channels: int, virtual_batch: int = 8, eps: float = 1e-5):
        super().__init__()
        self.virtual_batch = virtual_batch
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, length = x.shape
        group = math.gcd(batch, self.virtual_batch)  # the groups must tile the batch
        grouped = x.view(batch // group, group, channels, length)
        mean = grouped.mean(dim=(1, 3), keepdim=True)
        var = grouped.var(dim=(1, 3), keepdim=True, unbiased=False)
        x = ((grouped - mean) * torch.rsqrt(var + self.eps)).view(batch, channels, length)
        return x * self.weight[:, None] + self.bias[:, None]


def _conv_block(channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        spectral_norm(nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2)),
        LocalBatchNorm(channels),
        nn.LeakyReLU(0.2),
    )


class DinoHead(nn.Module):
    """One block's head: ``(B, C, L)`` tokens -> ``(B, 1, L)`` logits (a 1x1 block, a residual 9-wide
    block scaled by 1/sqrt(2), a spectrally normalized 1x1 projection)."""

    def __init__(self, channels: int):
        super().__init__()
        self.pointwise = _conv_block(channels, 1)
        self.wide = _conv_block(channels, 9)
        self.logits = spectral_norm(nn.Conv1d(channels, 1, kernel_size=1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.pointwise(tokens)
        x = (x + self.wide(x)) / math.sqrt(2.0)
        return self.logits(x)


class DinoDiscriminator(nn.Module):
    """(B, 3, H, W) images in [-1, 1] -> (B, 1, len(layers) * T) logits, one per token of each chosen
    block (T = (resolution / 14)^2 patch tokens).

    Args:
        model: a timm DINOv2 ViT name, one of :data:`DINO_MODELS`.
        layers: the blocks (0-based) whose output tokens get a head; StyleGAN-T's are 2, 5, 8, 11.
        resolution: the side the images are resized to before the ViT, a multiple of its patch (14).
        backbone_state: the ViT's weights (either layout, see the module docstring); None leaves
            timm's random initialization (tests).
    """

    def __init__(
        self,
        model: str = "vit_small_patch14_dinov2",
        layers: Sequence[int] = (2, 5, 8, 11),
        resolution: int = 224,
        backbone_state: dict | None = None,
    ):
        super().__init__()
        import timm
        from timm.models.vision_transformer import checkpoint_filter_fn

        if model not in DINO_MODELS:
            raise ValueError(f"dino_model must be one of {', '.join(DINO_MODELS)}, got {model!r}")
        if resolution < 14 or resolution % 14:
            raise ValueError(f"dino_resolution must be a positive multiple of the ViT's patch, 14, got {resolution}")
        backbone = timm.create_model(model, pretrained=False, img_size=resolution)
        depth = len(backbone.blocks)
        self.layers = [int(i) for i in layers]
        if not self.layers or any(not 0 <= i < depth for i in self.layers) or len(set(self.layers)) != len(self.layers):
            raise ValueError(f"dino_layers must be distinct blocks in [0, {depth - 1}] of {model}, got {list(layers)}")
        if backbone_state is not None:
            backbone.load_state_dict(checkpoint_filter_fn(backbone_state, backbone))
        self.resolution = resolution
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)
        self.heads = nn.ModuleList(DinoHead(backbone.embed_dim) for _ in self.layers)
        self.backbone.requires_grad_(False)
        self.backbone.eval()
        # The frozen ViT's weights come from its file, not from checkpoints.
        self.register_state_dict_post_hook(_drop_backbone)
        self.register_load_state_dict_pre_hook(_keep_backbone)

    def train(self, mode: bool = True) -> DinoDiscriminator:
        super().train(mode)
        self.backbone.eval()  # a fixed feature extractor
        return self

    def requires_grad_(self, requires_grad: bool = True) -> DinoDiscriminator:
        self.heads.requires_grad_(requires_grad)  # the ViT stays frozen
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate((x + 1) / 2, size=(self.resolution, self.resolution), mode="bilinear",
                          align_corners=False, antialias=x.shape[-1] > self.resolution)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        # No graph through the ViT for detached images (the discriminator's own step).
        with torch.set_grad_enabled(torch.is_grad_enabled() and x.requires_grad):
            features = self.backbone.forward_intermediates(
                x, indices=self.layers, intermediates_only=True, output_fmt="NLC", stop_early=True
            )
        return torch.cat([head(f.transpose(1, 2)) for head, f in zip(self.heads, features)], dim=-1)


def _drop_backbone(module: DinoDiscriminator, state: dict, prefix: str, local_metadata) -> None:
    for key in [k for k in state if k.startswith(prefix + "backbone.")]:
        del state[key]


def _keep_backbone(module: DinoDiscriminator, state: dict, prefix: str, *args) -> None:
    for key, value in module.backbone.state_dict(prefix=prefix + "backbone.").items():
        state.setdefault(key, value)


def load_dino_discriminator(
    path: str | os.PathLike | None,
    model: str = "vit_small_patch14_dinov2",
    layers: Sequence[int] = (2, 5, 8, 11),
    resolution: int = 224,
):
    """Build :class:`DinoDiscriminator` with the ViT's weights from ``path`` (default
    :func:`default_dino_path`); returns ``(model, None)`` or ``(None, "no weights at PATH")``.

    A ``.safetensors`` file is read as such, anything else with ``weights_only=True``
    (:func:`kepler.io.weights.load_weights`); a file that is not plain weights, or whose weights do
    not fit ``model``, is a ValueError naming the file.
    """
    if model not in DINO_MODELS:
        raise ValueError(f"dino_model must be one of {', '.join(DINO_MODELS)}, got {model!r}")
    file = Path(path) if path else default_dino_path(model)
    if not file.is_file():
        return None, f"no weights at {file}"
    what = f"DINOv2 weights {file}"
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(file)
        except Exception as exc:
            raise ValueError(f"{what} could not be read as safetensors: {exc}") from None
    else:
        state = load_weights(file, what)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{what} is not a state dict of tensors")
    try:
        return DinoDiscriminator(model, layers, resolution, backbone_state=state), None
    except RuntimeError as exc:  # load_state_dict's missing / unexpected keys or shapes
        first = str(exc).strip().splitlines()
        raise ValueError(f"{what} does not fit {model}: {' '.join(line.strip() for line in first[:2])}") from None
