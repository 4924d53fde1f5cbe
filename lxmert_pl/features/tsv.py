"""Feature TSV files: `TsvReader` (rows by img_id), sequential reads, and `TsvWriter` (crash-safe, locked appends).

Random access: `TsvReader` loads or builds the byte-offset index (`features.index`) and reads each row with
`os.pread` from a file opened lazily in each process, so a reader can be handed to DataLoader workers (forked or
pickled). Every indexed read checks that the bytes found start with `<img_id>\\t` and end the line, so an index
that went stale unnoticed is an error, never wrong data.

Writing: `TsvWriter` writes each row as one complete line with a single unbuffered write, so an interrupted run can
only leave a partial *last* line, without its newline. Readers report such a line as truncated instead of decoding
it; `repair_truncated` (CLI: `python -m lxmert_pl.features repair PATH`) cuts it away, and keeps a complete last row
that only lacks its newline (adding the newline). A writer holds `<file>.lock` (`features.locking`) while open, so a
second writer of the same file is refused; it appends only to a file proven to be a feature TSV
(`lines.prove_feature_tsv`), and, given `ExtractionSettings`, only to one extracted with the same settings
(`features.provenance`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from lxmert_pl.features.codec import decode_row, encode_line
from lxmert_pl.features.errors import (  # FeatureFileError: importable from here, as before the split
    FeatureFileError,  # noqa: F401
    MissingImageError,
    StaleIndexError,
    TruncatedTsvError,
    repair_command,
)
from lxmert_pl.features.index import load_or_build_index
from lxmert_pl.features.lines import (
    READ_BUFFER_BYTES,
    img_id_of_line,
    is_blank,
    is_complete_row,
    iter_lines,
    prove_feature_tsv,
    repair_tail,
    truncation_error,
)
from lxmert_pl.features.locking import WriteLock
from lxmert_pl.features.provenance import ExtractionSettings, claim_tsv
from lxmert_pl.features.record import ImageFeatures

logger = logging.getLogger(__name__)


def iter_tsv_features(path: str | Path) -> Iterator[ImageFeatures]:
    """Decode every row of a TSV in file order with one sequential read (the fastest full pass).

    A last row without its final newline is read when it decodes completely. Raises TruncatedTsvError when the
    last line is partial, after yielding the complete rows before it.
    """
    path = Path(path)
    with open(path, "rb", buffering=READ_BUFFER_BYTES) as handle:
        for line_no, _, line in iter_lines(handle):
            if not line.endswith(b"\n") and not is_complete_row(line):
                raise truncation_error(path, line_no, len(line))
            if not is_blank(line):
                yield decode_row(line, path=path, line_no=line_no)


def read_img_ids(path: str | Path) -> list[str]:
    """img_ids of the complete rows, in file order (to resume an interrupted extraction).

    A partial last line is ignored (with a logged warning); rows are not decoded (but a last line without its
    newline is, to tell a complete row from a partial one).
    """
    path = Path(path)
    img_ids = []
    with open(path, "rb", buffering=READ_BUFFER_BYTES) as handle:
        for line_no, _, line in iter_lines(handle):
            if not line.endswith(b"\n") and not is_complete_row(line):
                logger.warning("%s:%d: ignoring a truncated last line (%d bytes)", path, line_no, len(line))
            elif not is_blank(line):
                img_ids.append(img_id_of_line(line, path, line_no))
    return img_ids


class TsvReader:
    """Rows of one feature TSV by img_id, through its byte-offset index; never holds more than one row in memory.

    Picklable: the file is opened lazily in each process (reads use `os.pread`, so a handle inherited through
    fork is safe too). A TSV that changed after the index was loaded raises StaleIndexError on read.
    """

    def __init__(self, path: str | Path, cache_dir: str | Path | None = None, *, rebuild_index: bool = False):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"feature TSV not found: {self.path}")
        self.index, self.index_path = load_or_build_index(self.path, cache_dir, rebuild=rebuild_index)
        self._row_of = {img_id: row for row, img_id in enumerate(self.index.img_ids)}
        self._handle: BinaryIO | None = None

    def __len__(self) -> int:
        return len(self.index.img_ids)

    def __contains__(self, img_id: object) -> bool:
        return img_id in self._row_of

    @property
    def img_ids(self) -> list[str]:
        return list(self.index.img_ids)

    def describe(self) -> str:
        return f"TSV file {self.path} ({len(self):,} images)"

    def location(self, img_id: str) -> str:
        """`path:line` of the row of `img_id`."""
        return f"{self.path}:{self.index.line_numbers[self._row_of[img_id]]}"

    def get(self, img_id: str) -> ImageFeatures:
        row = self._row_of.get(img_id)
        if row is None:
            raise MissingImageError(img_id, [self.describe()])
        offset, length = int(self.index.offsets[row]), int(self.index.lengths[row])
        line_no = int(self.index.line_numbers[row])
        data = os.pread(self._file().fileno(), length, offset)
        ends_line = data.endswith(b"\n") or offset + length == self.index.tsv_size  # a last row may lack "\n"
        if len(data) != length or not data.startswith(img_id.encode("utf-8") + b"\t") or not ends_line:
            raise StaleIndexError(
                f"{self.path}:{line_no}: the index says the row of img_id {img_id!r} lies at bytes "
                f"{offset}..{offset + length}, but the file holds {data[:40]!r}... there; the TSV was rewritten "
                f"after its index was built. Rebuild it: `python -m lxmert_pl.features index --rebuild {self.path}`"
            )
        return decode_row(data, path=self.path, line_no=line_no)

    def iter_features(self) -> Iterator[ImageFeatures]:
        """Every row in file order, by one sequential read (faster than `get` for a full pass)."""
        return iter_tsv_features(self.path)

    def _file(self) -> BinaryIO:
        if self._handle is None:
            handle = open(self.path, "rb", buffering=0)
            if not self.index.matches(os.fstat(handle.fileno())):
                handle.close()
                raise StaleIndexError(
                    f"{self.path} changed (size or mtime) after its index was loaded; open the feature source "
                    "again to re-index it"
                )
            self._handle = handle
        return self._handle

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> TsvReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handle"] = None
        return state


class TsvWriter:
    """Write rows in the original format, each as one complete line in one unbuffered write.

    While open, the writer holds the file's lock (`<file>.lock`): a second writer, in another process, gets
    FeatureFileLockedError. `append=True` (default) adds to an existing file, after proving it is a feature TSV
    (else NotAFeatureTsvError, the file untouched). A complete last row without its newline gets the newline; a
    partial last line (an interrupted write) raises TruncatedTsvError unless `repair=True`, which cuts it away (the
    number of bytes dropped is logged and kept in `repaired_bytes`). `append=False` starts the file afresh. With
    `settings`, the file's provenance sidecar is written (a new or empty file) or must match (a file with rows;
    else ProvenanceMismatchError). The file is fsync-ed on close, and after every row with `fsync_every_row=True`.
    """

    def __init__(
        self,
        path: str | Path,
        append: bool = True,
        *,
        repair: bool = False,
        fsync_every_row: bool = False,
        settings: ExtractionSettings | None = None,
    ):
        self.path = Path(path)
        self.fsync_every_row = fsync_every_row
        self.rows_written = 0
        self.repaired_bytes = 0
        self._handle: BinaryIO | None = None
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"cannot write {self.path}: folder {self.path.parent} does not exist")
        self._lock = WriteLock(self.path)
        try:
            has_rows = False
            if append and self.path.exists() and self.path.stat().st_size:
                self._prepare_tail(repair)
                has_rows = self.path.stat().st_size > 0
            if settings is not None:
                claim_tsv(self.path, settings, has_rows=has_rows)
            self._handle = open(self.path, "ab" if append else "wb", buffering=0)
        except BaseException:
            self._lock.release()
            raise

    def _prepare_tail(self, repair: bool) -> None:
        tail = prove_feature_tsv(self.path)
        if tail.kind == "partial" and not repair:
            raise TruncatedTsvError(
                f"{self.path} ends in a truncated line ({tail.num_bytes:,} bytes without a final newline, probably "
                f"an interrupted write); appending would corrupt the next row. Run `{repair_command(self.path)}` "
                "or open the writer with repair=True"
            )
        if tail.kind in ("partial", "row"):
            self.repaired_bytes = repair_tail(self.path).removed_bytes

    def write(self, feat: ImageFeatures) -> None:
        if self._handle is None:
            raise ValueError(f"TsvWriter for {self.path} is closed")
        pending = memoryview(encode_line(feat))
        while pending:  # a regular file takes the whole line in one write; loop only for a short write
            pending = pending[self._handle.write(pending) :]
        if self.fsync_every_row:
            os.fsync(self._handle.fileno())
        self.rows_written += 1

    def close(self) -> None:
        if self._handle is not None:
            try:
                os.fsync(self._handle.fileno())
                self._handle.close()
            finally:
                self._handle = None
                self._lock.release()

    def __enter__(self) -> TsvWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
