"""Byte-offset index of a feature TSV: where each row lies, so that a reader can fetch one row with one `pread`.

`build_index` scans the file once, sequentially, and records for every row its img_id, byte offset, byte length and
line number. The index is saved as JSON beside the TSV (`<file>.idx`) or, when that folder is not writable, under a
cache directory; it is reused while the TSV's size and mtime are unchanged, and rebuilt otherwise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lxmert_pl.features.errors import DuplicateImageIdError, FeatureFileError
from lxmert_pl.features.lines import (
    READ_BUFFER_BYTES,
    img_id_of_line,
    is_blank,
    is_complete_row,
    iter_lines,
    truncation_error,
)
from lxmert_pl.fileio import write_atomically

logger = logging.getLogger(__name__)

INDEX_SUFFIX = ".idx"
_INDEX_FORMAT = "lxmert_pl.tsv_index"
_INDEX_VERSION = 1


@dataclass
class TsvIndex:
    """Where each row of one TSV lies, and the size/mtime of the TSV it was built from."""

    tsv_path: str  # absolute
    tsv_size: int
    tsv_mtime_ns: int
    img_ids: list[str]
    offsets: np.ndarray  # int64 byte offset of each row
    lengths: np.ndarray  # int64 byte length of each row, line terminator included
    line_numbers: np.ndarray  # int64, from 1

    def matches(self, stat: os.stat_result) -> bool:
        return stat.st_size == self.tsv_size and stat.st_mtime_ns == self.tsv_mtime_ns

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": _INDEX_FORMAT,
                "version": _INDEX_VERSION,
                "tsv_path": self.tsv_path,
                "tsv_size": self.tsv_size,
                "tsv_mtime_ns": self.tsv_mtime_ns,
                "img_ids": self.img_ids,
                "offsets": self.offsets.tolist(),
                "lengths": self.lengths.tolist(),
                "line_numbers": self.line_numbers.tolist(),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> TsvIndex:
        """Raises ValueError/KeyError/TypeError for anything but a consistent index of this version."""
        content = json.loads(text)
        if content.get("format") != _INDEX_FORMAT or content.get("version") != _INDEX_VERSION:
            raise ValueError(f"not a version-{_INDEX_VERSION} {_INDEX_FORMAT} file")
        index = cls(
            tsv_path=str(content["tsv_path"]),
            tsv_size=int(content["tsv_size"]),
            tsv_mtime_ns=int(content["tsv_mtime_ns"]),
            img_ids=[str(img_id) for img_id in content["img_ids"]],
            offsets=np.asarray(content["offsets"], dtype=np.int64),
            lengths=np.asarray(content["lengths"], dtype=np.int64),
            line_numbers=np.asarray(content["line_numbers"], dtype=np.int64),
        )
        if not len(index.img_ids) == len(index.offsets) == len(index.lengths) == len(index.line_numbers):
            raise ValueError("columns of different lengths")
        return index


def build_index(path: str | Path) -> TsvIndex:
    """Index a TSV with one sequential scan (no decoding).

    A last row without its final newline is indexed when it decodes completely. Raises TruncatedTsvError for a
    partial last line, DuplicateImageIdError naming both lines, and
    FeatureFileError for a line without an img_id field or a file that changed during the scan.
    """
    path = Path(path)
    stat_before = path.stat()
    img_ids: list[str] = []
    offsets: list[int] = []
    lengths: list[int] = []
    line_numbers: list[int] = []
    first_line_of: dict[str, int] = {}
    with open(path, "rb", buffering=READ_BUFFER_BYTES) as handle:
        for line_no, offset, line in iter_lines(handle):
            if not line.endswith(b"\n") and not is_complete_row(line):
                raise truncation_error(path, line_no, len(line))
            if is_blank(line):
                continue
            img_id = img_id_of_line(line, path, line_no)
            if img_id in first_line_of:
                raise DuplicateImageIdError(
                    f"{path}:{line_no}: duplicate img_id {img_id!r} (first on line {first_line_of[img_id]})"
                )
            first_line_of[img_id] = line_no
            img_ids.append(img_id)
            offsets.append(offset)
            lengths.append(len(line))
            line_numbers.append(line_no)
    stat_after = path.stat()
    if (stat_after.st_size, stat_after.st_mtime_ns) != (stat_before.st_size, stat_before.st_mtime_ns):
        raise FeatureFileError(f"{path} changed while it was being indexed (is a writer still appending?)")
    return TsvIndex(
        tsv_path=str(path.resolve()),
        tsv_size=stat_before.st_size,
        tsv_mtime_ns=stat_before.st_mtime_ns,
        img_ids=img_ids,
        offsets=np.asarray(offsets, dtype=np.int64),
        lengths=np.asarray(lengths, dtype=np.int64),
        line_numbers=np.asarray(line_numbers, dtype=np.int64),
    )


def default_index_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/lxmert_pl/index`, by default `~/.cache/lxmert_pl/index`."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "lxmert_pl" / "index"


def index_locations(tsv_path: str | Path, cache_dir: str | Path | None = None) -> list[Path]:
    """Where the index of `tsv_path` is looked for and saved, in order: beside the TSV, then the cache dir."""
    tsv_path = Path(tsv_path)
    digest = hashlib.sha256(str(tsv_path.resolve()).encode("utf-8")).hexdigest()[:32]
    cache = Path(cache_dir) if cache_dir is not None else default_index_cache_dir()
    return [tsv_path.with_name(tsv_path.name + INDEX_SUFFIX), cache / f"{digest}{INDEX_SUFFIX}"]


def _read_saved_index(
    index_path: Path, tsv_path: Path, stat: os.stat_result, *, same_path_required: bool
) -> TsvIndex | None:
    """The index saved at `index_path` when it describes `tsv_path` as it is now, else None.

    An index beside its TSV stays valid when both are moved together; one in the cache must name the TSV.
    """
    try:
        index = TsvIndex.from_json(index_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.warning("ignoring unreadable index %s (%s)", index_path, err)
        return None
    if not index.matches(stat):
        logger.info("index %s is stale (%s changed since it was built); rebuilding", index_path, tsv_path)
        return None
    if same_path_required and index.tsv_path != str(tsv_path.resolve()):
        return None
    return index


def load_or_build_index(
    tsv_path: str | Path, cache_dir: str | Path | None = None, *, rebuild: bool = False
) -> tuple[TsvIndex, Path | None]:
    """The index of `tsv_path` and where it is saved: a fresh saved one, else a new one saved at the first
    writable location of `index_locations` (None when none was writable; a warning is logged)."""
    tsv_path = Path(tsv_path)
    locations = index_locations(tsv_path, cache_dir)
    if not rebuild:
        stat = tsv_path.stat()
        for position, location in enumerate(locations):
            index = _read_saved_index(location, tsv_path, stat, same_path_required=position > 0)
            if index is not None:
                return index, location
    index = build_index(tsv_path)
    for location in locations:
        try:
            write_atomically(location, index.to_json())
            return index, location
        except OSError as err:
            logger.debug("cannot save index at %s: %s", location, err)
    logger.warning("could not save the index of %s at %s; it will be rebuilt next time", tsv_path, locations)
    return index, None
