"""One process's training batches, epoch by epoch, from any batch of an epoch: how the trainer
reads its data and resumes it (:class:`EpochLoader`)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from kepler.data.sampler import SeededSampler, collate


class EpochLoader:
    """Batches of ``batch_size`` of ``dataset`` for process ``rank`` of ``world_size``, in the order
    of a :class:`~kepler.data.SeededSampler`.

    ``batches_per_epoch`` is the same on every process; :meth:`epoch` starts an epoch at any of its
    batches, the same batches as an epoch read from its start.
    """

    def __init__(self, dataset: Dataset, batch_size: int, num_workers: int, seed: int, rank: int = 0,
                 world_size: int = 1, pin_memory: bool = False):
        self.dataset = dataset
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.pin_memory = pin_memory
        self.sampler = SeededSampler(dataset, seed, rank, world_size)
        self.batches_per_epoch = len(self.sampler) // batch_size

    def epoch(self, epoch: int, start_batch: int = 0) -> DataLoader:
        """The batches of ``epoch`` from its batch ``start_batch`` on."""
        self.sampler.set_epoch(epoch, start=start_batch * self.batch_size)
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            sampler=self.sampler,
            collate_fn=collate,
            num_workers=self.num_workers,
            drop_last=True,
            pin_memory=self.pin_memory,
            # Its own generator: creating an iterator must not draw from the global RNG, or a resumed
            # run (one more iterator) would diverge.
            generator=torch.Generator().manual_seed(self.seed * 100003 + epoch),
        )
