"""Messages for the person at the terminal."""

from __future__ import annotations

from lightning_fabric.utilities.rank_zero import rank_zero_only


def say(message: str) -> None:
    """Print `message` once: on global rank 0 only under DDP (every other rank stays quiet)."""
    if getattr(rank_zero_only, "rank", 0) == 0:
        print(message, flush=True)
