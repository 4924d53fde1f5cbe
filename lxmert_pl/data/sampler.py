"""A distributed evaluation sampler that gives every example to exactly one process: no padding, no duplicates.

`torch.utils.data.DistributedSampler` pads the dataset with repeated examples until it divides evenly by the
world size, so evaluation metrics and prediction files count some pairs twice. `UnpaddedDistributedSampler` gives
rank r the contiguous slice `[r * n // W, (r + 1) * n // W)` of `range(n)`: shards differ in length by at most one
example, their concatenation in rank order is the input order.

It subclasses `DistributedSampler` only so that Lightning keeps it: a `Trainer` built with the default
`use_distributed_sampler=True` replaces (or wraps) any other sampler of an evaluation DataLoader with a padding
`DistributedSampler`, but leaves instances of `DistributedSampler` in place. Since shards may differ by one
example, ranks may run a different number of batches: avoid collective operations in `*_step` (log with
`sync_dist=True` only at epoch level, gather at epoch end).
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

from torch.utils.data import DistributedSampler

from lxmert_pl.distributed import world_and_rank


class UnpaddedDistributedSampler(DistributedSampler):
    """Indices `[rank * n // num_replicas, (rank + 1) * n // num_replicas)` of a dataset of length n, in order."""

    def __init__(self, dataset: Sized, num_replicas: int | None = None, rank: int | None = None):
        num_replicas, rank = world_and_rank(num_replicas, rank)
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        size = len(dataset)
        self.start = rank * size // num_replicas
        self.stop = (rank + 1) * size // num_replicas
        self.num_samples = self.stop - self.start
        self.total_size = size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.num_samples
