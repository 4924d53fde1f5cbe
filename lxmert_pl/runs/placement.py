"""Where a run's processes go: the Lightning strategy of the shared `trainer` block (eval.py, train.py, extract.py).

`trainer.strategy: auto` means one process without DDP, and DDP (gloo on CPU, NCCL on GPU) as soon as
`devices * num_nodes > 1`, with `trainer.ddp_timeout_minutes` as the longest wait at a collective (a barrier, a
broadcast): extract.py waits there for the slowest node and for rank 0's merge. Any other value is passed to
Lightning as is (`ddp`, `ddp_find_unused_parameters_true`, `fsdp`, ...). Processes on other nodes are started by
torchrun or SLURM (docs/scale.md); Lightning picks the cluster environment from their variables.
"""

from __future__ import annotations

from datetime import timedelta

from omegaconf import DictConfig
from pytorch_lightning.strategies import DDPStrategy, Strategy


def choose_strategy(trainer_cfg: DictConfig, find_unused_parameters: bool = False) -> str | Strategy:
    """The `strategy` argument of `pl.Trainer` for this `trainer` block (see the module docstring)."""
    strategy = str(trainer_cfg.get("strategy") or "auto")
    if strategy != "auto":
        return strategy
    devices, nodes = trainer_cfg.devices, int(trainer_cfg.get("num_nodes") or 1)
    if not (isinstance(devices, int) and devices * nodes > 1):
        return "auto"
    minutes = float(trainer_cfg.get("ddp_timeout_minutes") or 30)
    return DDPStrategy(find_unused_parameters=find_unused_parameters, timeout=timedelta(minutes=minutes))
