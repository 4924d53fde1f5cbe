"""The world size and rank of this process: from an initialised `torch.distributed` process group, else one process.

One place for the check every sampler and data module needs (`dist.is_available() and dist.is_initialized()`).
"""

from __future__ import annotations

import torch.distributed as dist


def process_group_active() -> bool:
    """Whether a `torch.distributed` process group is initialised in this process."""
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    """Processes in the group (1 without an initialised group)."""
    return dist.get_world_size() if process_group_active() else 1


def get_rank() -> int:
    """This process's rank in the group (0 without an initialised group)."""
    return dist.get_rank() if process_group_active() else 0


def world_and_rank(num_replicas: int | None = None, rank: int | None = None) -> tuple[int, int]:
    """Explicit values first, else those of the initialised process group, else a single process (1, 0)."""
    return (get_world_size() if num_replicas is None else num_replicas, get_rank() if rank is None else rank)
