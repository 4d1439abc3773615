"""Codebook upkeep: what keeps a learned codebook useful besides its gradient.

:class:`CodebookUpkeep` owns the algorithms and the state that change a codebook ``(G, K, d)`` in
place (``G`` codebooks of ``K`` codewords of ``d`` elements): data-dependent initialization (k-means, a
lattice fitted to the first batch), exponential-moving-average updates, and the re-seeding of dead
codes. The quantizer that owns the codebook parameter (the layout: which sub-vector is searched in
which codebook, and the losses) calls it before and after each search with the search rows grouped by
codebook, ``rows: (G, n, d)``.

Under ``torch.distributed`` every statistic is summed over ranks and every random pick (k-means seeds,
re-seeded codes) comes from rank 0, so every rank keeps the same codebook.
"""

from __future__ import annotations

import torch
from torch import nn

from kepler.distributed import all_reduce_sum, broadcast_from_rank0
from kepler.ops.nearest_codeword import nearest_codeword
from kepler.nn.protocol import check_first_batch_finite

KMEANS_ITERATIONS = 10
# Laplace smoothing of the EMA cluster sizes, so an unused code never divides by zero.
EMA_EPS = 1e-5
INITS = ("uniform", "kmeans", "lattice")


class CodebookUpkeep(nn.Module):
    """Initialization, EMA updates and dead-code re-seeding of a ``(G, K, d)`` codebook.

    Args:
        codebook: the codebook parameter (any shape viewing as ``(G, K, d)``); read for its shape,
            dtype and initial value (the EMA sums start from it), never kept.
        groups: ``G``, codebooks searched independently.
        init: ``"uniform"`` (the codebook's own initial value, nothing to do), ``"kmeans"``
            (``KMEANS_ITERATIONS`` Lloyd iterations from distinct random rows of the first batch) or
            ``"lattice"`` (``init_points``, centred on the first batch's mean row and scaled to its RMS
            spread). The data-dependent inits run at the first :meth:`before_search` with rows (in eval
            mode too), and refuse rows with NaN or inf (ValueError with their count).
        init_points: ``(K, d)`` float64 lattice points for ``init="lattice"``.
        ema_decay: None, or a decay in (0, 1): :meth:`after_search` moves each code to the
            Laplace-smoothed moving average of the rows assigned to it.
        dead_code_threshold: 0 (off) or a count: at the start of a training search that ends a window
            of ``dead_code_window`` training searches, codes used fewer times than this in the window
            take random rows of the current batch.
        dead_code_window: training searches per dead-code window.
        backend: kernel backend of the k-means searches.

    Buffers (in the state dict): ``initialized`` (data-dependent inits), ``ema_cluster_size (G, K)`` and
    ``ema_embed_sum (G, K, d)`` (EMA), ``window_counts (G, K)`` and ``window_steps`` (dead codes).
    """

    def __init__(
        self,
        codebook: torch.Tensor,
        groups: int,
        *,
        init: str = "uniform",
        init_points: torch.Tensor | None = None,
        ema_decay: float | None = None,
        dead_code_threshold: float = 0,
        dead_code_window: int = 1,
        backend: str | None = None,
    ):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if (init == "lattice") != (init_points is not None):
            raise ValueError("init='lattice' takes init_points, and only it does")
        self.groups = groups
        self.codebook_size = codebook.numel() // (groups * codebook.shape[-1])
        self.sub_dim = codebook.shape[-1]
        self.init = init
        self.init_points = init_points
        self.ema_decay = ema_decay
        self.dead_code_threshold = dead_code_threshold
        self.dead_code_window = dead_code_window
        self.backend = backend
        counts_shape = (groups, self.codebook_size)
        self._needs_init = init != "uniform"
        if self._needs_init:
            self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        if ema_decay is not None:
            # Each code starts as the mean of one row (itself), so an unused code stays put.
            self.register_buffer("ema_cluster_size", torch.ones(counts_shape))
            self.register_buffer("ema_embed_sum", codebook.detach().clone().view(groups, self.codebook_size, -1))
        if dead_code_threshold > 0:
            self.register_buffer("window_counts", torch.zeros(counts_shape, dtype=torch.int64))
            self.register_buffer("window_steps", torch.zeros((), dtype=torch.int64))

    def _grouped(self, codebook: torch.Tensor) -> torch.Tensor:
        return codebook.view(self.groups, self.codebook_size, self.sub_dim)

    # ---------------------------------------------------------------------------------- steps

    @torch.no_grad()
    def before_search(self, codebook: torch.Tensor, rows: torch.Tensor, training: bool) -> None:
        """Data-dependent init on the first rows; dead-code re-seeding when a training window ends.

        ``rows: (G, n, d)`` (detached, the codebook's dtype); nothing happens for ``n == 0``.
        """
        if rows.shape[1] == 0:
            return
        if self._needs_init:
            self._initialize(codebook, rows)
        if training and self.dead_code_threshold > 0:
            self._reseed_dead_codes(codebook, rows)

    @torch.no_grad()
    def after_search(
        self, codebook: torch.Tensor, entry_counts: torch.Tensor, flat_index: torch.Tensor, rows: torch.Tensor
    ) -> None:
        """After a training search: the EMA step and the dead-code window's counts.

        ``entry_counts: (G * K,)`` int64, this batch's uses of each code summed over ranks;
        ``flat_index: (G * n,)`` the winners as rows of ``codebook.view(-1, d)``; ``rows: (G, n, d)``.
        """
        if self.ema_decay is not None:
            self._ema_update(codebook, entry_counts, flat_index, rows)
        if self.dead_code_threshold > 0:
            self.window_counts.view(-1).add_(entry_counts)
            self.window_steps.add_(1)

    # ---------------------------------------------------------------------------------- init

    def _random_rows(self, rows: torch.Tensor, *, distinct: bool) -> torch.Tensor:
        """``K`` rows of each group of ``rows: (G, n, d)``, picked on rank 0: ``(G, K, d)``.

        ``distinct`` picks without replacement when there are at least ``K`` rows.
        """
        groups, count, _ = rows.shape
        if distinct and count >= self.codebook_size:
            pick = torch.rand(groups, count, device=rows.device).argsort(dim=1)[:, : self.codebook_size]
        else:
            pick = torch.randint(0, count, (groups, self.codebook_size), device=rows.device)
        chosen = torch.gather(rows, 1, pick.unsqueeze(-1).expand(-1, -1, self.sub_dim))
        return broadcast_from_rank0(chosen.contiguous())

    def _set_codebook(self, codebook: torch.Tensor, value: torch.Tensor) -> None:
        """Write a ``(G, K, d)`` value into the codebook, restarting the EMA statistics from it."""
        codebook.copy_(value.view_as(codebook))
        if self.ema_decay is not None:
            self.ema_embed_sum.copy_(self._grouped(codebook))
            self.ema_cluster_size.fill_(1.0)

    def _initialize(self, codebook: torch.Tensor, rows: torch.Tensor) -> None:
        # One NaN in the first batch would spread into every codeword it touches and stay there.
        check_first_batch_finite(rows, f"codebook initialization ({self.init})", "the codebook would keep them")
        value = self._kmeans(rows) if self.init == "kmeans" else self._lattice_codebook(rows, codebook.dtype)
        self._set_codebook(codebook, value)
        self.initialized.fill_(True)
        self._needs_init = False

    def _kmeans(self, rows: torch.Tensor) -> torch.Tensor:
        """Lloyd iterations from distinct random rows; statistics summed over ranks. ``(G, K, d)``."""
        centroids = self._random_rows(rows, distinct=True)
        flat_rows = rows.reshape(-1, self.sub_dim).to(torch.float32)
        offsets = (torch.arange(self.groups, device=rows.device) * self.codebook_size).unsqueeze(1)
        for _ in range(KMEANS_ITERATIONS):
            indices, _ = nearest_codeword(rows, centroids, backend=self.backend)
            flat_index = (indices + offsets).reshape(-1)
            sums = torch.zeros(self.groups * self.codebook_size, self.sub_dim, device=rows.device)
            sums.index_add_(0, flat_index, flat_rows)
            counts = torch.zeros(self.groups * self.codebook_size, device=rows.device)
            counts.index_add_(0, flat_index, torch.ones_like(flat_index, dtype=torch.float32))
            all_reduce_sum(sums)
            all_reduce_sum(counts)
            means = sums / counts.clamp_min(1.0).unsqueeze(-1)
            # An empty cluster keeps its centroid.
            keep = (counts == 0).unsqueeze(-1)
            centroids = torch.where(keep, centroids.reshape(-1, self.sub_dim), means.to(centroids.dtype))
            centroids = centroids.view(self.groups, self.codebook_size, self.sub_dim)
        return centroids

    def _lattice_codebook(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The lattice points, centred on the batch's mean row and scaled so their RMS norm is the
        batch's RMS distance to that mean. ``(G, K, d)``."""
        points = self.init_points.to(device=rows.device)
        rows64 = rows.to(torch.float64)
        count = all_reduce_sum(torch.full((), rows.shape[1], dtype=torch.float64, device=rows.device))
        mean = all_reduce_sum(rows64.sum(dim=1)) / count  # (G, d)
        spread_sq = all_reduce_sum((rows64 - mean.unsqueeze(1)).square().sum(dim=(1, 2))) / count
        points_rms = points.square().sum(dim=-1).mean().sqrt()
        # A single-point lattice (the origin) has no spread to match: the codebook is the mean.
        factor = spread_sq.sqrt() / points_rms if points_rms > 0 else torch.zeros_like(spread_sq)
        codebook = mean.unsqueeze(1) + points.unsqueeze(0) * factor.view(-1, 1, 1)
        return codebook.to(dtype)

    # ---------------------------------------------------------------------------------- updates

    def _ema_update(
        self, codebook: torch.Tensor, entry_counts: torch.Tensor, flat_index: torch.Tensor, rows: torch.Tensor
    ) -> None:
        """Laplace-smoothed EMA of cluster sizes and sums (summed over ranks) -> the codebook."""
        sums = torch.zeros(self.groups * self.codebook_size, self.sub_dim, device=rows.device)
        sums.index_add_(0, flat_index, rows.reshape(-1, self.sub_dim).to(torch.float32))
        all_reduce_sum(sums)
        decay = self.ema_decay
        cluster_size = self.ema_cluster_size.view(-1)
        cluster_size.mul_(decay).add_(entry_counts.to(cluster_size.dtype), alpha=1 - decay)
        embed_sum = self.ema_embed_sum.view(-1, self.sub_dim)
        embed_sum.mul_(decay).add_(sums.to(embed_sum.dtype), alpha=1 - decay)
        total = self.ema_cluster_size.sum(dim=-1, keepdim=True)
        smoothed = (self.ema_cluster_size + EMA_EPS) / (total + self.codebook_size * EMA_EPS) * total
        means = self.ema_embed_sum / smoothed.unsqueeze(-1)
        codebook.copy_(means.view_as(codebook))

    def _reseed_dead_codes(self, codebook: torch.Tensor, rows: torch.Tensor) -> None:
        """End of a window: codes used fewer than ``dead_code_threshold`` times in it take random
        current rows (rank 0's). Branch-free, so it traces under ``torch.compile``."""
        window_done = self.window_steps >= self.dead_code_window
        dead = (window_done & (self.window_counts < self.dead_code_threshold)).unsqueeze(-1)
        candidates = self._random_rows(rows, distinct=False)
        grouped = self._grouped(codebook)
        grouped.copy_(torch.where(dead, candidates, grouped))
        if self.ema_decay is not None:
            self.ema_embed_sum.copy_(torch.where(dead, candidates, self.ema_embed_sum))
            self.ema_cluster_size.masked_fill_(dead.squeeze(-1), 1.0)
        self.window_counts.masked_fill_(window_done, 0)
        self.window_steps.masked_fill_(window_done, 0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.init != "uniform":
            self._needs_init = not bool(self.initialized)
