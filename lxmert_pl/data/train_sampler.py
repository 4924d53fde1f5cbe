"""Training order that survives a resume exactly.

`ResumableShuffleSampler` draws each epoch's permutation from a generator seeded by (seed, epoch) — not from the
global RNG — shards it over processes without padding beyond one round-up, and can skip the batches a resumed run
already trained on in its first epoch. Together with the per-step dropout seed in `MatchingModule`, a run stopped
after N steps and resumed continues with exactly the batches (and losses) an uninterrupted run would have seen.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler

from lxmert_pl.distributed import world_and_rank


class ResumableShuffleSampler(Sampler[int]):
    def __init__(self, num_items: int, seed: int = 0, shuffle: bool = True,
                 num_replicas: int | None = None, rank: int | None = None):
        num_replicas, rank = world_and_rank(num_replicas, rank)
        self.num_items, self.seed, self.shuffle = num_items, seed, shuffle
        self.num_replicas, self.rank = num_replicas, rank
        self.per_replica = math.ceil(num_items / num_replicas)  # replicas must step together under DDP
        self.epoch = 0
        self.skip = 0  # items of this replica's share to skip once (resume mid-epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_first(self, num_items: int) -> None:
        """Skip this many items of the next epoch's share (set when resuming from a mid-epoch checkpoint)."""
        self.skip = num_items

    def epoch_order(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_items, generator=g).tolist()
        else:
            order = list(range(self.num_items))
        total = self.per_replica * self.num_replicas
        order += order[: total - len(order)]  # same step count on every replica (as DistributedSampler)
        return order[self.rank : total : self.num_replicas]

    def __iter__(self):
        order = self.epoch_order()[self.skip :]
        self.skip = 0
        return iter(order)

    def __len__(self) -> int:
        # The full share, even while skipping: Lightning counts a resumed epoch's batches from where it stopped.
        return self.per_replica
