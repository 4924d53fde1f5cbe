"""Physical lines of a feature TSV: sequential scanning, the last line, and the proof that a file is a feature TSV.

Rows are written as one complete line each (see `tsv.TsvWriter`), so an interrupted write can only leave a partial
*last* line, without its newline. This module tells such a tail apart from a complete row that merely lacks its
final newline (kept, the newline added) and from bytes that are no TSV row at all (never modified).

Nothing here modifies a file that it has not first proven to be a feature TSV (`prove_feature_tsv`): its first line
decodes as a row (or, in a file without any complete line, the content is the start of a row, img_id and tab
included), and its tail is empty, a complete row, or the start of a row.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lxmert_pl.features.codec import FIELDNAMES, decode_img_id, decode_row
from lxmert_pl.features.errors import FeatureFileError, NotAFeatureTsvError, TruncatedTsvError, repair_command
from lxmert_pl.features.locking import WriteLock

logger = logging.getLogger(__name__)

READ_BUFFER_BYTES = 16 << 20
MAX_IMG_ID_BYTES = 4096
MAX_ROW_BYTES = 256 << 20  # a first "line" longer than this is no TSV row (obj36 rows are ~0.4 MB)
_TAIL_SEARCH_BYTES = 1 << 20

# What each field of a row may hold, to tell the start of a row from foreign bytes.
_CONTROL_BYTES = re.compile(rb"[\x00-\x1f\x7f]")  # never in an img_id
_DIGITS = re.compile(rb"[0-9]*\Z")
_BASE64 = re.compile(rb"[A-Za-z0-9+/=]*\Z")
_FIELD_PATTERN = {name: _BASE64 for name in FIELDNAMES}
_FIELD_PATTERN.update({"img_h": _DIGITS, "img_w": _DIGITS, "num_boxes": _DIGITS})


def iter_lines(handle: BinaryIO) -> Iterator[tuple[int, int, bytes]]:
    """(line number from 1, byte offset, line bytes with terminator) of every physical line, a partial last one too."""
    offset = 0
    for line_no, line in enumerate(handle, start=1):
        yield line_no, offset, line
        offset += len(line)


def is_blank(line: bytes) -> bool:
    """Blank lines ("\\n", "\\r\\n") are skipped, as the original csv reader does. (`isspace` stops at the first
    non-space byte; `strip` would copy a whole row.)"""
    return line.isspace()


def img_id_of_line(line: bytes, path: Path, line_no: int) -> str:
    """The img_id field of a row, without decoding the rest."""
    tab = line.find(b"\t", 0, MAX_IMG_ID_BYTES)
    if tab < 0:
        raise FeatureFileError(f"{path}:{line_no}: no tab within the first {MAX_IMG_ID_BYTES} bytes: not a TSV row")
    return decode_img_id(line[:tab], f"{path}:{line_no}")


def truncation_error(path: Path, line_no: int, num_bytes: int) -> TruncatedTsvError:
    return TruncatedTsvError(
        f"{path}:{line_no}: the last line is truncated ({num_bytes:,} bytes without a final newline, probably an "
        f"interrupted write); drop it with `{repair_command(path)}`"
    )


def is_complete_row(line: bytes) -> bool:
    """Whether a last line without its newline decodes as a complete, valid row."""
    try:
        decode_row(line)
    except FeatureFileError:
        return False
    return True


def is_row_prefix(data: bytes, *, need_img_id: bool = False) -> bool:
    """Whether `data` (no newline) can be the start of a TSV row: at most ten fields, each holding only what its
    field may hold (digits, base64, a UTF-8 img_id). With `need_img_id`, the img_id field and its tab are required."""
    if b"\n" in data:
        return False
    fields = data.split(b"\t")
    if len(fields) > len(FIELDNAMES) or (need_img_id and len(fields) < 2):
        return False
    try:
        fields[0].decode("utf-8")
    except UnicodeDecodeError as err:  # only a character cut at the very end (the write stopped there) is allowed
        if len(fields) > 1 or err.reason != "unexpected end of data":
            return False
    if _CONTROL_BYTES.search(fields[0]) or (len(fields) > 1 and not fields[0].strip()):
        return False
    return all(_FIELD_PATTERN[name].match(value) for name, value in zip(FIELDNAMES[1:], fields[1:]))


def complete_length(path: Path) -> int:
    """Length of the file up to and including its last newline (0 when it holds none)."""
    with open(path, "rb") as handle:
        end = handle.seek(0, os.SEEK_END)
        while end > 0:
            start = max(0, end - _TAIL_SEARCH_BYTES)
            handle.seek(start)
            newline = handle.read(end - start).rfind(b"\n")
            if newline >= 0:
                return start + newline + 1
            end = start
    return 0


@dataclass(frozen=True)
class Tail:
    """What follows the last newline of a file: nothing, a complete row, the start of a row, or foreign bytes."""

    size: int  # of the file
    complete_length: int  # up to and including the last newline
    kind: str  # "none" | "row" | "partial" | "foreign"

    @property
    def num_bytes(self) -> int:
        return self.size - self.complete_length


def inspect_tail(path: str | Path) -> Tail:
    """Classify the bytes after the last newline of `path` (reads only them)."""
    path = Path(path)
    size = path.stat().st_size
    keep = complete_length(path)
    if keep == size:
        return Tail(size, keep, "none")
    with open(path, "rb") as handle:
        handle.seek(keep)
        tail = handle.read()
    if is_complete_row(tail):
        return Tail(size, keep, "row")
    return Tail(size, keep, "partial" if is_row_prefix(tail, need_img_id=keep == 0) else "foreign")


def _first_line(path: Path) -> bytes:
    """The first line (with its newline), or the whole file when it holds none within MAX_ROW_BYTES."""
    with open(path, "rb") as handle:
        return handle.readline(MAX_ROW_BYTES)


def prove_feature_tsv(path: str | Path, what: str = "feature TSV") -> Tail:
    """Raise NotAFeatureTsvError unless `path` (an existing file) is a feature TSV that may be appended to or
    repaired (see the module docstring); returns its tail. An empty file passes. Reads the first line and the tail."""
    path = Path(path)
    if path.is_dir():
        raise NotAFeatureTsvError(f"{path} is a directory, not a {what}")
    tail = inspect_tail(path)
    if tail.size == 0:
        return tail
    refusal = f"{path} is not a {what}, so it was not modified"
    if tail.complete_length:
        first = _first_line(path)
        if not first.endswith(b"\n"):
            raise NotAFeatureTsvError(f"{refusal}: its first line is longer than {MAX_ROW_BYTES:,} bytes")
        if not is_blank(first):
            try:
                decode_row(first, path=path, line_no=1)
            except FeatureFileError as err:
                raise NotAFeatureTsvError(f"{refusal} (line 1 is no feature row: {err})") from None
    if tail.kind == "foreign":
        raise NotAFeatureTsvError(
            f"{refusal}: the {tail.num_bytes:,} bytes after its last newline are not the start of a TSV row"
        )
    return tail


@dataclass(frozen=True)
class TailRepair:
    """What `repair_tail` did: bytes of a partial last line removed, or a final newline added to a complete row."""

    removed_bytes: int = 0
    newline_added: bool = False

    def describe(self, path: Path) -> str:
        if self.removed_bytes:
            return f"{path}: removed a truncated last line of {self.removed_bytes:,} bytes"
        if self.newline_added:
            return f"{path}: the last row was complete but lacked its final newline; added it"
        return f"{path}: complete"


def repair_tail(path: str | Path) -> TailRepair:
    """Make `path` end in a complete line: a partial last line is cut away, a complete last row without its
    newline gets one. Raises NotAFeatureTsvError (modifying nothing) unless the file is proven to be a feature TSV,
    and FeatureFileLockedError while another process holds the file's writer lock."""
    path = Path(path)
    with WriteLock(path):  # never cut a file another process is writing (FeatureFileLockedError)
        return _repair_tail(path)


def _repair_tail(path: Path) -> TailRepair:
    tail = prove_feature_tsv(path)
    if tail.kind == "row":
        with open(path, "ab") as handle:
            handle.write(b"\n")
        logger.warning("%s: added the missing final newline of a complete last row", path)
        return TailRepair(newline_added=True)
    if tail.kind == "partial":
        os.truncate(path, tail.complete_length)
        logger.warning("%s: removed a truncated last line (%d bytes)", path, tail.num_bytes)
        return TailRepair(removed_bytes=tail.num_bytes)
    return TailRepair()


def repair_truncated(path: str | Path) -> int:
    """`repair_tail`, returning the number of bytes removed (0 when nothing was cut)."""
    return repair_tail(path).removed_bytes


def truncated_tail_bytes(path: str | Path) -> int:
    """How many bytes of a partial last line follow the last newline (0 for a file whose rows are all complete,
    the last one with or without its newline)."""
    tail = inspect_tail(path)
    return tail.num_bytes if tail.kind != "row" else 0
