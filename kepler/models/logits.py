"""What a draw does to one step's logits ``(B, K)`` before sampling: the temperature and the top-k /
top-p support (:func:`filter_logits`, the arguments checked by :func:`check_sampling`), as
:meth:`kepler.models.CodeTransformer.generate` applies them."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# choose(logits (B, K) float32 (float64 model: float64), token index in raster order) -> (B,) int64 codes
ChooseFn = Callable[[torch.Tensor, int], torch.Tensor]


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, codebook_size: int) -> None:
    """ValueError naming the argument unless ``temperature`` is a finite number > 0, ``top_k`` None or
    an int >= 1 and ``top_p`` None or in (0, 1]."""
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
            or not (math.isfinite(temperature) and temperature > 0)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 (at most K={codebook_size} matters), got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """``logits: (B, K)`` with every code outside the sampling support set to ``-inf``.

    top_k: keep the ``top_k`` largest logits (ties at the boundary all kept). top_p: keep the
    smallest set of most likely codes whose probability reaches ``top_p`` (nucleus sampling; the most
    likely code is always kept). Both: the intersection. None: no restriction."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        # A code is dropped when the codes more likely than it already reach top_p.
        dropped = (probs.cumsum(dim=-1) - probs) >= top_p
        logits = logits.masked_fill(dropped.scatter(-1, order, dropped), float("-inf"))
    return logits
