"""How a tokenizer's index map becomes the sequence a code prior models, and back.

A quantizer of the protocol (:mod:`kepler.nn.protocol`) names each of the ``H x W`` latent positions
by ``P`` sub-codes, each in ``[0, K)``: an index map ``(B, H, W, P)`` int64. :class:`CodeLayout`
holds ``H, W, P, K`` and whether the ``P`` sub-codes share one codebook, read off any protocol
quantizer by :meth:`CodeLayout.from_quantizer`, and maps index maps to the two sequence orders of
:class:`kepler.models.CodeTransformer`:

* ``flat``: raster order over positions (row by row, left to right), the ``P`` sub-codes of a
  position consecutive: ``(B, H*W*P)`` tokens. With a shared codebook a token is the code ``k``
  itself (vocabulary ``K``); with one codebook per sub-code, sub-code ``p``'s code ``k`` is token
  ``p*K + k`` (vocabulary ``P*K``), so the same ``k`` of two codebooks are different tokens.
* ``factorized``: the same raster order over positions only, ``(B, H*W, P)``: a position is one
  step of the sequence and its ``P`` sub-codes are tokens ``p*K + k`` in ``[0, P*K)`` whatever the
  codebook sharing, because the prior sums their embeddings and a sum forgets the order of its
  terms (``(a, b)`` and ``(b, a)`` would be one input otherwise).

Both maps are exact inverses on valid index maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kepler.nn.protocol import Quantizer

ORDERS = ("flat", "factorized")


def _value_range(tokens: torch.Tensor) -> tuple[int, int]:
    """(min, max) of a non-empty integer tensor, read to the host in one transfer (one GPU sync)."""
    low, high = torch.aminmax(tokens)
    return tuple(torch.stack((low, high)).tolist())


@dataclass(frozen=True)
class CodeLayout:
    """Shape of a tokenizer's index maps: ``(H, W, P)`` sub-codes in ``[0, K)``.

    Args:
        height, width: latent positions per map, ``H x W``.
        tokens_per_position: sub-codes per position, ``P``.
        codebook_size: codes per sub-code, ``K``.
        shared_codebook: True: the ``P`` sub-codes index one codebook; False: sub-code ``p``
            indexes codebook ``p`` (see the module docstring for what this changes).
    """

    height: int
    width: int
    tokens_per_position: int
    codebook_size: int
    shared_codebook: bool

    def __post_init__(self):
        for name in ("height", "width", "tokens_per_position", "codebook_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CodeLayout.{name} must be an int >= 1, got {value!r}")

    @classmethod
    def from_quantizer(cls, quantizer: Quantizer, latent_hw: Sequence[int]) -> CodeLayout:
        """The layout of ``quantizer``'s index maps over a ``latent_hw = (H, W)`` latent map (a
        tokenizer's image size divided by its downsampling factor)."""
        if not isinstance(quantizer, Quantizer):
            raise TypeError(f"quantizer must be a kepler.nn.Quantizer, got {type(quantizer).__name__}")
        if len(latent_hw) != 2:
            raise ValueError(f"latent_hw must be (H, W), got {tuple(latent_hw)}")
        return cls(
            height=int(latent_hw[0]),
            width=int(latent_hw[1]),
            tokens_per_position=quantizer.tokens_per_position,
            codebook_size=quantizer.codebook_size,
            shared_codebook=quantizer.shared_codebook,
        )

    @property
    def positions(self) -> int:
        """``H * W``: the factorized sequence length."""
        return self.height * self.width

    @property
    def flat_length(self) -> int:
        """``H * W * P``: the flat sequence length."""
        return self.positions * self.tokens_per_position

    @property
    def flat_vocab_size(self) -> int:
        """Distinct flat tokens: ``K`` with a shared codebook, ``P * K`` otherwise."""
        return self.codebook_size * (1 if self.shared_codebook else self.tokens_per_position)

    @property
    def position_vocab_size(self) -> int:
        """Distinct factorized sub-code tokens: always ``P * K``."""
        return self.codebook_size * self.tokens_per_position

    # ------------------------------------------------------------------------------ checks

    def check_indices(self, indices: torch.Tensor, name: str = "indices") -> None:
        """ValueError/TypeError naming ``name`` unless it is an int64/int32 ``(B, H, W, P)`` index map
        of this layout with codes in ``[0, K)``. The value check is skipped while ``torch.compile``
        traces (it would need the values on the host)."""
        if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be an int32 or int64 torch.Tensor")
        expected = (self.height, self.width, self.tokens_per_position)
        if indices.dim() != 4 or tuple(indices.shape[1:]) != expected:
            raise ValueError(f"{name} must be (B, H, W, P) = (B, {', '.join(map(str, expected))}), "
                             f"got shape {tuple(indices.shape)}")
        if torch.compiler.is_compiling() or not indices.numel():
            return
        low, high = _value_range(indices)
        if low < 0 or high >= self.codebook_size:
            raise ValueError(f"{name} must hold codes in [0, {self.codebook_size}), got [{low}, {high}]")

    # ------------------------------------------------------------------------------ maps

    def partition_offsets(self, device: torch.device | None = None) -> torch.Tensor:
        """``(P,)`` int64 ``p * K``: added to sub-code ``p``'s code it makes a ``P * K`` token."""
        return torch.arange(self.tokens_per_position, device=device) * self.codebook_size

    def token_offsets(self, order: str, device: torch.device | None = None) -> torch.Tensor:
        """``(P,)`` int64 added to the codes of a position to make its tokens in ``order``: zeros for
        ``flat`` with a shared codebook, :meth:`partition_offsets` otherwise."""
        if order not in ORDERS:
            raise ValueError(f"order must be one of {', '.join(map(repr, ORDERS))}, got {order!r}")
        if order == "flat" and self.shared_codebook:
            return torch.zeros(self.tokens_per_position, dtype=torch.int64, device=device)
        return self.partition_offsets(device)
