"""A feature source over raw images: features are extracted by the detector on first use (optionally cached in a TSV).

For one-step matching on raw images, `ImageFolderFeatureSource` implements the `FeatureSource` interface of
`lxmert_pl.features.sources` (`in`, `get`, `img_ids`, `describe`). Call `prefetch(img_ids, batch_size)` before a
DataLoader iterates over it: all needed images are then extracted up front, in batches, with a progress bar, and the
DataLoader only reads.

With several processes (DDP), `prefetch_shared` splits the distinct images over them as `extract.py --devices N`
does (`sharded.py`): each global rank detects its contiguous share, each distinct image once. With the cache, each
rank writes its share into `<cache>.shardK.tsv` (kept, and resumed, after a killed run), global rank 0 merges the
shards in input order behind a barrier and every rank reads the merged cache; without it, the features go to the
ranks that need them through the process group, in rounds.

The cache TSV answers only for the inputs that made its rows. Its settings (detector weights, selection or given
boxes, geometry, precision, test scale) are recorded in `<cache>.meta.json` (`features.provenance`): a cache made
with other settings is discarded. Each row is keyed in `<cache>.keys.json` by the sha256 of the image file's content
(and of the image's given boxes): an image whose file or boxes changed since (another folder with the same file
names, another boxes file) is extracted again and its old row dropped.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist
from tqdm import tqdm

from ..features.errors import FeatureFileError, MissingImageError
from ..features.lines import repair_tail
from ..features.locking import WriteLock
from ..features.provenance import claim_tsv, read_settings, sidecar_path
from ..features.record import ImageFeatures
from ..features.tsv import TsvReader, TsvWriter, iter_tsv_features, read_img_ids
from ..distributed import on_rank_zero
from ..fileio import write_atomically
from .extraction import (
    boxes_digest,
    extract_batches,
    extraction_settings,
    image_id,
    leftover_shards,
    list_images,
    remove_shards,
    shard_path,
    state_dict_digest,
)
from .loading import load_detector
from .model import BottomUpFasterRCNN
from .selection import OBJ36, BoxSelection
from .sharded import RankRates, ShardPlan, merge_shards, rank_share, resume_shard

KEYS_SUFFIX = ".keys.json"
EXCHANGE_ROUND = 64  # images per rank per round when features are handed between processes (no cache)


class ExtractionFailedError(RuntimeError):
    """Images the detector could not turn into a row (unreadable, or no boxes); the message lists path and reason."""


class ImageFolderFeatureSource:
    """Detector features of image files, by img_id (the file name without its extension).

    Args:
        images: an image folder, a list file (one path per line) or a sequence of paths.
        detector: a loaded `BottomUpFasterRCNN` or a detector directory / weights file for `load_detector`.
        selection: box counts and thresholds (obj36 by default); not used for images with given boxes.
        given_boxes: `{img_id: (R, 4) boxes in original pixels}`: features of these boxes instead of detected ones;
            then only the images that have an entry are part of the source.
        cache_path: a TSV where each extracted image is appended once and read back later (also across runs), as
            long as its file, its given boxes and the settings are the same (see the module docstring). Without a
            cache, features are kept in memory.
    """

    def __init__(
        self,
        images: str | Path | Sequence[str | Path],
        detector: BottomUpFasterRCNN | str | Path,
        selection: BoxSelection = OBJ36,
        given_boxes: dict[str, np.ndarray] | None = None,
        cache_path: str | Path | None = None,
        detector_sha256: dict[str, str] | None = None,
    ) -> None:
        # The weights are identified by their values (`detector_sha256`: of the files the detector was loaded from,
        # `extraction.detector_file_digests`, cached; else of its state dict), never by a name.
        self.detector = detector if isinstance(detector, BottomUpFasterRCNN) else load_detector(detector)[0]
        name = "detector in memory" if isinstance(detector, BottomUpFasterRCNN) else str(detector)
        digests = dict(detector_sha256) if detector_sha256 else {"state_dict": state_dict_digest(self.detector)}
        self.selection = selection
        self.given_boxes = given_boxes
        self.settings = extraction_settings(self.detector, name, digests, selection, given_boxes, None)
        paths = list_images(images)
        self._origin = str(images) if isinstance(images, (str, Path)) else f"{len(paths)} paths"
        self._paths = {image_id(p): p for p in paths if given_boxes is None or image_id(p) in given_boxes}
        self._memory: dict[str, ImageFeatures] = {}
        self._keys: dict[str, str] = {}  # img_id -> input key, computed on demand
        self.cache_path = None if cache_path is None else Path(cache_path)
        self._cached: dict[str, str] = {}  # img_id -> input key of its row in the cache
        self._rows_in_cache: set[str] = set()
        self._reader: TsvReader | None = None
        self._follower = False  # reads a cache another process writes (`follow_cache`)
        self._shard_lock: WriteLock | None = None  # global rank 0 of `prefetch_shared`: from the plan to the merge
        if self.cache_path is not None:
            self._open_cache()

    # ---- FeatureSource interface -----------------------------------------------------------------------------------
    def __contains__(self, img_id: object) -> bool:
        return img_id in self._paths

    @property
    def img_ids(self) -> list[str]:
        return list(self._paths)

    def get(self, img_id: str) -> ImageFeatures:
        """The features of `img_id`: from memory, from the cache TSV, or extracted now (and cached)."""
        if img_id not in self._paths:
            raise MissingImageError(img_id, [self.describe()])
        if img_id in self._memory:
            return self._memory[img_id]
        if not self._is_cached(img_id):
            self._extract([img_id], batch_size=1, keep_in_memory=True, progress=False)
            if img_id in self._memory:
                return self._memory[img_id]
        return self._cache_reader().get(img_id)

    def describe(self) -> str:
        mode = "given boxes" if self.given_boxes is not None else self.selection.describe()
        store = f"cache {self.cache_path} ({len(self._cached):,} cached)" if self.cache_path else "in-memory cache"
        return f"images from {self._origin} ({len(self._paths):,} images, extracted on demand: {mode}; {store})"

    # ---- extraction ------------------------------------------------------------------------------------------------
    def prefetch(self, img_ids: Iterable[str], batch_size: int = 1) -> None:
        """Extract every image of `img_ids` not extracted yet, `batch_size` images per forward pass, with a progress
        bar. Raises MissingImageError for an unknown id and ExtractionFailedError (after extracting all the others)
        for images that produced no row."""
        todo = []
        for img_id in dict.fromkeys(img_ids):
            if img_id not in self._paths:
                raise MissingImageError(img_id, [self.describe()])
            if img_id not in self._memory and not self._is_cached(img_id):
                todo.append(img_id)
        if todo:
            self._extract(todo, batch_size, keep_in_memory=self.cache_path is None or self._follower, progress=True)

    def _extract(self, img_ids: list[str], batch_size: int, keep_in_memory: bool, progress: bool) -> None:
        failures: list[tuple[str, str]] = []
        writer = None
        if self.cache_path is not None and not self._follower:
            self._drop_cached_rows([i for i in img_ids if i in self._rows_in_cache])
            writer = TsvWriter(self.cache_path, append=True, repair=True, settings=self.settings)

        def write(features: ImageFeatures) -> None:
            if writer is not None:
                writer.write(features)
                self._cached[features.img_id] = self._key(features.img_id)
                self._rows_in_cache.add(features.img_id)
                self._reader = None  # the cache grew: re-index on the next read
            if keep_in_memory:
                self._memory[features.img_id] = features

        try:
            with tqdm(total=len(img_ids), unit="img", desc="extract features", disable=not progress) as bar:
                extract_batches(
                    self.detector,
                    [self._paths[i] for i in img_ids],
                    self.selection,
                    self.given_boxes,
                    batch_size,
                    write,
                    lambda path, reason: failures.append((path, reason)),
                    bar.update,
                )
        finally:
            if writer is not None:
                self._save_keys()
                writer.close()
        if failures:
            listing = "; ".join(f"{path}: {reason}" for path, reason in failures)
            raise ExtractionFailedError(f"{len(failures)} image(s) gave no features: {listing}")

    # ---- extraction on several processes ---------------------------------------------------------------------------
    def prefetch_shared(
        self,
        img_ids: Iterable[str],
        batch_size: int,
        trainer: Any,
        cache_path: str | Path | None = None,
        needed: Iterable[str] | None = None,
    ) -> RankRates:
        """`prefetch` by every process of a DDP run together: each distinct image of `img_ids` (the same list in
        every process) not extracted yet is detected once, by the global rank whose share (`sharded.rank_share`)
        holds it. Call it in every process where the process group exists (a `setup` hook); `trainer` is the
        Lightning Trainer (ranks, broadcast).

        With `cache_path` (global rank 0's source is the one made with that cache; the others are made without one):
        each rank writes its share into `<cache>.shardK.tsv`; rank 0 (holding the cache's lock from the plan to the
        merge) appends the shards to the cache in input order, and every rank then reads the cache. A killed run's
        shards are resumed by a rerun with the same images and processes, else discarded. Without a cache: the
        features of `needed` (this rank's images; default all) reach this rank's memory from the ranks that
        detected them, `EXCHANGE_ROUND` images per rank at a time.

        Raises MissingImageError (unknown id) or ExtractionFailedError (images without a row; the others are kept)
        in every process alike. Returns the images and seconds of every rank (`RankRates.describe`)."""
        world, rank = trainer.world_size, trainer.global_rank
        wanted = list(dict.fromkeys(img_ids))
        for img_id in wanted:
            if img_id not in self._paths:
                raise MissingImageError(img_id, [self.describe()])
        rates, failures = RankRates(), []
        if cache_path is None:
            self._exchange(wanted, batch_size, world, rank, set(wanted if needed is None else needed), rates, failures)
        else:
            cache_path = Path(cache_path)
            todo = on_rank_zero(trainer, lambda: self._plan_shards(wanted, world, cache_path))
            shard = shard_path(cache_path, rank)
            present = resume_shard(shard)
            mine = [i for i in rank_share(todo, world, rank) if i not in present]
            if present:
                print(f"rank {rank}: resuming {shard} ({len(present)} rows there, {len(mine)} to detect)")
            with TsvWriter(shard, append=True, repair=True) as writer:
                self._detect(mine, batch_size, writer.write, failures, rates, f"detect [rank {rank}/{world}]")
        every = _all_gather((rates.images, rates.seconds, failures), world)  # also: every shard is closed
        rates.ranks = [(images, seconds) for images, seconds, _ in every]
        if cache_path is not None:
            on_rank_zero(trainer, lambda: self._merge_shards(cache_path, world, todo))
            if rank != 0:
                self.follow_cache(cache_path)
        failed = [failure for _, _, part in every for failure in part]
        if failed:
            listing = "; ".join(f"{path}: {reason}" for path, reason in failed)
            raise ExtractionFailedError(f"{len(failed)} image(s) gave no features: {listing}")
        return rates

    def _detect(self, img_ids: list[str], batch_size: int, write, failures: list, rates: RankRates, desc: str) -> None:
        """Run the detector over `img_ids` (rows to `write`, failures appended), counted and timed in `rates`."""
        rates.start()
        with tqdm(total=len(img_ids), unit="img", desc=desc, disable=not img_ids) as bar:
            extract_batches(
                self.detector, [self._paths[i] for i in img_ids], self.selection, self.given_boxes, batch_size,
                write, lambda path, reason: failures.append((path, reason)), bar.update,
            )  # fmt: skip
        rates.stop()
        rates.add(len(img_ids))

    def _plan_shards(self, wanted: list[str], world: int, cache_path: Path) -> list[str]:
        """Global rank 0: lock the cache (until `_merge_shards`), drop rows of changed images, keep or discard the
        shards of an interrupted run, and list the images still to detect."""
        if self.cache_path is None or self.cache_path.resolve() != cache_path.resolve():
            raise ValueError(f"global rank 0's source must be the one made with the cache {cache_path}")
        self._shard_lock = WriteLock(cache_path)
        try:
            todo = [i for i in wanted if not self._is_cached(i)]
            self._drop_cached_rows([i for i in todo if i in self._rows_in_cache])
            # The plan names the images by content: a rerun resumes the shards only for the same inputs.
            digest = hashlib.sha256("\n".join(f"{i}\t{self._key(i)}" for i in todo).encode("utf-8"))
            plan = ShardPlan(world, digest.hexdigest())
            leftovers = leftover_shards(cache_path)
            if leftovers and ShardPlan.read(cache_path) != plan:
                print(f"feature cache {cache_path}: {len(leftovers)} shard file(s) of an interrupted run with other "
                      "images or another number of processes: discarded")
                remove_shards(leftovers)
            elif leftovers:
                print(f"feature cache {cache_path}: resuming the {len(leftovers)} shard file(s) of an interrupted run")
            plan.write(cache_path)
            print(f"{len(wanted)} images: {len(wanted) - len(todo)} in the feature cache {cache_path}, {len(todo)} to "
                  f"detect on {world} process(es)")
            return todo
        except BaseException:
            self._shard_lock.release()
            raise

    def _merge_shards(self, cache_path: Path, world: int, todo: list[str]) -> None:
        """Global rank 0, once every shard is closed: append them to the cache in input order, record the rows'
        keys, remove the shards, release the lock."""
        try:
            done = set(self._rows_in_cache)
            merge_shards(cache_path, world, done)
            for img_id in todo:
                if img_id in done:
                    self._cached[img_id] = self._key(img_id)
            self._rows_in_cache = done
            self._save_keys()
            self._reader = None
        finally:
            self._shard_lock.release()

    def _exchange(self, wanted: list[str], batch_size: int, world: int, rank: int, needed: set[str],
                  rates: RankRates, failures: list) -> None:
        """No cache: detect this rank's share, `EXCHANGE_ROUND` images at a time; after each round every rank
        keeps, of the rows of all ranks, those it needs."""
        share = rank_share(wanted, world, rank)
        longest = math.ceil(len(wanted) / world)  # the same number of rounds in every rank
        for first in range(0, longest, EXCHANGE_ROUND):
            chunk = share[first : first + EXCHANGE_ROUND]
            rows = [self._memory[i] for i in chunk if i in self._memory]
            self._detect([i for i in chunk if i not in self._memory], batch_size, rows.append, failures, rates,
                         f"detect [rank {rank}/{world}]")
            for part in _all_gather(rows, world):
                for features in part:
                    if features.img_id in needed:
                        self._memory[features.img_id] = features

    def _cache_reader(self) -> TsvReader:
        if self._reader is None:
            self._reader = TsvReader(self.cache_path)
        return self._reader

    # ---- cache identity --------------------------------------------------------------------------------------------
    def _key(self, img_id: str) -> str:
        """sha256 of the image file's bytes (and of its given boxes): what a cached row must have been made from."""
        key = self._keys.get(img_id)
        if key is None:
            digest = hashlib.sha256(self._paths[img_id].read_bytes())
            if self.given_boxes is not None:
                digest.update(boxes_digest(self.given_boxes[img_id]).encode("ascii"))
            key = self._keys[img_id] = digest.hexdigest()
        return key

    def _is_cached(self, img_id: str) -> bool:
        recorded = self._cached.get(img_id)
        return recorded is not None and recorded == self._key(img_id)

    def _keys_path(self) -> Path:
        return self.cache_path.with_name(self.cache_path.name + KEYS_SUFFIX)

    def _save_keys(self) -> None:
        write_atomically(self._keys_path(), json.dumps(self._cached, indent=0, sort_keys=True))

    def _open_cache(self) -> None:
        """Read the cache's settings and row keys; a cache made with other settings is discarded (with a message)."""
        cache = self.cache_path
        cache.parent.mkdir(parents=True, exist_ok=True)
        with WriteLock(cache):
            has_rows = cache.exists() and cache.stat().st_size > 0
            if has_rows and sidecar_path(cache).exists():
                try:
                    recorded = read_settings(cache)
                    differences = recorded.differences(self.settings)
                except FeatureFileError as err:
                    differences = [str(err)]
                if differences:
                    print(f"feature cache {cache} was made with other settings ({'; '.join(differences)}): discarded")
                    for stale in (cache, self._keys_path(), sidecar_path(cache), cache.with_name(cache.name + ".idx")):
                        stale.unlink(missing_ok=True)
                    has_rows = False
            claim_tsv(cache, self.settings, has_rows=has_rows)  # a cache with rows and no settings: refused
            if not has_rows:
                self._keys_path().unlink(missing_ok=True)
                return
            repair_tail(cache)
            self._read_cache_index()

    def _read_cache_index(self) -> None:
        self._rows_in_cache = set(read_img_ids(self.cache_path)) if self.cache_path.exists() else set()
        try:
            keys = json.loads(self._keys_path().read_text(encoding="utf-8"))
        except (OSError, ValueError):
            keys = {}  # rows without keys are not trusted: they are extracted again
        self._cached = {i: str(keys[i]) for i in self._rows_in_cache if isinstance(keys, dict) and i in keys}
        self._reader = None

    def follow_cache(self, cache_path: str | Path) -> None:
        """Read from `cache_path`, a cache another process (global rank 0 of a DDP run) has just filled with the same
        settings, without ever writing it: images it lacks are extracted in memory. For a source made without a
        cache."""
        self.cache_path = Path(cache_path)
        self._follower = True
        self._read_cache_index()

    def _drop_cached_rows(self, img_ids: list[str]) -> None:
        """Rewrite the cache without the rows of `img_ids` (made from inputs that have changed since)."""
        if not img_ids:
            return
        dropped = set(img_ids)
        with WriteLock(self.cache_path):
            temp = self.cache_path.with_name(f".{self.cache_path.name}.rewrite")
            with TsvWriter(temp, append=False) as writer:
                for row in iter_tsv_features(self.cache_path):
                    if row.img_id not in dropped:
                        writer.write(row)
            temp.replace(self.cache_path)
            temp.with_name(temp.name + ".lock").unlink(missing_ok=True)
        self._rows_in_cache -= dropped
        for img_id in dropped:
            self._cached.pop(img_id, None)
        self._reader = None


def _all_gather(obj: Any, world: int) -> list[Any]:
    """`obj` of every rank, in rank order (a collective of the initialised process group; `[obj]` alone)."""
    if world == 1:
        return [obj]
    every: list[Any] = [None] * world
    dist.all_gather_object(every, obj)
    return every
