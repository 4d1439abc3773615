"""Resumable, distributed sampling with per-sample seeds."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, Sampler, default_collate
from torch.utils.data.distributed import DistributedSampler


class SeededSampler(Sampler):
    """Yields ``(index, seed)`` pairs: this rank's share of an epoch, in DistributedSampler's order.

    ``seed`` is ``(base_seed, epoch, rank, position)``; datasets draw their augmentation from it, so a
    sample's crop and flip depend on nothing else. :meth:`set_epoch` with ``start`` skips the first
    ``start`` samples of the epoch without loading them, which is how a resumed run picks up at the
    exact batch where it stopped.
    """

    def __init__(self, dataset: Dataset, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        self.seed = int(seed)
        self.rank = rank
        self.order = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=self.seed, drop_last=True
        )
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.order.set_epoch(epoch)
        self.epoch = epoch
        self.start = start

    def __len__(self) -> int:
        return max(len(self.order) - self.start, 0)

    def __iter__(self) -> Iterator[tuple[int, tuple[int, int, int, int]]]:
        for position, index in enumerate(self.order):
            if position >= self.start:
                yield index, (self.seed, self.epoch, self.rank, position)


def collate(samples: list[tuple[torch.Tensor | None, tuple[str, ...]]]) -> tuple[torch.Tensor | None, list[str]]:
    """Stack the items' first elements (images; or tuples of tensors, stacked one by one, as the
    prior's labelled code maps are), leaving out the unreadable ones of a held-out set (None; None
    when every item is); gather the paths of the unreadable files skipped while loading them."""
    readable = [s[0] for s in samples if s[0] is not None]
    stacked = default_collate(readable) if readable else None
    skipped = [p for s in samples for p in s[1]]
    return stacked, skipped
