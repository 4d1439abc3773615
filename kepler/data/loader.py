"""One process's training batches, epoch by epoch, from any batch of an epoch: how the trainer
reads its data and resumes it (:class:`EpochLoader`)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from kepler.data.sampler import SeededSampler, collate


class EpochLoader:
    """Batches of ``batch_size`` of ``dataset`` for process ``rank`` of ``world_size``: a
    :class:`~kepler.data.SeededSampler` over a map-style data set, or, for a stream
    (:class:`~kepler.data.shards.ImageShards`), its own split by process and worker.

    ``batches_per_epoch`` is the same on every process; :meth:`epoch` starts an epoch at any of its
    batches, the same batches as an epoch read from its start (see each data set's docstring for
    what that takes).
    """

    def __init__(self, dataset: Dataset, batch_size: int, num_workers: int, seed: int, rank: int = 0,
                 world_size: int = 1, pin_memory: bool = False):
        self.dataset = dataset
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.rank, self.world_size, self.pin_memory = rank, world_size, pin_memory
        self.stream = isinstance(dataset, IterableDataset)
        if self.stream:
            workers = max(1, num_workers)
            per_stream = dataset.samples_per_stream(world_size * workers)
            if per_stream < batch_size:
                raise ValueError(f"each of the {world_size * workers} streams of the training shards ({world_size} "
                                 f"processes x {workers} workers) reads {per_stream} samples an epoch, fewer than "
                                 f"one batch of {batch_size}")
            self.batches_per_epoch = workers * (per_stream // batch_size)
        else:
            self.sampler = SeededSampler(dataset, seed, rank, world_size)
            self.batches_per_epoch = len(self.sampler) // batch_size

    def epoch(self, epoch: int, start_batch: int = 0) -> DataLoader:
        """The batches of ``epoch`` from its batch ``start_batch`` on."""
        if self.stream:
            dataset, sampler = self.dataset.at(seed=self.seed, epoch=epoch, rank=self.rank, world_size=self.world_size,
                                               batch_size=self.batch_size, start_batch=start_batch), None
        else:
            self.sampler.set_epoch(epoch, start=start_batch * self.batch_size)
            dataset, sampler = self.dataset, self.sampler
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            collate_fn=collate,
            num_workers=self.num_workers,
            drop_last=True,
            pin_memory=self.pin_memory,
            # Its own generator: creating an iterator must not draw from the global RNG, or a resumed
            # run (one more iterator) would diverge.
            generator=torch.Generator().manual_seed(self.seed * 100003 + epoch),
        )
