"""How images are dealt to ranks: epoch-seeded training order that can start mid-epoch (exact
resume), and evaluation shards in which every image appears exactly once over all ranks."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class EpochShardSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)``: a permutation seeded by ``seed + epoch``, cut to whole global
    batches, dealt round-robin to ranks. ``set_epoch(e, start_batch)`` skips already-trained
    batches after a resume. The epoch travels with the index so workers need no shared state.

    ``repeat_batches=N`` is the overfitting sanity check: every epoch is epoch 0's first N global
    batches with epoch 0's augmentation, so the loss on one fixed batch must fall.
    """

    def __init__(self, dataset_len: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 repeat_batches: int = 0) -> None:
        self.dataset_len = dataset_len
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.repeat_batches = repeat_batches
        self.epoch = 0
        self.start_batch = 0
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the dataset has {dataset_len} images, fewer than one global batch "
                f"({batch_size} per device x {world_size} devices); lower train.batch_size_per_device")

    @property
    def batches_per_epoch(self) -> int:
        full = self.dataset_len // (self.batch_size * self.world_size)
        return min(full, self.repeat_batches) if self.repeat_batches else full

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def indices(self, epoch: int) -> torch.Tensor:
        epoch = self._data_epoch(epoch)
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.dataset_len, generator=g)
        used = perm[: self.batches_per_epoch * self.batch_size * self.world_size]
        return used[self.rank:: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        mine = self.indices(self.epoch)[self.start_batch * self.batch_size:]
        epoch = self._data_epoch(self.epoch)
        for i in mine.tolist():
            yield (epoch, i)

    def _data_epoch(self, epoch: int) -> int:
        return 0 if self.repeat_batches else epoch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


class ShardedEvalSampler(Sampler[int]):
    """Strided shard of ``range(dataset_len)`` for one rank: every index exactly once overall.

    Unlike ``DistributedSampler`` it never pads shards with repeated samples (which would bias an
    evaluation), so shard sizes may differ by one; :func:`extract_features` handles that. Do not
    pass the resulting loader through ``accelerator.prepare`` (that would shard it again).
    """

    def __init__(self, dataset_len: int, rank: int = 0, world_size: int = 1) -> None:
        if dataset_len < 0:
            raise ValueError(f"dataset_len must be >= 0, got {dataset_len}")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.dataset_len = dataset_len
        self.rank = rank
        self.world_size = world_size

    def __iter__(self):
        return iter(range(self.rank, self.dataset_len, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.dataset_len, self.world_size))
