"""`last.ckpt` for exact resume, and the checks that make `train.py --resume` continue the SAME run or refuse.

Where `last.ckpt` is written: Lightning treats an epoch that `max_steps` cut short as finished; a checkpoint written
at that epoch's end would resume at the NEXT epoch. `ResumeCheckpoint` therefore writes `last.ckpt` from the
batch-end hook (every N optimizer steps, and at the last step of a run; only right after an optimizer step, never
while gradients are being accumulated), and from the epoch-end hook only when the epoch really ran to its end.
Restored, Lightning continues the epoch from the recorded batch, and `TrainingDataModule` skips the batches already
trained (see `TrainingDataModule.batches_already_trained`).

What `--resume` checks: each `last.ckpt` carries the run's record under `RUN_RECORD_KEY` (the settings that shape
the training trajectory, fingerprints of the data files, and the run's length). `check_resume` compares it with the
new run's record: a changed trajectory setting is refused (naming setting, checkpoint value and new value), a
changed length (`trainer.max_epochs`, `trainer.max_steps`) is honoured, and a resume with nothing left to train is
refused. A weights-only file (a `best.ckpt`, an original `.pth`) cannot be resumed: the message says to use `--ckpt`.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback

from lxmert_pl.errors import CheckpointError, UserInputError
from lxmert_pl.fingerprint import compare, fingerprint

RUN_RECORD_KEY = "lxmert_pl_train_run"

# Config keys that shape the training trajectory: a resume with another value would not continue the same run.
# (The optimizer's lr and weight decay, the schedule and the early-stopping patience are restored from the
# checkpoint, so a new value would be silently ignored; the others change the batches, the loss or the numerics.)
TRAJECTORY_SETTINGS = (
    "seed", "data.batch_size", "data.negative_ratio", "data.max_seq_length", "data.skip_missing",
    "model.finetune", "model.top_k_cross",
    "optim.lr", "optim.weight_decay", "optim.warmup_ratio", "optim.grad_clip", "optim.accumulate",
    "trainer.precision", "trainer.devices", "trainer.num_nodes", "trainer.early_stopping_patience",
)
# Settings recorded since a later train.py, with the value every run had before: an older record lacks them.
RECORDED_LATER = {"trainer.num_nodes": 1}
# Data files: pair files by content (sha256), feature files/stores by name and size (they can be large).
DATA_SETTINGS = ("data.train", "data.val", "data.features")


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _name_and_size(path: Path) -> str:
    if path.is_dir():
        size = sum(p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file())
    else:
        size = path.stat().st_size
    return f"{path.name} ({size} bytes)"


def run_record(cfg: DictConfig) -> dict[str, Any]:
    """The record `last.ckpt` keeps of its run: trajectory settings, data fingerprints, length (plain types)."""
    settings = {key: OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
                for key in TRAJECTORY_SETTINGS for value in [OmegaConf.select(cfg, key)]}
    data = cfg.data
    settings["data.train"] = f"sha256 {_file_sha256(Path(data.train))}" if data.train else None
    settings["data.val"] = f"sha256 {_file_sha256(Path(data.val))}" if data.val else None
    settings["data.features"] = [_name_and_size(Path(p)) for p in data.features]
    # The feature files by what made them and their index (lxmert_pl.fingerprint); name and size above stay for
    # the records of older train.py versions.
    features = fingerprint(None, [str(p) for p in data.features], {})
    return {"settings": settings, "max_epochs": int(cfg.trainer.max_epochs), "max_steps": int(cfg.trainer.max_steps),
            "fingerprint": features}


@dataclass(frozen=True)
class ResumePoint:
    """Where a `last.ckpt` stands: epochs run to their end, optimizer steps taken, and its run record (or None
    for a checkpoint of a train.py that did not write one)."""

    path: Path
    epochs_done: int
    global_step: int
    record: dict[str, Any] | None
    logged_step: int | None = None  # the loggers' step at the checkpoint (rows logged before it belong to the run)


def read_resume_point(path: str | Path) -> ResumePoint:
    """Read the position and run record of a train.py checkpoint; refuse a file that holds weights only."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not a zip-format file (an old torch.save): read it whole
        ckpt = None
    if ckpt is None:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(f"--resume {path}: not a readable train.py checkpoint: {err}") from None
    resumable = isinstance(ckpt, dict) and "loops" in ckpt and ckpt.get("optimizer_states")
    if not resumable:
        raise CheckpointError(
            f"--resume {path}: the file holds weights only (no optimizer, schedule and loop state), so it cannot "
            f"be resumed; use --ckpt {path} to start a new run from these weights")
    fit_loop = ckpt["loops"]["fit_loop"]
    epochs = fit_loop["epoch_progress"]["current"]
    global_step = int(ckpt.get("global_step", 0))
    logged_step = fit_loop.get("epoch_loop.state_dict", {}).get("_batches_that_stepped", global_step)
    return ResumePoint(path, int(epochs["processed"]), global_step, ckpt.get(RUN_RECORD_KEY), int(logged_step))


def _shown(value: Any) -> str:
    return "null" if value is None else str(value)


def check_resume(point: ResumePoint, record: dict[str, Any]) -> list[str]:
    """Refuse a resume that would not continue the checkpoint's run, or would train nothing; return the notes
    to show for the changes that are honoured (the run's length)."""
    notes = []
    if point.record is None:
        notes.append(f"Note: {point.path} has no record of its run's settings (written by an older train.py): "
                     "cannot check that this resume uses the same settings and data.")
        saved = {"settings": record["settings"], "max_epochs": record["max_epochs"], "max_steps": record["max_steps"]}
    else:
        saved = point.record
    saved_settings = {**RECORDED_LATER, **saved["settings"]}
    changed = [f"{key}={_shown(saved_settings.get(key))} in the checkpoint, {_shown(value)} now"
               for key, value in record["settings"].items() if saved_settings.get(key) != value]
    if "fingerprint" in saved:  # recorded since train.py keeps a fingerprint of the feature files
        changed += [f"data.{change} (checkpoint -> now)" for change in compare(saved["fingerprint"],
                                                                               record["fingerprint"])]
    if changed:
        raise UserInputError(
            f"--resume {point.path}: the resumed run must use the checkpoint's settings and data, but "
            f"{'; '.join(changed)}. Resume with the checkpoint's values, or start a new run from its weights "
            f"with --ckpt {point.path}")
    max_epochs, max_steps = record["max_epochs"], record["max_steps"]
    if point.epochs_done >= max_epochs or 0 < max_steps <= point.global_step:
        limit = (f"trainer.max_steps={max_steps}" if 0 < max_steps <= point.global_step
                 else f"trainer.max_epochs={max_epochs}")
        raise UserInputError(
            f"--resume {point.path}: nothing left to train: the checkpoint has finished {point.epochs_done} "
            f"epoch(s) ({point.global_step} optimizer steps) and {limit}; raise it to train further")
    if max_epochs != saved["max_epochs"]:
        notes.append(
            f"Resuming with trainer.max_epochs={max_epochs} (the checkpoint's run: {saved['max_epochs']}): the "
            f"learning-rate schedule (warm-up, then linear decay to 0) now spans {max_epochs} epochs; from step "
            f"{point.global_step} on the rate is what a {max_epochs}-epoch run has at that step (the steps already "
            "trained followed the old schedule).")
    return notes


class ResumeCheckpoint(Callback):
    """Writes `last.ckpt` (full state + `record` under RUN_RECORD_KEY) where a resume continues exactly."""

    def __init__(self, path: str | Path, every_n_steps: int | None = None, record: dict[str, Any] | None = None):
        self.path = Path(path)
        self.every_n_steps = every_n_steps
        self.record = record
        self._step_seen = 0  # global step after the previous training batch

    def _save(self, trainer: pl.Trainer) -> None:
        """Full state (optimizer, schedule, loops) to a temporary file, then renamed over `last.ckpt`: a crash while
        writing leaves the previous `last.ckpt` whole. Only global rank 0 writes; `save_checkpoint` ends in a barrier."""
        partial = self.path.with_name(self.path.name + ".part")
        trainer.save_checkpoint(partial, weights_only=False)
        if trainer.is_global_zero:
            os.replace(partial, self.path)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.record is not None:
            checkpoint[RUN_RECORD_KEY] = self.record

    def on_train_start(self, trainer, pl_module) -> None:
        self._step_seen = trainer.global_step  # restored on resume

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        stepped, self._step_seen = step != self._step_seen, step
        if not stepped:
            # Gradients are being accumulated: a checkpoint now would lose them (the resumed run would skip the
            # batches they came from).
            return
        last_step = trainer.max_steps > 0 and step >= trainer.max_steps
        epoch_done = batch_idx + 1 >= trainer.num_training_batches
        if not epoch_done and (last_step or (self.every_n_steps and step % self.every_n_steps == 0)):
            self._save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        if progress.completed >= trainer.num_training_batches:  # ran to its end (not cut by max_steps)
            self._save(trainer)
