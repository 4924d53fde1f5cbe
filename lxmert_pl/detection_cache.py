"""Detections of images, cached by what made them: in memory (LRU) and, optionally, on disk.

A cache key is the sha256 of everything a detection depends on (`detection_key`):

* the image's content: its decoded pixels (BGR uint8, with their shape), so a file, a `PIL.Image` and an array of
  the same picture share one entry, and a file whose content changed is a new key (detected again);
* what made the detections: the detector's weights (sha256 of its files, or of its tensors for a detector built in
  memory), its proposal geometry, RoI-head precision and test scale, and the box selection (`min_boxes`,
  `max_boxes`, thresholds) or the given boxes (their values), via `features.provenance.ExtractionSettings`.

On disk (`cache_dir`), each entry is a one-image feature store (`features.store`, the project's binary format) in
`<cache_dir>/<key[:2]>/<key>/`, written atomically (a temporary directory renamed into place) under the entry's
`features.locking.WriteLock`, so two processes sharing the folder never see half an entry: the one that finds the
lock held leaves the writing to the other. A damaged entry is ignored (detected again and rewritten).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np

from lxmert_pl.features.errors import FeatureFileError, FeatureFileLockedError
from lxmert_pl.features.locking import WriteLock
from lxmert_pl.features.provenance import ExtractionSettings
from lxmert_pl.features.record import ImageFeatures
from lxmert_pl.features.store import FeatureStore, is_feature_store, write_store

DEFAULT_MEMORY_SIZE = 256  # images kept in memory (about 300 KB each with 36 boxes of 2048 floats)
# ExtractionSettings fields that do not change the detections: a display name and the package version.
_NOT_IN_KEY = ("detector", "lxmert_pl_version")


def settings_digest(settings: ExtractionSettings) -> str:
    """sha256 of the settings that determine the detections (not the detector's display name)."""
    fields = {k: v for k, v in dataclasses.asdict(settings).items() if k not in _NOT_IN_KEY}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode("utf-8")).hexdigest()


def detection_key(settings: str, image_bgr: np.ndarray, given_boxes: np.ndarray | None) -> str:
    """The cache key of one image's detections: `settings` (a `settings_digest`), the pixels and the given boxes."""
    digest = hashlib.sha256(settings.encode("ascii"))
    digest.update(repr(tuple(image_bgr.shape)).encode("ascii"))
    digest.update(np.ascontiguousarray(image_bgr, dtype=np.uint8).tobytes())
    if given_boxes is not None:
        digest.update(b"given boxes")
        digest.update(np.ascontiguousarray(given_boxes, dtype="<f4").tobytes())
    return digest.hexdigest()


class DetectionCache:
    """`get(key)` / `put(key, features)`: an LRU of `memory_size` images in memory, backed by `cache_dir` when given.

    `memory_hits`, `disk_hits` and `misses` count the lookups.
    """

    def __init__(self, memory_size: int = DEFAULT_MEMORY_SIZE, cache_dir: str | Path | None = None):
        if memory_size < 0:
            raise ValueError(f"memory_size must be >= 0, got {memory_size}")
        self.memory_size = memory_size
        self.cache_dir = None if cache_dir is None else Path(cache_dir).expanduser()
        self._memory: OrderedDict[str, ImageFeatures] = OrderedDict()
        self.memory_hits = 0
        self.disk_hits = 0
        self.misses = 0

    def describe(self) -> str:
        disk = f", on disk in {self.cache_dir}" if self.cache_dir else ""
        return f"detections cached by image content: {len(self._memory)}/{self.memory_size} in memory{disk}"

    def entry_path(self, key: str) -> Path:
        if self.cache_dir is None:
            raise ValueError("this cache has no cache_dir")
        return self.cache_dir / key[:2] / key

    def get(self, key: str) -> ImageFeatures | None:
        found = self._memory.get(key)
        if found is not None:
            self._memory.move_to_end(key)
            self.memory_hits += 1
            return found
        found = self._read_disk(key)
        if found is not None:
            self.disk_hits += 1
            self._remember(key, found)
            return found
        self.misses += 1
        return None

    def put(self, key: str, features: ImageFeatures, provenance: dict | None = None) -> None:
        """Keep `features` under `key` (in memory, and on disk with a cache_dir; `provenance` goes to its meta)."""
        self._remember(key, features)
        if self.cache_dir is not None:
            self._write_disk(key, features, provenance or {})

    def _remember(self, key: str, features: ImageFeatures) -> None:
        if self.memory_size == 0:
            return
        self._memory[key] = features
        self._memory.move_to_end(key)
        while len(self._memory) > self.memory_size:
            self._memory.popitem(last=False)

    def _read_disk(self, key: str) -> ImageFeatures | None:
        if self.cache_dir is None:
            return None
        entry = self.entry_path(key)
        if not is_feature_store(entry):
            return None
        try:
            store = FeatureStore(entry)
            sources = store.meta.get("sources") or [{}]
            if len(store) != 1 or sources[0].get("key") != key:
                return None
            row = store.get(store.img_ids[0])
        except (FeatureFileError, OSError, ValueError, KeyError):
            return None  # damaged: detected again and rewritten
        # Plain arrays, not views of memory maps: the entry's files are not kept open.
        return dataclasses.replace(row, **{f: np.array(getattr(row, f)) for f in _ARRAY_FIELDS})

    def _write_disk(self, key: str, features: ImageFeatures, provenance: dict) -> None:
        entry = self.entry_path(key)
        entry.parent.mkdir(parents=True, exist_ok=True)
        try:
            lock = WriteLock(entry)
        except FeatureFileLockedError:
            return  # another process is writing this very entry
        with lock:
            if is_feature_store(entry) and self._read_disk(key) is not None:
                return  # written by another process meanwhile
            write_store([dataclasses.replace(features, img_id=key)], entry, [{"key": key, **provenance}])


_ARRAY_FIELDS = ("objects_id", "objects_conf", "attrs_id", "attrs_conf", "boxes", "features")
