"""The world size and rank of this process: from an initialised `torch.distributed` process group, else one process.

One place for the check every sampler and data module needs (`dist.is_available() and dist.is_initialized()`), and
for "rank 0 does it, everyone learns the outcome" (`on_rank_zero`).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

T = TypeVar("T")


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


def shareable_error(error: BaseException) -> BaseException:
    """`error`, or one of the same kind that survives pickling (to raise the same error in every process)."""
    from lxmert_pl.errors import UserInputError

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return (UserInputError if isinstance(error, UserInputError) else RuntimeError)(str(error))


def on_rank_zero(trainer: Any, fn: Callable[[], T]) -> T:
    """`fn()` on global rank 0, its result broadcast by the Lightning `trainer`'s strategy to every process; an
    error there is raised in every process (the others would otherwise wait for rank 0 until the process group's
    timeout). Call it where the process group exists (a `setup` hook, a step)."""
    outcome: object = None
    if trainer.global_rank == 0:
        try:
            outcome = fn()
        except Exception as error:
            outcome = shareable_error(error)
    if trainer.world_size > 1:
        outcome = trainer.strategy.broadcast(outcome, src=0)
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome
