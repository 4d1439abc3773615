"""The quantizer protocol: all that ``VQModel``, the trainer, evaluation and the study use of a quantizer.

A quantizer replaces a latent map ``z: (B, C, H, W)`` by codewords, and names each latent position by
``P`` code indices ("tokens"), each in ``[0, K)``. Every quantizer subclasses :class:`Quantizer` and
registers itself under the name that YAML configs give as ``model.quantizer.type``
(:func:`register_quantizer`); :func:`build_quantizer` makes one from such a config section, whose
keys are the constructor's keyword arguments (the config schema is read off the signature).

What a quantizer provides:

* ``forward(z) -> QuantizerOutput(z_q, loss, QuantizerInfo(perplexity, None, indices, utilization))``,
  taming's order; ``indices`` is ``(B, H, W, P)`` int64 and ``z_q`` carries the straight-through
  gradient to ``z`` (:func:`straight_through`). A forward calls :meth:`Quantizer.count_codes` once
  with its indices.
* ``indices_to_latents(indices (B, H, W, P)) -> (B, C, H, W)``: exactly the forward's ``z_q`` for the
  indices it returned (the one exception: a residual quantizer's training forward with quantize
  dropout, whose samples keep a prefix of the stages); ``get_codebook_entry(indices, shape)`` is
  taming's spelling of it.
* ``dim`` (``C``), ``codebook_size`` (``K``), ``tokens_per_position`` (``P``) and ``shared_codebook``
  (True: the ``P`` tokens of a position index one codebook of ``K`` entries; False: token ``p``
  indexes codebook ``p``, ``P * K`` entries in all).
* ``code_counts``: a ``(P, K)`` int64 buffer, how often token ``p`` took code ``k`` since construction
  or :meth:`Quantizer.reset_usage`, summed over ranks; :meth:`Quantizer.codebook_utilization` and
  :meth:`Quantizer.usage_perplexity` are read off it.
* ``codewords()`` and ``sub_vectors(z)``, for the packing report: the codebook as ``(G, K, d)``
  and the vectors the quantizer matches against it as ``(G, N, d)``, or None for a quantizer whose
  codebook is implicit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from kepler.distributed import all_reduce_sum

DEFAULT_TYPE = "kepler"
QUANTIZERS: dict[str, type[Quantizer]] = {}
# The largest codebook a token may index, and the largest (P, K) code-count table: a config that
# asks for more (FSQ levels [1024] * 3, LFQ 2**32 codes) is refused before anything is allocated.
MAX_CODES = 2**20
MAX_COUNTED = 2**24


class QuantizerInfo(NamedTuple):
    """The third element of a quantizer's output, in taming's order.

    perplexity: exp(entropy) of this batch's code distribution, float32: 0-d with a shared codebook
        (one distribution over all tokens), ``(P,)`` with one codebook per token. Counted over all
        ranks under ``torch.distributed``.
    min_encodings: always None (taming's one-hot matrix would be ``(rows, K)``).
    indices: ``(B, H, W, P)`` int64, the code of each token.
    utilization: 0-d float32, the fraction of codebook entries used at least once since
        construction or the last :meth:`Quantizer.reset_usage`.
    """

    perplexity: torch.Tensor
    min_encodings: None
    indices: torch.Tensor
    utilization: torch.Tensor


class QuantizerOutput(NamedTuple):
    """``z_q, loss, (perplexity, min_encodings, indices, utilization) = quantizer(z)``.

    z_q: ``(B, C, H, W)``, the input's dtype: the codewords, with the straight-through gradient to ``z``.
    loss: 0-d float, the quantizer's own loss (0 for a quantizer without one).
    info: :class:`QuantizerInfo`; its fields are also reachable directly (``out.indices``).
    """

    z_q: torch.Tensor
    loss: torch.Tensor
    info: QuantizerInfo

    @property
    def perplexity(self) -> torch.Tensor:
        return self.info.perplexity

    @property
    def indices(self) -> torch.Tensor:
        return self.info.indices

    @property
    def utilization(self) -> torch.Tensor:
        return self.info.utilization


class _StraightThrough(torch.autograd.Function):
    """Forward ``z_q`` exactly (contiguous), backward the gradient unchanged to ``z``."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
        return z_q.contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def straight_through(z: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """The codewords ``z_q`` exactly (detached, in ``z``'s dtype), with the gradient passed unchanged
    to ``z``. ``z + (z_q - z).detach()`` (taming's form) rounds, so its value is not exactly the
    codewords and decoding the indices would not reproduce it; this costs no extra elementwise pass."""
    return _StraightThrough.apply(z, z_q.detach().to(z.dtype))


class Quantizer(nn.Module):
    """Base of every quantizer: the protocol's attributes and its code statistics.

    Args:
        dim: latent channels ``C``.
        codebook_size: codes per token, ``K``.
        tokens_per_position: code indices per latent position, ``P``.
        shared_codebook: whether the ``P`` tokens index one codebook (see the module docstring).

    Subclasses implement :meth:`forward` (calling :meth:`count_codes`) and :meth:`_indices_to_latents`,
    and may implement :meth:`codewords` and :meth:`sub_vectors`; they call this constructor before
    they allocate anything, so that a codebook over :data:`MAX_CODES` codes is refused first.
    """

    type_name: ClassVar[str]

    def __init__(self, *, dim: int, codebook_size: int, tokens_per_position: int, shared_codebook: bool):
        super().__init__()
        if codebook_size > MAX_CODES:
            raise ValueError(f"{type(self).__name__} would have {codebook_size} codes per token; at most "
                             f"{MAX_CODES} (2**20) are supported")
        if tokens_per_position * codebook_size > MAX_COUNTED:
            raise ValueError(f"{type(self).__name__} would count {tokens_per_position} tokens x {codebook_size} codes; "
                             f"at most {MAX_COUNTED} (2**24) entries are supported")
        self.dim = dim
        self.codebook_size = codebook_size
        self.tokens_per_position = tokens_per_position
        self.shared_codebook = shared_codebook
        self.register_buffer("code_counts", torch.zeros(tokens_per_position, codebook_size, dtype=torch.int64))
        # The values of the quantizer's regularizers in its last forward (detached 0-d tensors, by the
        # names of loss_term_names()), which training logs and validation report.
        self.loss_terms: dict[str, torch.Tensor] = {}

    def loss_term_names(self) -> tuple[str, ...]:
        """The names of the regularizer values a forward leaves in :attr:`loss_terms` (none here)."""
        return ()

    def check_latent(self, z: torch.Tensor) -> None:
        """TypeError/ValueError unless ``z`` is a ``(B, C, H, W)`` float tensor with ``C == dim``."""
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
        if z.dim() != 4:
            raise ValueError(f"z must be (B, C, H, W), got shape {tuple(z.shape)}")
        if not z.is_floating_point():
            raise TypeError(f"z must be a floating point tensor, got {z.dtype}")
        if z.shape[1] != self.dim:
            raise ValueError(f"z has C={z.shape[1]} channels but the quantizer has dim={self.dim}")

    @property
    def codebook_entries(self) -> int:
        """Entries the utilization is a fraction of: ``K`` shared, ``P * K`` one codebook per token."""
        return self.codebook_size * (1 if self.shared_codebook else self.tokens_per_position)

    # ------------------------------------------------------------------------------ statistics

    @torch.no_grad()
    def token_counts(self, indices: torch.Tensor) -> torch.Tensor:
        """``(P, K)`` int64: how often token ``p`` took code ``k`` in ``indices: (..., P)`` (this
        rank's alone)."""
        tokens = self.tokens_per_position
        offsets = torch.arange(tokens, device=indices.device) * self.codebook_size
        flat = (indices.reshape(-1, tokens) + offsets).reshape(-1)
        counts = torch.zeros(tokens * self.codebook_size, dtype=torch.int64, device=indices.device)
        counts.index_add_(0, flat, torch.ones_like(flat))
        return counts.view(tokens, self.codebook_size)

    @torch.no_grad()
    def count_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Add a batch's ``indices: (..., P)`` to :attr:`code_counts` (summed over ranks first);
        returns the batch's own ``(P, K)`` counts."""
        batch_counts = self.token_counts(indices)
        all_reduce_sum(batch_counts)
        self.code_counts.add_(batch_counts)
        return batch_counts

    def perplexity_of(self, counts: torch.Tensor) -> torch.Tensor:
        """exp(entropy) of ``counts: (P, K)``: 0-d pooled over tokens when shared, ``(P,)`` otherwise."""
        grouped = counts.sum(dim=0, keepdim=True) if self.shared_codebook else counts
        grouped = grouped.to(torch.float32)
        probs = grouped / grouped.sum(dim=-1, keepdim=True).clamp_min(1.0)
        perplexity = torch.exp(-torch.xlogy(probs, probs).sum(dim=-1))
        return perplexity[0] if self.shared_codebook else perplexity

    @torch.no_grad()
    def codebook_utilization(self) -> torch.Tensor:
        """0-d float32: fraction of the codebook entries used since :meth:`reset_usage`."""
        counts = self.code_counts.sum(dim=0) if self.shared_codebook else self.code_counts
        return (counts > 0).to(torch.float32).mean()

    @torch.no_grad()
    def usage_perplexity(self) -> torch.Tensor:
        """exp(entropy) of the code usage since :meth:`reset_usage` (0-d shared, ``(P,)`` not)."""
        return self.perplexity_of(self.code_counts)

    @torch.no_grad()
    def reset_usage(self) -> None:
        """Zero :attr:`code_counts`."""
        self.code_counts.zero_()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Counts are never negative; a file holding negative ones was damaged or edited, and would
        # report a utilization and perplexity that mean nothing.
        counts = state_dict.get(prefix + "code_counts")
        if isinstance(counts, torch.Tensor) and counts.numel() and not counts.is_meta and int(counts.min()) < 0:
            raise ValueError(f"{prefix}code_counts holds negative counts (down to {int(counts.min())}): the "
                             "weights were damaged or edited")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------------------ decoding

    def indices_to_latents(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices ``(B, H, W, P)`` (int32/int64 in ``[0, K)``) -> latents ``(B, C, H, W)``,
        contiguous: exactly the forward's ``z_q`` for the indices it returned."""
        check_index_type(indices)
        if indices.dim() != 4 or indices.shape[-1] != self.tokens_per_position:
            raise ValueError(
                f"indices must be (B, H, W, P={self.tokens_per_position}), got shape {tuple(indices.shape)}"
            )
        self.check_code_range(indices)
        # Contiguous as the forward's z_q is: a decoder's convolutions round differently on other strides.
        return self._indices_to_latents(indices.to(torch.int64)).contiguous()

    def check_code_range(self, indices: torch.Tensor) -> None:
        """ValueError unless every index is in ``[0, K)``."""
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.codebook_size):
            raise ValueError(
                f"indices must be in [0, {self.codebook_size}), got [{int(indices.min())}, {int(indices.max())}]"
            )

    def _indices_to_latents(self, indices: torch.Tensor) -> torch.Tensor:
        """Checked int64 ``(B, H, W, P)`` indices -> ``(B, C, H, W)``."""
        raise NotImplementedError

    def get_codebook_entry(
        self, indices: torch.Tensor, shape: tuple[int, int, int, int] | None = None
    ) -> torch.Tensor:
        """taming's decoding call: :meth:`indices_to_latents` of ``indices``, given as ``(B, H, W, P)`` or
        flat ``(B*H*W*P,)`` in that order; ``shape`` is ``(B, H, W, C)``, needed for flat indices and
        checked against 4-D ones."""
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
        if shape is None:
            if indices.dim() != 4:
                raise ValueError("get_codebook_entry needs shape=(B, H, W, C) to place flat indices")
            return self.indices_to_latents(indices)
        if len(shape) != 4 or shape[3] != self.dim:
            raise ValueError(f"shape must be (B, H, W, C={self.dim}), got {tuple(shape)}")
        batch, height, width, _ = shape
        expected = (batch, height, width, self.tokens_per_position)
        if indices.dim() == 4 and tuple(indices.shape) != expected:
            raise ValueError(f"shape {tuple(shape)} does not match indices {tuple(indices.shape)}")
        if indices.numel() != batch * height * width * self.tokens_per_position:
            raise ValueError(
                f"indices has {indices.numel()} entries; shape {tuple(shape)} with "
                f"P={self.tokens_per_position} tokens per position needs {batch * height * width * self.tokens_per_position}"
            )
        return self.indices_to_latents(indices.reshape(expected))

    # ------------------------------------------------------------------------------ geometry

    def codewords(self) -> torch.Tensor | None:
        """The codebook as ``(G, K, d)`` (``G`` = 1 shared, else one codebook per token), or None."""
        return None

    def sub_vectors(self, z: torch.Tensor) -> torch.Tensor | None:
        """The vectors of ``z: (B, C, H, W)`` matched against :meth:`codewords`: ``(G, N, d)``, or None."""
        return None


def check_index_type(indices) -> None:
    """TypeError unless ``indices`` is an int32 or int64 tensor."""
    if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int32, torch.int64):
        raise TypeError("indices must be an int32 or int64 torch.Tensor")


def check_first_batch_finite(rows: torch.Tensor, what: str, consequence: str) -> None:
    """Refuse a first training batch that holds NaN or inf, before a data-dependent initialization
    (``what``, e.g. ``"codebook initialization (kmeans)"``) keeps it for good (``consequence``, the
    message's end). The count is summed
    over ranks, so that every rank refuses together (none is left waiting in a collective)."""
    non_finite = all_reduce_sum((~torch.isfinite(rows)).sum().to(torch.int64))
    if torch.compiler.is_compiling():
        # A traced graph cannot branch on the count; it asserts instead (no count in the message).
        torch._assert_async(non_finite == 0, f"{what}: the first batch has NaN or inf values")
    elif non_finite:
        values = int(all_reduce_sum(torch.tensor(rows.numel(), dtype=torch.int64, device=rows.device)))
        raise ValueError(
            f"{what}: {int(non_finite)} of the first batch's {values} values are not finite (NaN or inf); {consequence}"
        )


def check_number(name: str, value, *, minimum: float = 0.0, strict: bool = False) -> float:
    """``value`` as a float if it is a finite number ``>= minimum`` (``> minimum`` if ``strict``);
    TypeError/ValueError naming the argument otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    # nan passes every comparison below (and would switch features off); inf makes losses inf.
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if (value <= minimum) if strict else (value < minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value}")
    return float(value)


def check_int(name: str, value, minimum: int) -> int:
    """``value`` if it is an int ``>= minimum``; TypeError/ValueError naming the argument otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    """``value`` if it is a bool; TypeError naming the argument otherwise."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_backend(value) -> str | None:
    """A quantizer's ``backend`` argument: a str (checked when an op runs) or None."""
    if value is not None and not isinstance(value, str):
        raise TypeError(f"backend must be a str or None, got {type(value).__name__}")
    return value


def register_quantizer(name: str):
    """Class decorator: ``@register_quantizer("kepler")`` makes the class ``model.quantizer.type: kepler``."""

    def register(cls: type[Quantizer]) -> type[Quantizer]:
        if not (isinstance(cls, type) and issubclass(cls, Quantizer)):
            raise TypeError(f"register_quantizer({name!r}) takes a Quantizer subclass, got {cls!r}")
        known = QUANTIZERS.get(name)
        if known is not None and known is not cls:
            raise ValueError(f"quantizer type {name!r} is already registered to {known.__qualname__}")
        cls.type_name = name
        QUANTIZERS[name] = cls
        return cls

    return register


def quantizer_class(name: str) -> type[Quantizer]:
    """The quantizer class registered as ``name``; ValueError naming the known types otherwise."""
    if name not in QUANTIZERS:
        raise ValueError(f"unknown quantizer type {name!r}; known types: {', '.join(sorted(QUANTIZERS))}")
    return QUANTIZERS[name]


def build_quantizer(config: Mapping[str, Any] | None, dim: int) -> Quantizer:
    """A quantizer from a config section: ``type`` (default ``"kepler"``) and its constructor's keyword
    arguments; ``dim`` is the latent width."""
    options = dict(config or {})
    return quantizer_class(options.pop("type", DEFAULT_TYPE))(dim=dim, **options)
