"""Codebook regularizers: the released Kepler KL with its grid prior, the Gaussian-potential
packing energy, and the code entropy of LFQ / MAGVIT-v2.

The losses are fused ops (see ``kepler/ops/``); this module is their public home, and the home of
the fixed prior the KL pulls quantized latents towards in the released code
(:func:`official_grid_prior`, laid out to a row of any length by :func:`prior_row`).
"""

from __future__ import annotations

import numpy as np
import torch

from kepler.ops.code_entropy import code_entropy
from kepler.ops.kepler_kl import kepler_kl
from kepler.ops.packing_energy import packing_energy

__all__ = ["code_entropy", "kepler_kl", "official_grid_prior", "packing_energy", "prior_row"]

# int64 holds row numbers of a {0,1}^sub_dim grid up to sub_dim = 62 (2**62 rows).
_MAX_GRID_SUB_DIM = 62


def official_grid_prior(num_codes: int, dim: int = 64, sub_dim: int = 16, seed=None) -> torch.Tensor:
    """The released Kepler Codebook prior: ``num_codes`` consecutive points of a binary grid.

    The grid is every point of ``{0, 1}^sub_dim`` in lexicographic order (the order of
    ``np.indices([2] * sub_dim).reshape(sub_dim, -1).T``: row ``r`` is the binary expansion of
    ``r``, most significant bit first), and each row is tiled side by side to ``dim`` columns
    (column ``j`` holds bit ``j % sub_dim``). The prior is ``num_codes`` consecutive rows starting
    at a random row ``start`` drawn uniformly from ``[0, 2**sub_dim - num_codes]``.

    With the defaults (``dim=64, sub_dim=16``) this is the grid of the released
    ``KeplerLoss.create_high_dimensional_grid``; it differs from that code in these documented ways:

    * The start row comes from ``np.random.default_rng(seed).integers(0, 2**sub_dim - num_codes
      + 1)``, a seeded ``numpy.random.Generator``, not from the global ``np.random.randint``. The
      same integer seed therefore gives a different start than ``np.random.seed(seed)`` followed
      by the released code (different generator and stream); ``seed=None`` draws fresh OS entropy,
      like the released code without a seed. A ``numpy.random.Generator`` may be passed as ``seed``
      and is used (and advanced) as is.
    * The released code fixes ``num_points = 2048`` and draws ``start`` from
      ``[0, 2**16 - 2048]`` whatever the codebook size, so for more than 2048 codes near the end
      of the grid it returns fewer rows than asked. Here ``start`` is bounded by ``num_codes``, so
      the result always has exactly ``num_codes`` rows.
    * The released alphabet per coordinate is ``ceil(2048 ** (1 / sub_dim))`` values, which is
      2 for its ``sub_dim = 16`` (and for any ``sub_dim >= 11``). Here the alphabet is always
      ``{0, 1}``, so the grid has ``2**sub_dim`` rows for every ``sub_dim``.
    * ``dim`` need not be a multiple of ``sub_dim``: the tiling is cut to ``dim`` columns (the
      released ``np.tile(..., dim // sub_dim)`` would silently give fewer columns). With
      ``dim < sub_dim`` only the leading bits remain, so consecutive rows can repeat.

    The rows are computed from their row numbers, so the ``2**sub_dim``-row grid is never built.

    Args:
        num_codes: rows wanted, ``1 <= num_codes <= 2**sub_dim``.
        dim: columns, >= 1.
        sub_dim: bits per grid point, ``1 <= sub_dim <= 62``.
        seed: ``None``, an int, or a ``numpy.random.Generator`` (see above).

    Returns:
        (num_codes, dim) float32 tensor of zeros and ones, on the CPU.
    """
    for name, value in (("num_codes", num_codes), ("dim", dim), ("sub_dim", sub_dim)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if not 1 <= sub_dim <= _MAX_GRID_SUB_DIM:
        raise ValueError(f"sub_dim must be in [1, {_MAX_GRID_SUB_DIM}], got {sub_dim}")
    grid_rows = 2**sub_dim
    if not 1 <= num_codes <= grid_rows:
        raise ValueError(
            f"num_codes must be in [1, 2**sub_dim = {grid_rows}] (the {{0,1}}^{sub_dim} grid has "
            f"{grid_rows} points), got {num_codes}"
        )
    rng = np.random.default_rng(seed)
    start = int(rng.integers(0, grid_rows - num_codes + 1))
    row_numbers = torch.arange(start, start + num_codes, dtype=torch.int64)
    # Column j of the tiled grid is bit (sub_dim - 1 - j % sub_dim) of the row number.
    shifts = (sub_dim - 1 - torch.arange(dim, dtype=torch.int64) % sub_dim).unsqueeze(0)
    bits = (row_numbers.unsqueeze(1) >> shifts) & 1
    return bits.to(torch.float32)


def prior_row(prior: torch.Tensor, length: int) -> torch.Tensor:
    """The prior flattened row-major to one row of exactly ``length`` elements.

    The released ``KeplerLoss.forward`` flattens the prior ``(num_codes, dim)`` row-major to
    ``num_codes * dim`` values, standardizes that whole row, and keeps its first ``M`` values
    (``q[:, :M]``), where ``M`` is the number of latent values per image; it breaks when
    ``M > num_codes * dim``. This function does the layout part for any ``M``:

    * ``length <= prior.numel()``: the first ``length`` values of the flattened prior (the
      released crop);
    * ``length > prior.numel()``: the flattened prior repeated end to end and cut to ``length``
      (element ``i`` is ``flat[i % prior.numel()]``).

    To reproduce the released loss exactly, standardize the *full* flattened prior first and pass
    the standardized row here (``prior_row(standardize_rows(prior.reshape(-1), mode), M)``), then
    take the softmax; standardizing after the crop gives a different (also reasonable) prior.

    Args:
        prior: any shape (usually ``(num_codes, dim)``), at least one element.
        length: ``M >= 1``.

    Returns:
        (length,) tensor, same dtype and device as ``prior`` (a view when it is a crop of a
        contiguous prior).
    """
    if not isinstance(prior, torch.Tensor):
        raise TypeError(f"prior must be a torch.Tensor, got {type(prior).__name__}")
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)):
        raise TypeError(f"length must be an int, got {type(length).__name__}")
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if prior.numel() == 0:
        raise ValueError(f"prior must have at least one element, got shape {tuple(prior.shape)}")
    flat = prior.reshape(-1)
    if length <= flat.numel():
        return flat[:length]
    repeats = -(-length // flat.numel())
    return flat.repeat(repeats)[:length]
