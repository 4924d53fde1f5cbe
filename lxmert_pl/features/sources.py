"""Feature sources: one interface over TSV files, binary stores and several of them merged.

`open_feature_source` takes paths (a `.tsv` file, a store directory, or a glob such as `val2014_obj36_*.tsv`) and
returns a `FeatureSource`. Every source is picklable and opens its files lazily in each process, so it can be
handed to DataLoader workers and DDP processes.
"""

from __future__ import annotations

import glob
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from lxmert_pl.features.store import FeatureStore, is_feature_store
from lxmert_pl.features.errors import DuplicateImageIdError, MissingImageError
from lxmert_pl.features.record import ImageFeatures
from lxmert_pl.features.tsv import TsvReader

_GLOB_CHARACTERS = "*?["


@runtime_checkable
class FeatureSource(Protocol):
    """Detections of images by img_id."""

    def __contains__(self, img_id: str) -> bool: ...

    def get(self, img_id: str) -> ImageFeatures:
        """The features of `img_id`; MissingImageError (a KeyError) naming it and the sources searched if absent."""
        ...

    @property
    def img_ids(self) -> list[str]: ...

    def describe(self) -> str:
        """A short human description, e.g. "2 TSV files (1,234 images)"."""
        ...


def _kind_of(source: FeatureSource) -> str:
    if isinstance(source, TsvReader):
        return "TSV file"
    if isinstance(source, FeatureStore):
        return "feature store"
    return type(source).__name__


def _location_in(source: FeatureSource, img_id: str) -> str:
    locate = getattr(source, "location", None)
    return locate(img_id) if locate is not None else source.describe()


def iter_source_features(source: FeatureSource) -> Iterator[ImageFeatures]:
    """Every image of `source`: by its sequential `iter_features` when it has one, else by `get` per img_id."""
    sequential = getattr(source, "iter_features", None)
    return sequential() if sequential is not None else (source.get(img_id) for img_id in source.img_ids)


class MergedFeatureSource:
    """Several sources as one; an img_id held by two of them is an error naming both places."""

    def __init__(self, sources: Sequence[FeatureSource]):
        if not sources:
            raise ValueError("MergedFeatureSource needs at least one source")
        self.sources = list(sources)
        self._owner: dict[str, int] = {}
        for position, source in enumerate(self.sources):
            for img_id in source.img_ids:
                first = self._owner.setdefault(img_id, position)
                if first != position:
                    raise DuplicateImageIdError(
                        f"img_id {img_id!r} is in two feature sources: "
                        f"{_location_in(self.sources[first], img_id)} and {_location_in(source, img_id)}"
                    )

    def __len__(self) -> int:
        return len(self._owner)

    def __contains__(self, img_id: object) -> bool:
        return img_id in self._owner

    @property
    def img_ids(self) -> list[str]:
        return list(self._owner)

    def get(self, img_id: str) -> ImageFeatures:
        position = self._owner.get(img_id)
        if position is None:
            raise MissingImageError(img_id, [source.describe() for source in self.sources])
        return self.sources[position].get(img_id)

    def location(self, img_id: str) -> str:
        return _location_in(self.sources[self._owner[img_id]], img_id)

    def describe(self) -> str:
        counts: dict[str, int] = {}
        for source in self.sources:
            counts[_kind_of(source)] = counts.get(_kind_of(source), 0) + 1
        kinds = " + ".join(f"{count} {kind}{'s' if count > 1 else ''}" for kind, count in counts.items())
        return f"{kinds} ({len(self):,} images)"

    def iter_features(self) -> Iterator[ImageFeatures]:
        """Every image, source by source, each in its fastest sequential order."""
        for source in self.sources:
            yield from iter_source_features(source)


def expand_feature_paths(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """Paths as given, glob patterns expanded (sorted), each file once (a pattern and a path may overlap).

    A pattern that matches nothing is an error.
    """
    given = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not given:
        raise ValueError("no feature paths given")
    expanded: dict[Path, Path] = {}  # resolved -> as given, in order
    for path in given:
        text = str(path)
        if not Path(text).exists() and any(char in text for char in _GLOB_CHARACTERS):
            matches = sorted(glob.glob(text))
            if not matches:
                raise FileNotFoundError(f"no feature file matches {text!r}")
        else:
            matches = [text]
        for match in matches:
            expanded.setdefault(Path(match).resolve(), Path(match))
    return list(expanded.values())


def _open_one(path: Path, cache_dir: str | Path | None) -> FeatureSource:
    if path.is_dir():
        if not is_feature_store(path):
            raise FileNotFoundError(
                f"{path} is a directory but not a feature store (no meta.json); pass TSV files or a glob instead"
            )
        return FeatureStore(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature source not found: {path}")
    return TsvReader(path, cache_dir)


def open_feature_source(paths: str | Path | Sequence[str | Path], cache_dir: str | Path | None = None) -> FeatureSource:
    """Open TSV files and/or store directories as one source (indexes are built or refreshed as needed)."""
    sources = [_open_one(path, cache_dir) for path in expand_feature_paths(paths)]
    return sources[0] if len(sources) == 1 else MergedFeatureSource(sources)
