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

A rank with nothing to do (more processes than images left, or its shard complete on resume) runs an empty step and
waits at the barrier with the others. Ctrl-C ends the run with `InterruptedRunError` (the CLI: "interrupted", exit
130) saying what is on disk; the same command resumes. `rank_share`, `resume_shard`, `merge_shards` and
`RankRates` are the pieces of this protocol that the one-step image cache (`image_source.py`) shares.
`run_extraction` is the entry point (extract.py): it loads the detector and runs this module on a Trainer.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, TypeVar

import numpy as np
import pytorch_lightning as pl
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data.sampler import UnpaddedDistributedSampler
from ..distributed import on_rank_zero
from ..errors import ConfigError, InterruptedRunError, UserInputError
from ..features.lines import repair_truncated
from ..features.locking import WriteLock
from ..features.provenance import ExtractionSettings
from ..features.record import ImageFeatures
from ..features.tsv import TsvWriter, read_img_ids
from ..fileio import write_atomically
from .extraction import (
    ExtractionJob,
    ExtractionResult,
    boxes_digest,
    detector_file_digests,
    extract_batches,
    extraction_settings,
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
from .loading import load_detector
from .model import BottomUpFasterRCNN
from .selection import BoxSelection

T = TypeVar("T")


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


def rank_share(todo: Sequence[T], world: int, rank: int) -> list[T]:
    """Global rank `rank`'s contiguous slice of `todo` (`UnpaddedDistributedSampler`'s: no padding, the slices in
    rank order are `todo` in order; a slice may be empty when there are more processes than items)."""
    sampler = UnpaddedDistributedSampler(todo, num_replicas=world, rank=rank)
    return list(todo[sampler.start : sampler.stop])


def resume_shard(shard: Path) -> set[str]:
    """The img_ids of the complete rows of `shard`, a rank's shard file left by an interrupted run with the same
    plan (its partial last line cut away); empty when there is none."""
    if not shard.exists():
        return set()
    repair_truncated(shard)
    return set(read_img_ids(shard))


def merge_shards(out: Path, world: int, done: set[str]) -> tuple[int, list[tuple[str, str]]]:
    """Rank 0, once every rank has closed its shard: append the rows of `<out>.shardK.tsv` (K = 0..world-1, so in
    input order) whose img_id is not in `done` to `out` (`done` is updated), read and remove the shards' skipped
    lists, remove the shards and the plan. Returns (rows appended, skipped (path, reason) in input order)."""
    shards = [shard_path(out, k) for k in range(world)]
    written = merge_tsv_rows([s for s in shards if s.exists()], out, done)
    skipped: list[tuple[str, str]] = []
    for k in range(world):
        part = shard_skipped_path(out, k)
        if part.exists():
            for line in part.read_text(encoding="utf-8").splitlines():
                path, _, reason = line.partition("\t")
                skipped.append((path, reason))
            part.unlink()
    remove_shards(shards)
    plan_path(out).unlink(missing_ok=True)
    return written, skipped


@dataclass
class RankRates:
    """Images each rank extracted and how long it took: "images per second per rank and overall".

    Each rank counts its own (`start`, `add`, `stop`); `gather` brings every rank's (count, seconds) to all of
    them (a collective: call it in every process); `describe` is the line rank 0 prints."""

    images: int = 0
    seconds: float = 0.0
    _started: float | None = None
    ranks: list[tuple[int, float]] = field(default_factory=list)

    def start(self) -> None:
        self._started = time.perf_counter()

    def add(self, count: int) -> None:
        self.images += count

    def stop(self) -> None:
        if self._started is not None:
            self.seconds += time.perf_counter() - self._started
            self._started = None

    def gather(self, world: int) -> None:
        local = (self.images, self.seconds)
        if world > 1 and dist.is_available() and dist.is_initialized():
            every: list = [None] * world
            dist.all_gather_object(every, local)
            self.ranks = [tuple(x) for x in every]
        else:
            self.ranks = [local]

    def describe(self, what: str = "extracted") -> str:
        total = sum(n for n, _ in self.ranks)
        wall = max((s for _, s in self.ranks), default=0.0)
        overall = f"{total / wall:.1f} img/s overall" if wall > 0 else "no time"
        parts = [f"rank {k}: {n} ({n / s:.1f} img/s)" if n and s > 0 else f"rank {k}: {n}"
                 for k, (n, s) in enumerate(self.ranks)]
        return f"{what} {total} images on {len(self.ranks)} process(es) in {wall:.1f} s, {overall}; {', '.join(parts)}"


class _NoteInterrupts:
    """Notes whether SIGINT (Ctrl-C) arrived while the run was on, then lets the previous handler act on it (Python's
    raises KeyboardInterrupt); `restore()` puts that handler back. Not in the main thread: notes nothing."""

    def __init__(self) -> None:
        self.seen = False
        self._previous = None
        try:
            self._previous = signal.signal(signal.SIGINT, self._note)
        except ValueError:  # signals are for the main thread only
            self._previous = None

    def _note(self, signum: int, frame) -> None:
        self.seen = True
        if callable(self._previous):
            self._previous(signum, frame)
        elif self._previous != signal.SIG_IGN:
            raise KeyboardInterrupt

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


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
        self.rates = RankRates()
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
        interrupted = _NoteInterrupts()
        try:
            try:
                trainer.predict(self, return_predictions=False)
            except SystemExit:
                if trainer.interrupted:  # Lightning turns Ctrl-C into a graceful shutdown and sys.exit(1)
                    raise KeyboardInterrupt from None
                raise
            self._finish(trainer)
        except KeyboardInterrupt:
            raise InterruptedRunError(self._interrupted_report()) from None
        except Exception:
            # Ctrl-C reaches every process: one waiting at the gather for the others sees them end first.
            if not interrupted.seen:
                raise
            raise InterruptedRunError(self._interrupted_report()) from None
        finally:
            interrupted.restore()
            self._close()
        return self.result

    def _interrupted_report(self) -> str:
        """What an interrupted run leaves on disk: only whole rows count (a partial last line is cut on resume)."""
        shards = leftover_shards(self.out)
        if shards:
            kept = (f"the rows extracted so far are in the shard files {self.out.name}.shard0.tsv .. "
                    f"shard{len(shards) - 1}.tsv beside {self.out} ({len(self.paths) - self.result.already_done} "
                    "images were to do)")
        else:
            written = self._writer.rows_written if self._writer is not None else self.result.written
            kept = f"{self.out} holds {self.result.already_done + written} of {len(self.paths)} images"
        return f"{kept}. Run the same command again to extract the rest (finished rows are kept)"

    def setup(self, stage: str) -> None:
        """Rank 0 opens the output and plans; every rank opens its shard (the process group exists here)."""
        world, rank = self.trainer.world_size, self.trainer.global_rank
        todo_indices, self.result.already_done = on_rank_zero(self.trainer, lambda: self._plan(world))
        mine = rank_share([self.paths[i] for i in todo_indices], world, rank)
        target = self.out if world == 1 else shard_path(self.out, rank)
        present = resume_shard(target) if world > 1 else set()  # a shard of the same plan: resume it
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
        # DistributedSampler (whatever the Trainer's `use_distributed_sampler`). A rank with nothing left gets one
        # empty item (None): Lightning refuses a loader without batches on one rank, and the rank still has to reach
        # the barrier of `_finish`.
        items: list[Path | None] = list(self._remaining) or [None]
        sampler = UnpaddedDistributedSampler(items, num_replicas=1, rank=0)
        return DataLoader(items, batch_size=self.job.batch_size, sampler=sampler, collate_fn=list)

    def on_predict_epoch_start(self) -> None:
        self.rates.start()

    def on_predict_epoch_end(self) -> None:
        self.rates.stop()

    def predict_step(self, batch: list[Path | None], batch_idx: int) -> int:
        """Extract one batch into this rank's file; returns its number of images (not kept: rows go to the file)."""
        paths = [p for p in batch if p is not None]
        extract_batches(
            self.detector, paths, self.job.selection, self.job.given_boxes, max(len(paths), 1),
            self._write, self._skip, self._bar.update,
        )  # fmt: skip
        self.rates.add(len(paths))
        return len(paths)

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
        self.rates.gather(world)  # a collective: every rank waits here for the slowest one (the shards are closed)
        if world > 1:
            if trainer.global_rank == 0:
                self.result.written, self.result.skipped = merge_shards(self.out, world, self._done)
                with open(skipped_path(self.out), "w", encoding="utf-8") as merged:
                    merged.writelines(skip_line(path, reason) for path, reason in self.result.skipped)
        if trainer.global_rank == 0:
            if any(count for count, _ in self.rates.ranks):
                self.log(self.rates.describe())
            listed = skipped_path(self.out)
            if not self.result.skipped:
                listed.unlink(missing_ok=True)
            where = f" (listed in {listed})" if self.result.skipped else ""
            self.log(f"wrote {self.result.written} rows to {self.out}; skipped {len(self.result.skipped)} image(s)"
                     f"{where}")

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


def run_extraction(
    paths: Sequence[Path],
    out: str | Path,
    detector: str | Path,
    selection: BoxSelection,
    given_boxes: dict[str, np.ndarray] | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    detector_config: str | Path | None = None,
    log: Callable[[str], None] = print,
    geometry: str | None = None,
    precision: str = "fp32",
    trainer: pl.Trainer | None = None,
) -> ExtractionResult:
    """Extract every image of `paths` not yet in `out` (see the module docstring for the guarantees), with the
    detector's `geometry` ("port" or "caffe", `geometry.py`) and `precision` ("fp32" or "bf16": the RoI head's res5
    in bfloat16; proposals and outputs float32).

    `trainer` places the work (`sharded.ShardedExtraction`): its devices and nodes, one process each, extract
    their share of the images; call this function in every process (the `ddp` strategy, torchrun, SLURM). Without
    a trainer: one process on `device` ("cpu" or "cuda"). Returns the counts of this process (on global rank 0:
    of the whole run)."""
    out = Path(out)
    if not paths:
        raise UserInputError(f"no images to extract into {out}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    trainer = trainer or single_process_trainer(device)
    _prepare_output_folder(out)
    job = ExtractionJob(selection, given_boxes, batch_size)

    # Loaded on the CPU; Lightning moves it to this process's device. Every process loads it (checks the checkpoint).
    model, report = load_detector(
        detector, config=detector_config, device="cpu", geometry=geometry, precision=precision
    )
    if trainer.is_global_zero:
        log(report.summary())
    settings = extraction_settings(
        model, str(detector), detector_file_digests(report), selection, given_boxes,
        None if given_boxes is None else boxes_digest(given_boxes),
    )  # fmt: skip
    return ShardedExtraction(model, paths, out, settings, job, log).run(trainer)


def _prepare_output_folder(out: Path) -> None:
    """UserInputError naming `out` for an output path that is a folder, lies under a file, or cannot be written."""
    if out.is_dir():
        raise UserInputError(f"--out {out} is a directory; give a file path, such as {out / 'features.tsv'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [out.parent, *out.parent.parents] if p.exists() and not p.is_dir()), out.parent)
        raise UserInputError(f"cannot create the folder of --out {out}: {blocker} is a file") from None
    except PermissionError as error:
        raise UserInputError(f"cannot create the folder of --out {out}: {error}") from None
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise UserInputError(f"cannot write --out {out}: permission denied")
