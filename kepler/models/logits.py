"""What a draw does to one step's logits ``(B, K)`` before sampling: classifier-free guidance
(:func:`guide`, at the scale :func:`guidance_scale` gives each sub-code), then the temperature and the
top-k / top-p support (:func:`filter_logits`). :meth:`kepler.models.CodeTransformer.generate` applies
them in that order, as LlamaGen's sampler does."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

CFG_SCHEDULES = ("constant", "linear")

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


def check_guidance(cfg_scale: float, cfg_schedule: str) -> None:
    """ValueError naming the argument unless ``cfg_scale`` is a finite number >= 0 and ``cfg_schedule``
    one of :data:`CFG_SCHEDULES`."""
    if (isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float))
            or not (math.isfinite(cfg_scale) and cfg_scale >= 0)):
        raise ValueError(f"cfg_scale must be a finite number >= 0, got {cfg_scale!r}")
    if cfg_schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg_schedule must be one of {', '.join(map(repr, CFG_SCHEDULES))}, got {cfg_schedule!r}")


def guidance_scale(cfg_scale: float, cfg_schedule: str, token: int, length: int) -> float:
    """The guidance scale of sub-code ``token`` of ``length`` (raster order, from 0): ``cfg_scale``
    throughout (``"constant"``), or rising linearly to it, ``1 + (cfg_scale - 1) * (token + 1) / length``
    (``"linear"``: nearly conditional at the first sub-code, ``cfg_scale`` at the last)."""
    if cfg_schedule == "constant":
        return cfg_scale
    return 1 + (cfg_scale - 1) * (token + 1) / length


def guide(conditional: torch.Tensor, unconditional: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance of logits ``(B, K)``: ``unconditional + scale * (conditional -
    unconditional)``, computed as ``torch.lerp``, which is exact at both ends: scale 1 gives the
    conditional logits and 0 the unconditional ones bit for bit (the plain formula rounds them)."""
    return torch.lerp(unconditional, conditional, scale)


def guided(choose: ChooseFn, cfg_scale: float, cfg_schedule: str, length: int) -> ChooseFn:
    """``choose`` under guidance, for sequences of ``length`` sub-codes: takes the logits of the
    conditional rows stacked over those of their null-class twins ``(2B, K)`` and returns ``(2B,)``
    codes, the ones ``choose`` picked from the guided logits, for both twins."""

    def choose_guided(logits: torch.Tensor, token: int) -> torch.Tensor:
        conditional, unconditional = logits.chunk(2)
        scale = guidance_scale(cfg_scale, cfg_schedule, token, length)
        return choose(guide(conditional, unconditional, scale), token).repeat(2)

    return choose_guided


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
