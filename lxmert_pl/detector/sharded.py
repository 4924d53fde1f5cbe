"""Extraction on Lightning's predict loop: every process of a Trainer (global rank K of W, on any node) extracts its
share of the images; no process pool of our own.

    module = ShardedExtraction(model, paths, out, settings, job, log)
    result = module.run(trainer)        # in every process: ddp, torchrun, SLURM

Global rank 0 owns the output (for the whole run it holds `<out>.lock`, on a file system every node sees): in
`setup` it checks and repairs the output, decides what is left to do and broadcasts it; each rank then extracts the
contiguous slice K of that list (`UnpaddedDistributedSampler`'s shard: no padding, concatenation in rank order is
input order) into `<out>.shardK.tsv`, and its skipped images into `<out>.shardK.skipped.txt`. With one process the
rows go straight into the output. After the predict loop every rank waits at a barrier, then rank 0 appends the
shards to the output in rank order (input order) and removes them.

Resume: the plan of a sharded run (world size + sha256 of the img_ids left to do) is written to
`<out>.shards.json`. A rerun that makes the same plan (same command, same number of processes, output unchanged)
resumes every shard where it stopped, so the output ends byte for byte as an uninterrupted run's (at batch size 1;
batches of other sizes may group images differently after the cut). Any other rerun first merges the leftover
shards into the output (without duplicates), then splits what is left anew.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import pytorch_lightning as pl
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data.sampler import UnpaddedDistributedSampler
from ..distributed import on_rank_zero
from ..errors import ConfigError
from ..features.lines import repair_truncated
from ..features.locking import WriteLock
from ..features.provenance import ExtractionSettings
from ..features.record import ImageFeatures
from ..features.tsv import TsvWriter, read_img_ids
from ..fileio import write_atomically
from .extraction import (
    ExtractionJob,
    ExtractionResult,
    extract_batches,
    image_id,
    leftover_shards,
    merge_leftover_shards,
    merge_tsv_rows,
    open_output,
    remove_shards,
    shard_path,
    skip_line,
    skipped_path,
)
from .model import BottomUpFasterRCNN


def plan_path(out: Path) -> Path:
    return out.with_name(f"{out.name}.shards.json")


def shard_skipped_path(out: Path, k: int) -> Path:
    return out.with_name(f"{out.name}.shard{k}.skipped.txt")


@dataclass(frozen=True)
class ShardPlan:
    """How a sharded run split its work: a rerun with the same plan finds each rank's images in the same shard."""

    world_size: int
    todo_sha256: str

    @classmethod
    def of(cls, world_size: int, todo: Sequence[Path]) -> ShardPlan:
        digest = hashlib.sha256("\n".join(image_id(p) for p in todo).encode("utf-8"))
        return cls(world_size, digest.hexdigest())

    @classmethod
    def read(cls, out: Path) -> ShardPlan | None:
        try:
            return cls(**json.loads(plan_path(out).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError):
            return None

    def write(self, out: Path) -> None:
        write_atomically(plan_path(out), json.dumps(asdict(self)))


def single_process_trainer(device: str = "cpu") -> pl.Trainer:
    """The Trainer of a one-process run on `device` ("cpu" or "cuda")."""
    return pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu", devices=1, num_nodes=1, logger=False,
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
        use_distributed_sampler=False,
    )  # fmt: skip


class ShardedExtraction(pl.LightningModule):
    """The images of `paths` missing from `out`, extracted by every process of a Trainer into one TSV.

    Args:
        model: the detector (on the CPU; Lightning moves it to each process's device).
        paths: every image of the run, in output order.
        out: the output TSV.
        settings: the provenance of the rows (`features.provenance`), checked against `out` and recorded with it.
        job: selection, given boxes and batch size.
        log: where rank 0's messages go.
    """

    def __init__(
        self,
        model: BottomUpFasterRCNN,
        paths: Sequence[Path],
        out: Path,
        settings: ExtractionSettings,
        job: ExtractionJob,
        log: Callable[[str], None] = print,
    ) -> None:
        super().__init__()
        self.detector = model
        self.paths = list(paths)
        self.out = Path(out)
        self.settings = settings
        self.job = job
        self.log = log
        self.result = ExtractionResult()
        self._done: set[str] = set()  # rank 0: img_ids in the output
        self._remaining: list[Path] = []  # this rank's images still to extract
        self._lock: WriteLock | None = None
        self._writer: TsvWriter | None = None
        self._skipped_file: IO[str] | None = None
        self._bar: tqdm | None = None

    # ---- the run ---------------------------------------------------------------------------------------------------
    def run(self, trainer: pl.Trainer) -> ExtractionResult:
        """Extract with `trainer` (in every process of the run); returns this process's counts (rank 0: the run's)."""
        launcher = getattr(trainer.strategy, "launcher", None)
        if launcher is not None and not type(launcher).__name__.startswith("_SubprocessScript"):
            raise ConfigError(
                f"strategy {type(trainer.strategy).__name__} starts its processes from inside the run, so the output "
                "cannot be merged after it: use strategy=ddp (or torchrun / SLURM)"
            )
        try:
            trainer.predict(self, return_predictions=False)
            self._finish(trainer)
        finally:
            self._close()
        return self.result

    def setup(self, stage: str) -> None:
        """Rank 0 opens the output and plans; every rank opens its shard (the process group exists here)."""
        world, rank = self.trainer.world_size, self.trainer.global_rank
        todo_indices, self.result.already_done = on_rank_zero(self.trainer, lambda: self._plan(world))
        todo = [self.paths[i] for i in todo_indices]
        sampler = UnpaddedDistributedSampler(todo, num_replicas=world, rank=rank)
        mine = todo[sampler.start : sampler.stop]
        target = self.out if world == 1 else shard_path(self.out, rank)
        present: set[str] = set()
        if world > 1 and target.exists():  # a shard of the same plan: resume it
            repair_truncated(target)
            present = set(read_img_ids(target))
        self._remaining = [p for p in mine if image_id(p) not in present]
        if present and self._remaining != mine:
            print(f"rank {rank}: resuming {target} ({len(mine) - len(self._remaining)} of {len(mine)} rows there)")
        self._writer = TsvWriter(target, append=True, repair=world > 1, settings=self.settings if world == 1 else None)
        skipped = skipped_path(self.out) if world == 1 else shard_skipped_path(self.out, rank)
        self._skipped_file = open(skipped, "w", encoding="utf-8")
        desc = "extract" if world == 1 else f"extract [rank {rank}/{world}]"
        self._bar = tqdm(total=len(self._remaining), unit="img", desc=desc, dynamic_ncols=True)

    def _plan(self, world: int) -> tuple[list[int], int]:
        """Rank 0: lock and check the output, merge or keep the leftover shards, and list what is left to do."""
        self._lock = WriteLock(self.out)
        try:
            return self._plan_locked(world)
        except BaseException:
            self._close()
            raise

    def _plan_locked(self, world: int) -> tuple[list[int], int]:
        out = self.out
        self._done = open_output(out, self.settings, self.log)
        todo = [p for p in self.paths if image_id(p) not in self._done]
        plan = ShardPlan.of(world, todo)
        if leftover_shards(out) and (world == 1 or ShardPlan.read(out) != plan):
            merge_leftover_shards(out, self._done, self.log)
            todo = [p for p in self.paths if image_id(p) not in self._done]
            plan = ShardPlan.of(world, todo)
        elif leftover_shards(out):
            self.log(f"resuming the {len(leftover_shards(out))} shard file(s) of an interrupted run with the same plan")
        if world > 1:
            plan.write(out)
        else:
            plan_path(out).unlink(missing_ok=True)
        already = len(self.paths) - len(todo)
        self.log(
            f"{len(self.paths)} images: {already} already in {out}, {len(todo)} to extract "
            f"({self.job.selection.describe() if self.job.given_boxes is None else 'given boxes'}, "
            f"batch {self.job.batch_size}, {world} process(es) on {self.trainer.strategy.root_device.type})"
        )
        wanted = {image_id(p) for p in todo}
        return [i for i, p in enumerate(self.paths) if image_id(p) in wanted], already

    # ---- the predict loop ------------------------------------------------------------------------------------------
    def predict_dataloader(self) -> DataLoader:
        # The share is this rank's already: a sampler of one replica keeps it whole, and Lightning never replaces a
        # DistributedSampler (whatever the Trainer's `use_distributed_sampler`).
        sampler = UnpaddedDistributedSampler(self._remaining, num_replicas=1, rank=0)
        return DataLoader(self._remaining, batch_size=self.job.batch_size, sampler=sampler, collate_fn=list)

    def predict_step(self, batch: list[Path], batch_idx: int) -> int:
        """Extract one batch into this rank's file; returns its number of images (not kept: rows go to the file)."""
        extract_batches(
            self.detector, batch, self.job.selection, self.job.given_boxes, len(batch),
            self._write, self._skip, self._bar.update,
        )  # fmt: skip
        return len(batch)

    def _write(self, features: ImageFeatures) -> None:
        self._writer.write(features)
        self.result.written += 1

    def _skip(self, path: str, reason: str) -> None:
        self.result.skipped.append((path, reason))
        self._skipped_file.write(skip_line(path, reason))
        self._skipped_file.flush()
        self._bar.set_postfix(skipped=len(self.result.skipped))

    # ---- the end ---------------------------------------------------------------------------------------------------
    def _finish(self, trainer: pl.Trainer) -> None:
        """Close this rank's files; wait for every rank; rank 0 merges the shards and the skipped lists."""
        self._close_files()
        world = trainer.world_size
        if world > 1:
            trainer.strategy.barrier("extraction shards written")
            if trainer.global_rank == 0:
                self._merge_shards(world)
        if trainer.global_rank == 0:
            listed = skipped_path(self.out)
            if not self.result.skipped:
                listed.unlink(missing_ok=True)
            where = f" (listed in {listed})" if self.result.skipped else ""
            self.log(f"wrote {self.result.written} rows to {self.out}; skipped {len(self.result.skipped)} image(s)"
                     f"{where}")

    def _merge_shards(self, world: int) -> None:
        shards = [shard_path(self.out, k) for k in range(world)]
        self.result.written = merge_tsv_rows([s for s in shards if s.exists()], self.out, self._done)
        self.result.skipped = []
        with open(skipped_path(self.out), "w", encoding="utf-8") as merged:
            for k in range(world):
                part = shard_skipped_path(self.out, k)
                if part.exists():
                    for line in part.read_text(encoding="utf-8").splitlines(keepends=True):
                        merged.write(line)
                        path, _, reason = line.rstrip("\n").partition("\t")
                        self.result.skipped.append((path, reason))
                    part.unlink()
        remove_shards(shards)
        plan_path(self.out).unlink(missing_ok=True)

    def _close_files(self) -> None:
        for handle in (self._writer, self._skipped_file, self._bar):
            if handle is not None:
                handle.close()
        self._writer = self._skipped_file = self._bar = None

    def _close(self) -> None:
        self._close_files()
        if self._lock is not None:
            self._lock.release()
            self._lock = None
