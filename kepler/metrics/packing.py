"""How well a codebook packs: nearest-neighbour spacing of its codewords and, given data, how well
it covers that data; and how many bits the codes it hands out carry.

* :func:`nearest_neighbor_distances`: for every codeword, the distance to the nearest *other*
  codeword.
* :func:`packing_report`: per (sub-)codebook, the minimum and mean of those distances, the packing
  radius (half the minimum), their coefficient of variation (std / mean: 0 for a perfectly regular
  codebook such as a full lattice shell), and with ``data`` the covering radius and the mean
  quantization error through :func:`kepler.nearest_codeword`.
* :func:`effective_bits`: from per-partition code counts, the bits per position an entropy coder
  would spend on the codes actually used; :func:`bits_per_position`, what a fixed-length code spends.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from kepler.ops.nearest_codeword import nearest_codeword

__all__ = ["PackingReport", "bits_per_position", "effective_bits", "nearest_neighbor_distances", "packing_report"]

# Rows of the codebook searched at once; the score matrix of a step is (_BLOCK_ROWS, candidates),
# at most (_BLOCK_ROWS, K): 256 * 65536 float64 scores = 128 MiB for the largest codebooks.
_BLOCK_ROWS = 256
# Grid search (low dimension only): candidate pairs whose distances are computed per step.
_GRID_MAX_DIM = 3
_GRID_PAIRS_PER_STEP = 1 << 21
_GRID_CELLS_PER_CODE = 32


def _check_codebook(codebook: torch.Tensor) -> None:
    if not isinstance(codebook, torch.Tensor):
        raise TypeError(f"codebook must be a torch.Tensor, got {type(codebook).__name__}")
    if not codebook.is_floating_point():
        raise TypeError(f"codebook must be a floating point tensor, got {codebook.dtype}")
    if codebook.dim() not in (2, 3):
        raise ValueError(f"codebook must be (K, d) or (G, K, d), got shape {tuple(codebook.shape)}")
    if codebook.shape[-1] == 0:
        raise ValueError("codebook must have d >= 1 features, got d=0")
    if codebook.shape[-2] < 2:
        raise ValueError(
            f"codebook needs K >= 2 codewords for nearest-neighbour distances, got K={codebook.shape[-2]}"
        )
    if not torch.isfinite(codebook).all():
        raise ValueError("codebook must be finite (it holds NaN or inf)")


def _nearest_other_sq_dist(codes: torch.Tensor, sq_norms: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Squared distance from ``codes[rows]`` to their nearest other codeword, searching all of ``codes``.

    Same numerics as the nearest-codeword search: the winner of ``||c||^2 - 2 x . c`` (accumulation
    dtype of ``codes``) has its distance recomputed exactly as ``sum((x - c)**2)``. The score matrix
    is ``(len(rows), K)``.
    """
    block = codes.index_select(0, rows)
    scores = torch.addmm(sq_norms, block, codes.T, alpha=-2)
    scores[torch.arange(len(rows), device=codes.device), rows] = torch.inf
    best = scores.argmin(dim=1)
    return (block - codes.index_select(0, best)).square().sum(dim=1)


def _grid_search(codes: torch.Tensor, best_sq_dist: torch.Tensor) -> torch.Tensor:
    """Exact nearest-other-codeword distances found through a grid of cells, for low dimension.

    Codewords are binned into cubic cells of side ``h``; a row's candidates are the codewords in
    its own and the adjacent cells. Any codeword outside those differs by more than ``h`` in some
    coordinate, so a row whose best candidate is within ``h`` is exact. Rows not yet exact go on to
    a grid of twice the side, until a pass would cost more than a quarter of a brute-force search
    of the rows left. Writes the exact rows' squared distances into ``best_sq_dist`` and returns the
    rows left for the brute-force search.
    """
    num_codes = codes.shape[0]
    low = codes.amin(dim=0)
    extent = codes.amax(dim=0) - low
    axes = torch.nonzero(extent > 0).flatten()  # constant coordinates do not separate codewords
    remaining = torch.arange(num_codes, device=codes.device)
    if axes.numel() == 0:
        return remaining
    coords, low, extent = codes[:, axes] - low[axes], low[axes], extent[axes]
    num_axes = axes.numel()
    offsets = torch.cartesian_prod(*[torch.arange(-1, 2, device=codes.device)] * num_axes).reshape(-1, num_axes)
    # Start at about one codeword per 8 cells of the bounding box (dense regions finish in the
    # first passes with few candidates; sparse ones go on), with at most _GRID_CELLS_PER_CODE * K
    # cells so the per-cell table stays small.
    side = float((extent.prod() / (8 * num_codes)) ** (1 / num_axes))
    while remaining.numel():
        cells_per_axis = (extent / side).floor().long() + 1
        num_cells = int(cells_per_axis.prod())
        if num_cells > _GRID_CELLS_PER_CODE * num_codes:
            side *= 2
            continue
        strides = torch.cumprod(torch.cat([cells_per_axis.new_ones(1), cells_per_axis[:-1]]), dim=0)
        cell = (coords / side).floor().long().clamp_(max=cells_per_axis - 1)
        key = (cell * strides).sum(dim=1)
        order = torch.argsort(key, stable=True)
        codes_per_cell = torch.bincount(key, minlength=num_cells)
        cell_first = codes_per_cell.cumsum(0) - codes_per_cell  # position of a cell's first code in `order`
        neighbour = cell[remaining].unsqueeze(1) + offsets  # (R, 3**m, m)
        valid = ((neighbour >= 0) & (neighbour < cells_per_axis)).all(dim=-1)
        neighbour_key = torch.where(valid, (neighbour * strides).sum(dim=-1), 0)
        first = cell_first.take(neighbour_key)
        counts = torch.where(valid, codes_per_cell.take(neighbour_key), 0)
        if int(counts.sum()) * 4 > remaining.numel() * num_codes:
            break
        row_sq_dist = torch.empty(remaining.numel(), dtype=codes.dtype, device=codes.device)
        # Rows in chunks of about _GRID_PAIRS_PER_STEP candidate pairs (a heavier row alone).
        pairs_per_row = counts.sum(dim=1)
        chunk_id = (pairs_per_row.cumsum(0) - pairs_per_row) // _GRID_PAIRS_PER_STEP
        chunk_starts = torch.searchsorted(chunk_id, torch.unique_consecutive(chunk_id)).tolist()
        for chunk_start, chunk_end in zip(chunk_starts, [*chunk_starts[1:], remaining.numel()]):
            chunk_counts = counts[chunk_start:chunk_end].reshape(-1)
            slot = torch.repeat_interleave(torch.arange(chunk_counts.numel(), device=codes.device), chunk_counts)
            slot_first = first[chunk_start:chunk_end].reshape(-1) - (chunk_counts.cumsum(0) - chunk_counts)
            candidate = order.take(slot_first.take(slot) + torch.arange(slot.numel(), device=codes.device))
            row = slot // offsets.shape[0]
            row_index = remaining[chunk_start:chunk_end].take(row)
            # index_select: a much faster gather than advanced indexing on the CPU.
            sq_dist = (codes.index_select(0, row_index) - codes.index_select(0, candidate)).square().sum(dim=1)
            sq_dist = torch.where(candidate == row_index, torch.inf, sq_dist)
            chunk_best = torch.full((chunk_end - chunk_start,), torch.inf, dtype=codes.dtype, device=codes.device)
            row_sq_dist[chunk_start:chunk_end] = chunk_best.scatter_reduce_(0, row, sq_dist, "amin")
        # Exact when the best candidate is within the cell side (a margin for the binning's rounding).
        exact = row_sq_dist <= (side * (1 - 1e-6)) ** 2
        best_sq_dist[remaining[exact]] = row_sq_dist[exact]
        remaining = remaining[~exact]
        side *= 2
    return remaining


def _nearest_neighbor_sq_dist_one(codebook: torch.Tensor) -> torch.Tensor:
    """(K, d) -> (K,) squared distance to the nearest other codeword, in the accumulation dtype.

    Up to 3 dimensions a grid of cells (:func:`_grid_search`) finds most rows with a handful of
    candidates each; the rest (all rows in higher dimension) are searched against the whole
    codebook, ``_BLOCK_ROWS`` rows at a time.
    """
    acc_dtype = torch.float64 if codebook.dtype == torch.float64 else torch.float32
    # Centred: distances do not change, and small norms keep the search score's cancellation small.
    codes = codebook.to(acc_dtype)
    codes = codes - codes.mean(dim=0)
    best_sq_dist = torch.full((codes.shape[0],), torch.inf, dtype=acc_dtype, device=codes.device)
    remaining = torch.arange(codes.shape[0], device=codes.device)
    if codes.shape[1] <= _GRID_MAX_DIM:
        remaining = _grid_search(codes, best_sq_dist)
    sq_norms = codes.square().sum(dim=1)
    for rows in remaining.split(_BLOCK_ROWS):
        best_sq_dist[rows] = _nearest_other_sq_dist(codes, sq_norms, rows)
    return best_sq_dist


def nearest_neighbor_distances(codebook: torch.Tensor) -> torch.Tensor:
    """Distance from every codeword to the nearest other codeword.

    Args:
        codebook: (K, d) or (G, K, d) finite floating point, K >= 2; any device and strides.

    Returns:
        (K,) or (G, K) float64 on the codebook's device: ``min_{j != i} ||c_i - c_j||`` per group.

    Computed in float32 (float64 for float64 codebooks) on the centred codebook, without ever
    forming a (K, K) matrix:

    * d <= 3: a grid of cells doubling in size; each codeword is compared with those in its own and
      the adjacent cells until its nearest one provably lies there (distances as sums of squared
      differences). Memory O(K * 3**d) plus about 2**21 candidate pairs per step; K = 65536 takes
      about a second on one CPU core.
    * the codewords the grid does not settle (all of them for d > 3): a search of the whole codebook
      256 rows at a time with the numerics of :func:`kepler.nearest_codeword` (score
      ``||c||^2 - 2 x . c``, the winner's distance recomputed exactly, the codeword itself masked).
      Memory O(256 * K) scores, time O(K^2 d).

    Duplicated codewords have distance 0.
    """
    _check_codebook(codebook)
    with torch.no_grad():
        groups = codebook if codebook.dim() == 3 else codebook.unsqueeze(0)
        sq_dist = torch.stack([_nearest_neighbor_sq_dist_one(group) for group in groups])
        distances = sq_dist.to(torch.float64).sqrt()
    return distances if codebook.dim() == 3 else distances[0]


@dataclasses.dataclass(frozen=True)
class PackingReport:
    """Packing statistics of a codebook; every tensor is float64 on the CPU, shape () for a (K, d)
    codebook and (G,) for a grouped (G, K, d) one.

    Attributes:
        num_codes: K.
        dim: d.
        min_nn_distance: smallest distance between two codewords.
        mean_nn_distance: mean over codewords of the distance to their nearest other codeword.
        packing_radius: ``min_nn_distance / 2``, the radius of the largest equal balls centred on
            the codewords that do not overlap.
        nn_distance_cv: coefficient of variation of the nearest-neighbour distances, population
            std / mean: 0 when every codeword is equally far from its neighbour (regularity); NaN
            when the mean is 0 (every codeword duplicated).
        covering_radius: with data, the largest distance from a data row to its nearest codeword
            (the covering radius of the codebook over that data), else None.
        mean_quantization_error: with data, the mean squared distance from a data row to its
            nearest codeword, else None.
    """

    num_codes: int
    dim: int
    min_nn_distance: torch.Tensor
    mean_nn_distance: torch.Tensor
    packing_radius: torch.Tensor
    nn_distance_cv: torch.Tensor
    covering_radius: torch.Tensor | None = None
    mean_quantization_error: torch.Tensor | None = None

    def to_dict(self) -> dict:
        """Plain Python values (floats, or lists of floats per group; None where absent), for logs and JSON."""
        values = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            values[field.name] = value.tolist() if isinstance(value, torch.Tensor) else value
        return values


def _check_data(data: torch.Tensor, codebook: torch.Tensor) -> None:
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"data must be a torch.Tensor, got {type(data).__name__}")
    if data.dim() != codebook.dim():
        raise ValueError(
            f"data must be (N, d) for a (K, d) codebook and (G, N, d) for a (G, K, d) codebook; got data "
            f"{tuple(data.shape)} with codebook {tuple(codebook.shape)}"
        )
    if data.shape[-1] != codebook.shape[-1]:
        raise ValueError(f"data has d={data.shape[-1]} features but codebook has d={codebook.shape[-1]}")
    if data.dim() == 3 and data.shape[0] != codebook.shape[0]:
        raise ValueError(f"data has G={data.shape[0]} groups but codebook has G={codebook.shape[0]}")
    if data.shape[-2] == 0:
        raise ValueError("data must hold at least one row, got N=0")
    if data.dtype != codebook.dtype:
        raise TypeError(f"data and codebook must have the same dtype, got {data.dtype} and {codebook.dtype}")
    if data.device != codebook.device:
        raise ValueError(f"data and codebook must be on the same device, got {data.device} and {codebook.device}")


def packing_report(
    codebook: torch.Tensor, data: torch.Tensor | None = None, *, backend: str | None = None
) -> PackingReport:
    """Packing statistics of each (sub-)codebook, and how it covers ``data`` when given.

    Args:
        codebook: (K, d), or (G, K, d) for G sub-codebooks reported separately; finite floating
            point, K >= 2.
        data: optional (N, d) for a (K, d) codebook, (G, N, d) for a (G, K, d) one; same dtype and
            device as the codebook, N >= 1. Rows holding NaN/inf make the data statistics NaN/inf.
        backend: backend of the data search (:func:`kepler.nearest_codeword`); the codeword
            nearest-neighbour search (:func:`nearest_neighbor_distances`) is plain PyTorch.

    Returns:
        :class:`PackingReport` (``.to_dict()`` for plain values).
    """
    _check_codebook(codebook)
    if data is not None:
        _check_data(data, codebook)
    distances = nearest_neighbor_distances(codebook).cpu()
    mean = distances.mean(dim=-1)
    minimum = distances.amin(dim=-1)
    covering_radius = mean_quantization_error = None
    if data is not None:
        with torch.no_grad():
            _, sq_dist = nearest_codeword(data, codebook, backend=backend)
        sq_dist = sq_dist.to(torch.float64).cpu()
        covering_radius = sq_dist.amax(dim=-1).sqrt()
        mean_quantization_error = sq_dist.mean(dim=-1)
    return PackingReport(
        num_codes=codebook.shape[-2],
        dim=codebook.shape[-1],
        min_nn_distance=minimum,
        mean_nn_distance=mean,
        packing_radius=minimum / 2,
        nn_distance_cv=distances.std(dim=-1, correction=0) / mean,
        covering_radius=covering_radius,
        mean_quantization_error=mean_quantization_error,
    )


def bits_per_position(codebook_size: int, tokens_per_position: int) -> float:
    """Bits one latent position costs in a fixed-length code: ``P * log2(K)`` (each of the ``P`` tokens
    of a position is one of ``K`` codes, whether the codebook is shared or not)."""
    if codebook_size < 1 or tokens_per_position < 1:
        raise ValueError(
            f"need codebook_size >= 1 and tokens_per_position >= 1, got {codebook_size} and {tokens_per_position}"
        )
    return tokens_per_position * math.log2(codebook_size)


def effective_bits(counts) -> float:
    """``sum_p H(counts[p])`` in bits: what an ideal per-sub-vector entropy coder spends per
    position, given per-partition code counts ``(P, K)`` (an upper bound on the joint entropy)."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    totals = counts.sum(dim=-1, keepdim=True).clamp_min(1.0)
    p = counts / totals
    entropy = -(p * torch.where(p > 0, p.log2(), torch.zeros_like(p))).sum(dim=-1)
    return float(entropy.sum())
