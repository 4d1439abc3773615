"""How a latent map is cut into the sub-vectors that are quantized.

A quantizer with ``P`` partitions replaces every latent vector by ``P`` codewords of ``dim / P``
elements each. The released Kepler code has three ways to cut a latent map ``(B, C, H, W)``;
each is a small stateless class here with exact inverses:

* :class:`GroupPartition` (``"group"``): each position's ``C`` channels in ``P`` contiguous chunks
  of ``C / P`` channels. Sub-vector ``p`` of position ``(h, w)`` holds channels
  ``[p * C/P, (p + 1) * C/P)``.
* :class:`CustomPartition` (``"custom"``): the released interleaved split. Each position's
  channels are reordered as all even channels then all odd channels, and that order is cut into
  ``P`` contiguous chunks (with ``P = 4``: even channels of the first half, even channels of the
  second half, odd channels of the first half, odd channels of the second half).
* :class:`LayerPartition` (``"layer"``): each channel's ``H x W`` map, flattened row-major, in
  ``P`` contiguous chunks of ``H * W / P`` pixels. The sub-vectors must have the codebook's
  ``dim / P`` elements, so this partition needs ``H * W == dim``.

Every partition maps ``z: (B, C, H, W)`` to ``parts: (B, L, P, d)``: ``L`` slots per image,
``P`` sub-vectors per slot, ``d`` elements each. Flattening ``parts`` to ``(-1, d)`` gives the
released code's row order exactly (so indices line up with it). ``L = H * W`` for ``group`` and
``custom`` (slot ``l = h * W + w``) and ``L = C`` for ``layer`` (slot ``l`` = channel ``l``);
because ``layer`` needs ``C == H * W``, indices of every partition reshape to ``(B, H, W, P)``.

The released classes were ``nn.Module``\\ s that remembered the last input's shape between
``partition`` and ``unpartition``; these keep no state: ``unpartition`` takes the shape.
"""

from __future__ import annotations

import torch

PARTITIONS = ("group", "custom", "layer")


class Partition:
    """Base of the partitions: ``partitions`` sub-vectors per latent vector (see module docs)."""

    name = ""

    def __init__(self, partitions: int):
        if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
            raise ValueError(f"partitions must be a positive int, got {partitions!r}")
        self.partitions = partitions

    def __repr__(self) -> str:
        return f"{type(self).__name__}(partitions={self.partitions})"

    def check(self, shape: tuple[int, ...] | torch.Size, sub_dim: int | None = None) -> int:
        """Validate a latent shape ``(B, C, H, W)``; return the sub-vector length ``d``.

        With ``sub_dim`` given (the codebook's sub-vector length), also require ``d == sub_dim``.
        Raises ValueError naming what does not divide.
        """
        if len(shape) != 4:
            raise ValueError(f"z must be (B, C, H, W), got shape {tuple(shape)}")
        length = self._sub_dim(tuple(shape))
        if sub_dim is not None and length != sub_dim:
            raise ValueError(self._mismatch_message(tuple(shape), sub_dim))
        return length

    def slots(self, shape: tuple[int, ...] | torch.Size) -> int:
        """``L``: slots per image for a latent shape ``(B, C, H, W)`` (``H * W`` or ``C``)."""
        return shape[2] * shape[3]

    def partition(self, z: torch.Tensor) -> torch.Tensor:
        """``z: (B, C, H, W)`` -> ``parts: (B, L, P, d)`` (a view where the layout allows)."""
        raise NotImplementedError

    def unpartition(self, parts: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """Inverse of :meth:`partition`: ``parts: (B, L, P, d)`` -> ``(B, C, H, W)`` of ``shape``.

        The result may be a non-contiguous view of ``parts``.
        """
        raise NotImplementedError

    def _sub_dim(self, shape: tuple[int, ...]) -> int:
        channels = shape[1]
        if channels % self.partitions:
            raise ValueError(
                f"{self.name} partition: channels C={channels} must be divisible by "
                f"partitions={self.partitions}"
            )
        return channels // self.partitions

    def _mismatch_message(self, shape: tuple[int, ...], sub_dim: int) -> str:
        return (
            f"{self.name} partition: z has C={shape[1]} channels, expected "
            f"dim={sub_dim * self.partitions} (partitions={self.partitions} x {sub_dim})"
        )


class GroupPartition(Partition):
    """``P`` contiguous channel chunks of each latent vector (the released default)."""

    name = "group"

    def partition(self, z: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = z.shape
        length = self.check(z.shape)
        # (B, H, W, C) split into (P, d): channel p * d + i is element i of sub-vector p.
        return z.permute(0, 2, 3, 1).reshape(batch, height * width, self.partitions, length)

    def unpartition(self, parts: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        batch, channels, height, width = shape
        return parts.reshape(batch, height, width, channels).permute(0, 3, 1, 2)


class CustomPartition(Partition):
    """The released interleaved split: even channels then odd channels, cut into ``P`` chunks."""

    name = "custom"

    def _sub_dim(self, shape: tuple[int, ...]) -> int:
        if shape[1] % 2:
            raise ValueError(f"custom partition: channels C={shape[1]} must be even")
        return super()._sub_dim(shape)

    def partition(self, z: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = z.shape
        length = self.check(z.shape)
        # Channel 2j + parity -> (parity, j); the order (parity, j) is then cut into P chunks.
        paired = z.reshape(batch, channels // 2, 2, height, width)
        return paired.permute(0, 3, 4, 2, 1).reshape(batch, height * width, self.partitions, length)

    def unpartition(self, parts: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        batch, channels, height, width = shape
        paired = parts.reshape(batch, height, width, 2, channels // 2)
        return paired.permute(0, 4, 3, 1, 2).reshape(batch, channels, height, width)


class LayerPartition(Partition):
    """``P`` contiguous chunks of each channel's flattened ``H x W`` map; needs ``H * W == dim``."""

    name = "layer"

    def slots(self, shape: tuple[int, ...] | torch.Size) -> int:
        return shape[1]

    def _sub_dim(self, shape: tuple[int, ...]) -> int:
        pixels = shape[2] * shape[3]
        if pixels % self.partitions:
            raise ValueError(
                f"layer partition: H*W={shape[2]}*{shape[3]}={pixels} must be divisible by "
                f"partitions={self.partitions}"
            )
        return pixels // self.partitions

    def check(self, shape: tuple[int, ...] | torch.Size, sub_dim: int | None = None) -> int:
        length = super().check(shape, sub_dim)
        if shape[1] != shape[2] * shape[3]:
            # Indices are (B, L, P) with L = C slots; (B, H, W, P) needs C == H * W.
            raise ValueError(
                f"layer partition needs H*W == C (channels), got H*W={shape[2] * shape[3]} "
                f"and C={shape[1]}"
            )
        return length

    def _mismatch_message(self, shape: tuple[int, ...], sub_dim: int) -> str:
        return (
            f"layer partition: sub-vectors of H*W/partitions={shape[2]}*{shape[3]}/"
            f"{self.partitions} elements must match the codebook's dim/partitions={sub_dim}; "
            f"it needs H*W == dim={sub_dim * self.partitions}"
        )

    def partition(self, z: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = z.shape
        length = self.check(z.shape)
        return z.reshape(batch, channels, self.partitions, length)

    def unpartition(self, parts: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        return parts.reshape(shape)


_PARTITION_CLASSES = {cls.name: cls for cls in (GroupPartition, CustomPartition, LayerPartition)}


def make_partition(name: str, partitions: int) -> Partition:
    """The partition called ``name`` (one of ``"group"``, ``"custom"``, ``"layer"``)."""
    if name not in _PARTITION_CLASSES:
        raise ValueError(f"partition must be one of {PARTITIONS}, got {name!r}")
    return _PARTITION_CLASSES[name](partitions)


__all__ = [
    "PARTITIONS",
    "CustomPartition",
    "GroupPartition",
    "LayerPartition",
    "Partition",
    "make_partition",
]
