"""`last.ckpt` for exact resume: written where Lightning records the true position in the epoch.

Lightning treats an epoch that `max_steps` cut short as finished; a checkpoint written at that epoch's end would
resume at the NEXT epoch. `ResumeCheckpoint` therefore writes `last.ckpt` from the batch-end hook (every N steps,
and at the last step of a run), and from the epoch-end hook only when the epoch really ran to its end. Restored,
Lightning continues the epoch from the recorded batch, and `TrainingDataModule` skips the batches already trained.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback


class ResumeCheckpoint(Callback):
    def __init__(self, path: str | Path, every_n_steps: int | None = None):
        self.path = Path(path)
        self.every_n_steps = every_n_steps

    def _save(self, trainer: pl.Trainer) -> None:
        """Full state (optimizer, schedule, loops) to a temporary file, then renamed over `last.ckpt`: a crash while
        writing leaves the previous `last.ckpt` whole. Only global rank 0 writes; `save_checkpoint` ends in a barrier."""
        partial = self.path.with_name(self.path.name + ".part")
        trainer.save_checkpoint(partial, weights_only=False)
        if trainer.is_global_zero:
            os.replace(partial, self.path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        last_step = trainer.max_steps > 0 and step >= trainer.max_steps
        epoch_done = batch_idx + 1 >= trainer.num_training_batches
        if not epoch_done and (last_step or (self.every_n_steps and step % self.every_n_steps == 0)):
            self._save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        if progress.completed >= trainer.num_training_batches:  # ran to its end (not cut by max_steps)
            self._save(trainer)
