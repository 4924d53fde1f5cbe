"""A feature source over raw images: features are extracted by the detector on first use (optionally cached in a TSV).

For one-step matching on raw images, `ImageFolderFeatureSource` implements the `FeatureSource` interface of
`lxmert_pl.features.sources` (`in`, `get`, `img_ids`, `describe`). Call `prefetch(img_ids, batch_size)` before a
DataLoader iterates over it: all needed images are then extracted up front, in batches, with a progress bar, and the
DataLoader only reads.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..features.tsv import MissingImageError, TsvReader, TsvWriter, read_img_ids, repair_truncated
from ..features.types import ImageFeatures
from .extraction import extract_batches, image_id, list_images
from .loading import load_detector
from .model import BottomUpFasterRCNN
from .selection import OBJ36, BoxSelection


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
        cache_path: a TSV where each extracted image is appended once and read back later (also across runs).
            A side file `<cache>.meta.json` records the selection; reusing the cache with other settings raises.
            Without a cache, features are kept in memory.
    """

    def __init__(
        self,
        images: str | Path | Sequence[str | Path],
        detector: BottomUpFasterRCNN | str | Path,
        selection: BoxSelection = OBJ36,
        given_boxes: dict[str, np.ndarray] | None = None,
        cache_path: str | Path | None = None,
    ) -> None:
        self.detector = detector if isinstance(detector, BottomUpFasterRCNN) else load_detector(detector)[0]
        self.selection = selection
        self.given_boxes = given_boxes
        paths = list_images(images)
        self._origin = str(images) if isinstance(images, (str, Path)) else f"{len(paths)} paths"
        self._paths = {image_id(p): p for p in paths if given_boxes is None or image_id(p) in given_boxes}
        self._memory: dict[str, ImageFeatures] = {}
        self.cache_path = None if cache_path is None else Path(cache_path)
        self._cached: set[str] = set()
        self._reader: TsvReader | None = None
        if self.cache_path is not None:
            self._check_cache_settings()
            if self.cache_path.exists():
                repair_truncated(self.cache_path)
                self._cached = set(read_img_ids(self.cache_path))

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
        if img_id not in self._cached:
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
            if img_id not in self._memory and img_id not in self._cached:
                todo.append(img_id)
        if todo:
            self._extract(todo, batch_size, keep_in_memory=self.cache_path is None, progress=True)

    def _extract(self, img_ids: list[str], batch_size: int, keep_in_memory: bool, progress: bool) -> None:
        failures: list[tuple[str, str]] = []
        writer = None if self.cache_path is None else TsvWriter(self.cache_path, append=True, repair=True)

        def write(features: ImageFeatures) -> None:
            if writer is not None:
                writer.write(features)
                self._cached.add(features.img_id)
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
                writer.close()
        if failures:
            listing = "; ".join(f"{path}: {reason}" for path, reason in failures)
            raise ExtractionFailedError(f"{len(failures)} image(s) gave no features: {listing}")

    def _cache_reader(self) -> TsvReader:
        if self._reader is None:
            self._reader = TsvReader(self.cache_path)
        return self._reader

    def _check_cache_settings(self) -> None:
        """The cache must come from the same detector weights, geometry and selection / given-boxes mode (recorded
        beside it); a cache made otherwise is stale: it is discarded (with a message) and extraction starts afresh."""
        meta_path = self.cache_path.with_name(self.cache_path.name + ".meta.json")
        settings = {"selection": self.selection.describe() if self.given_boxes is None else "given boxes",
                    "detector": _weights_fingerprint(self.detector), "geometry": self.detector.geometry}
        if meta_path.exists():
            recorded = json.loads(meta_path.read_text(encoding="utf-8"))
            if recorded == settings:
                return
            print(f"feature cache {self.cache_path} was made with other detector weights or settings: discarded")
            self.cache_path.unlink(missing_ok=True)
        meta_path.parent.mkdir(parents=True, exist_ok=True)
        meta_path.write_text(json.dumps(settings), encoding="utf-8")


def _weights_fingerprint(detector: BottomUpFasterRCNN) -> str:
    """sha1 of every parameter and buffer: identifies the weights that made a cache."""
    digest = hashlib.sha1()
    for name, tensor in detector.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
