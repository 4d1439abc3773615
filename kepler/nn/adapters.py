"""Baselines from vector-quantize-pytorch behind kepler's quantizer protocol: ``type: fsq`` and ``type: lfq``.

The library's modules do the quantization (adapted, not re-implemented); the adapters give them the
protocol's layout: ``(B, H, W, P)`` int64 indices with ``P`` = the library's ``num_codebooks``, the
code counts, perplexity and utilization, ``indices_to_latents`` through the library's
``indices_to_codes``, and a forward whose ``z_q`` is exactly that decoding (the library's own output,
with its straight-through gradient, carries the gradient).

* :class:`FSQQuantizer` (Mentzer et al. 2023, finite scalar quantization): each of ``P`` groups of
  ``len(levels)`` channels is bounded and rounded to a grid of ``prod(levels)`` codes; no loss.
* :class:`LFQQuantizer` (Yu et al. 2023, lookup-free quantization): each of ``P`` groups of
  ``log2(codebook_size)`` channels becomes its signs; the loss is the library's entropy (and
  optional commitment) loss.

Where ``dim`` differs from what the codes need (``P * len(levels)``, ``P * log2(codebook_size)``), the
library adds linear projections in and out, trained with the model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from kepler.losses import code_entropy
from kepler.nn.protocol import (
    Quantizer,
    QuantizerInfo,
    QuantizerOutput,
    check_backend,
    check_int,
    check_number,
    register_quantizer,
    straight_through,
)


def _library_module(factory) -> nn.Module:
    """``factory()``, built on the CPU and moved when the default device is ``meta`` (how checkpoints
    are checked before loading): FSQ computes its codebook size with ``.item()``, which meta tensors
    cannot do."""
    device = torch.get_default_device()
    if device.type != "meta":
        return factory()
    with torch.device("cpu"):
        module = factory()
    return module.to(device)


class _LibraryQuantizer(Quantizer):
    """The protocol around a library module ``self.library`` built with ``channel_first=True`` and
    ``keep_num_codebooks_dim=True``: its forward gives ``(B, C, H, W)`` codes and ``(B, H, W, P)``
    indices, its ``indices_to_codes`` inverts them."""

    library: nn.Module

    def _library_forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``z`` -> the library's ``(codes, indices, loss)``."""
        raise NotImplementedError

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize ``z: (B, C, H, W)``; returns :class:`~kepler.nn.QuantizerOutput` (``z_q`` in ``z``'s dtype)."""
        self.check_latent(z)
        codes, indices, loss = self._library_forward(z)
        index_map = indices.to(torch.int64)
        with torch.no_grad():
            decoded = self._decode(index_map)
        z_q = straight_through(codes, decoded).to(z.dtype)
        batch_counts = self.count_codes(index_map)
        info = QuantizerInfo(self.perplexity_of(batch_counts), None, index_map, self.codebook_utilization())
        return QuantizerOutput(z_q, loss.reshape(()).to(torch.float32), info)

    def _decode(self, indices: torch.Tensor) -> torch.Tensor:
        return self.library.indices_to_codes(indices)

    def _indices_to_latents(self, indices: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, P)`` int64 -> ``(B, C, H, W)`` through the library's ``indices_to_codes``."""
        return self._decode(indices)


@register_quantizer("fsq")
class FSQQuantizer(_LibraryQuantizer):
    """vector-quantize-pytorch's ``FSQ`` as a kepler quantizer.

    Args:
        dim: latent channels ``C``.
        levels: quantization levels (>= 3) per channel of a group; ``K = prod(levels)`` codes per token.
        num_codebooks: groups (tokens) per latent position, ``P``.

    The loss is 0 (FSQ has none); the codebooks are implicit (:meth:`codewords` is None).
    """

    def __init__(self, dim: int = 256, levels: Sequence[int] = (8, 5, 5, 5), num_codebooks: int = 1):
        from vector_quantize_pytorch import FSQ

        dim = check_int("dim", dim, 1)
        # A level of 2 the library takes only with its preserve_symmetry option (it asserts otherwise).
        if not isinstance(levels, Sequence) or not levels or not all(
            isinstance(level, int) and not isinstance(level, bool) and level >= 3 for level in levels
        ):
            raise ValueError(f"levels must be a non-empty list of ints >= 3, got {levels!r}")
        levels = list(levels)
        num_codebooks = check_int("num_codebooks", num_codebooks, 1)
        super().__init__(dim=dim, codebook_size=math.prod(levels), tokens_per_position=num_codebooks,
                         shared_codebook=True)
        self.levels = levels
        self.library = _library_module(
            lambda: FSQ(levels=levels, dim=dim, num_codebooks=num_codebooks, channel_first=True,
                        keep_num_codebooks_dim=True)
        )

    def _library_forward(self, z):
        codes, indices = self.library(z)
        return codes, indices, z.new_zeros((), dtype=torch.float32)


@register_quantizer("lfq")
class LFQQuantizer(_LibraryQuantizer):
    """vector-quantize-pytorch's ``LFQ`` as a kepler quantizer.

    Args:
        dim: latent channels ``C``.
        codebook_size: codes per token ``K``, a power of two (``log2 K`` sign bits per group).
        num_codebooks: groups (tokens) per latent position, ``P``.
        entropy_loss_weight, commitment_loss_weight, diversity_gamma: the library's loss weights
            (per-sample entropy minus ``diversity_gamma`` times batch entropy; commitment).
        frac_per_sample_entropy: the fraction of positions (in ``(0, 1]``) the library draws each
            step to estimate both entropies. The entropy compares every position with all ``K``
            codes, so its cost grows with ``K``; a fraction ``1/16`` makes ``K = 65536`` cost what
            ``K = 4096`` costs with every position. ``entropy="kepler"`` takes 1 only.
        entropy: ``"library"`` (vector-quantize-pytorch's entropy loss: an N x K probability
            matrix, forward and backward) or ``"kepler"``: the same loss, exactly, from
            :func:`kepler.losses.code_entropy` (never an N x K matrix), on the same pre-quantization
            values, at the library's temperature (``1 / 100``). Under ``torch.distributed`` the
            library averages the batch distribution over ranks; ``"kepler"`` takes each rank's.
        backend: the code-entropy op's backend with ``entropy="kepler"``.

    The loss is the entropy (and commitment) loss in training mode, 0 in eval mode; codebooks are
    implicit.
    """

    # The library's default forward(inv_temperature=100.): logits 2 x.c * 100, which is
    # -||x - c||^2 / T with T = 1 / 100 up to a constant of the row (every sign code has one norm).
    LIBRARY_TEMPERATURE = 0.01

    def __init__(
        self,
        dim: int = 256,
        codebook_size: int = 1024,
        num_codebooks: int = 1,
        entropy_loss_weight: float = 0.1,
        commitment_loss_weight: float = 0.0,
        diversity_gamma: float = 1.0,
        frac_per_sample_entropy: float = 1.0,
        entropy: str = "library",
        backend: str | None = None,
    ):
        from vector_quantize_pytorch import LFQ

        dim = check_int("dim", dim, 1)
        codebook_size = check_int("codebook_size", codebook_size, 2)
        if codebook_size & (codebook_size - 1):
            raise ValueError(f"codebook_size must be a power of two, got {codebook_size}")
        num_codebooks = check_int("num_codebooks", num_codebooks, 1)
        super().__init__(dim=dim, codebook_size=codebook_size, tokens_per_position=num_codebooks,
                         shared_codebook=True)
        weights = {
            "entropy_loss_weight": check_number("entropy_loss_weight", entropy_loss_weight),
            "commitment_loss_weight": check_number("commitment_loss_weight", commitment_loss_weight),
            "diversity_gamma": check_number("diversity_gamma", diversity_gamma),
        }
        frac_per_sample_entropy = check_number("frac_per_sample_entropy", frac_per_sample_entropy, strict=True)
        if frac_per_sample_entropy > 1.0:
            raise ValueError(f"frac_per_sample_entropy must be <= 1.0, got {frac_per_sample_entropy}")
        if entropy not in ("library", "kepler"):
            raise ValueError(f"entropy must be 'library' or 'kepler', got {entropy!r}")
        if entropy == "kepler" and frac_per_sample_entropy != 1.0:
            raise ValueError(f"entropy='kepler' is exact over every position: frac_per_sample_entropy must be 1.0, "
                             f"got {frac_per_sample_entropy}")
        self.entropy = entropy
        self.backend = check_backend(backend)
        self.loss_weights = weights
        self.library = _library_module(
            lambda: LFQ(dim=dim, codebook_size=codebook_size, num_codebooks=num_codebooks, channel_first=True,
                        keep_num_codebooks_dim=True, frac_per_sample_entropy=frac_per_sample_entropy, **weights)
        )

    def loss_term_names(self) -> tuple[str, ...]:
        return ("entropy_per_sample", "entropy_batch") if self.entropy == "kepler" else ()

    def _library_forward(self, z):
        if self.entropy == "library" or not self.training:
            result = self.library(z)
            if self.entropy == "kepler":  # eval mode: the loss is 0 (the library's), the entropies reported
                with torch.no_grad():
                    self._losses(z)
            return result.quantized, result.indices, result.entropy_aux_loss
        # The library quantizes (its projections, signs and straight-through gradient); a mask that
        # selects no position makes its own entropy and commitment losses cost nothing (they come
        # out NaN and are not used). Both are computed here on the same values instead.
        batch, _, height, width = z.shape
        nothing = torch.zeros(batch, height * width, dtype=torch.bool, device=z.device)
        result = self.library(z, mask=nothing)
        return result.quantized, result.indices, self._losses(z)

    def _losses(self, z: torch.Tensor) -> torch.Tensor:
        """The library's training loss, its entropy term from :func:`kepler.losses.code_entropy`."""
        library = self.library
        rows = library.project_in(z.flatten(2).transpose(1, 2))  # (B, H*W, P*bits), as the library's
        rows = rows.reshape(-1, library.num_codebooks, library.codebook_dim).transpose(0, 1)  # (P, N, bits)
        codebook = library.codebook.to(rows.dtype)
        per_sample, batch = code_entropy(rows, codebook, self.LIBRARY_TEMPERATURE, backend=self.backend)
        per_sample, batch = per_sample.mean(), batch.mean()
        self.loss_terms = {"entropy_per_sample": per_sample.detach(), "entropy_batch": batch.detach()}
        loss = self.loss_weights["entropy_loss_weight"] * (per_sample - self.loss_weights["diversity_gamma"] * batch)
        if self.loss_weights["commitment_loss_weight"] > 0:
            signs = torch.where(rows > 0, 1.0, -1.0).to(rows.dtype) * library.codebook_scale
            loss = loss + self.loss_weights["commitment_loss_weight"] * torch.nn.functional.mse_loss(rows, signs)
        return loss
