"""A feature source over raw images: features are extracted by the detector on first use (optionally cached in a TSV).

For one-step matching on raw images, `ImageFolderFeatureSource` implements the `FeatureSource` interface of
`lxmert_pl.features.sources` (`in`, `get`, `img_ids`, `describe`). Call `prefetch(img_ids, batch_size)` before a
DataLoader iterates over it: all needed images are then extracted up front, in batches, with a progress bar, and the
DataLoader only reads.

The cache TSV answers only for the inputs that made its rows. Its settings (detector weights, selection or given
boxes, geometry, precision, test scale) are recorded in `<cache>.meta.json` (`features.provenance`): a cache made
with other settings is discarded. Each row is keyed in `<cache>.keys.json` by the sha256 of the image file's content
(and of the image's given boxes): an image whose file or boxes changed since (another folder with the same file
names, another boxes file) is extracted again and its old row dropped.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..features.errors import FeatureFileError, MissingImageError
from ..features.lines import repair_tail
from ..features.locking import WriteLock
from ..features.provenance import claim_tsv, read_settings, sidecar_path
from ..features.record import ImageFeatures
from ..features.tsv import TsvReader, TsvWriter, iter_tsv_features, read_img_ids
from ..fileio import write_atomically
from .extraction import (
    boxes_digest,
    extract_batches,
    extraction_settings,
    image_id,
    list_images,
    state_dict_digest,
)
from .loading import load_detector
from .model import BottomUpFasterRCNN
from .selection import OBJ36, BoxSelection

KEYS_SUFFIX = ".keys.json"


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
