"""Bottom-up-attention feature TSVs (`*_obj36.tsv`): row codec, indexed random access, crash-safe appends.

File format (the original LXMERT `load_obj_tsv` reads it): one image per line, no header, ten tab-separated
fields `FIELDNAMES`; `img_h`, `img_w`, `num_boxes` are decimal integers, the others base64 of little-endian C-order
arrays: int64 `objects_id`/`attrs_id` (n,), float32 `objects_conf`/`attrs_conf` (n,), float32 `boxes` (n, 4) and
float32 `features` (n, D). Lines end in "\\n" (files written by the original `csv.DictWriter` end in "\\r\\n";
both are read).

Random access: `TsvReader` scans the file once, sequentially, and records for every row its img_id, byte offset,
byte length and line number (`TsvIndex`). The index is saved as JSON beside the TSV (`<file>.idx`) or, when that
folder is not writable, under a cache directory; it is reused while the TSV's size and mtime are unchanged, and
rebuilt otherwise. Every indexed read checks that the bytes found start with `<img_id>\\t` and end the line, so an
index that went stale unnoticed is an error, never wrong data. Rows are read with `os.pread` from a file opened
lazily in each process, so a reader can be handed to DataLoader workers (forked or pickled).

Crash safety: `TsvWriter` writes each row as one complete line with a single unbuffered write, so an interrupted
run can only leave a partial *last* line, without its newline. Readers report such a line as truncated instead of
decoding it, and `repair_truncated` (CLI: `python -m lxmert_pl.features repair PATH`) cuts it away.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from lxmert_pl.errors import LxmertPlError, UserInputError
from lxmert_pl.features.types import ImageFeatures

logger = logging.getLogger(__name__)

FIELDNAMES = [
    "img_id", "img_h", "img_w", "objects_id", "objects_conf",
    "attrs_id", "attrs_conf", "num_boxes", "boxes", "features",
]  # fmt: skip
_FIELD_POSITION = {name: i for i, name in enumerate(FIELDNAMES)}

# Per-box base64 fields other than `features`: (name, little-endian dtype, trailing shape).
_PER_BOX_FIELDS: tuple[tuple[str, str, tuple[int, ...]], ...] = (
    ("objects_id", "<i8", ()),
    ("objects_conf", "<f4", ()),
    ("attrs_id", "<i8", ()),
    ("attrs_conf", "<f4", ()),
    ("boxes", "<f4", (4,)),
)
_FEATURE_DTYPE = "<f4"

INDEX_SUFFIX = ".idx"
_INDEX_FORMAT = "lxmert_pl.tsv_index"
_INDEX_VERSION = 1
_READ_BUFFER_BYTES = 16 << 20
_MAX_IMG_ID_BYTES = 4096
_TAIL_SEARCH_BYTES = 1 << 20


class FeatureFileError(UserInputError):
    """A feature file (TSV, index or store) is malformed; the message names the file and line or img_id."""


class TruncatedTsvError(FeatureFileError):
    """The TSV ends in a partial line (an interrupted write)."""


class StaleIndexError(FeatureFileError):
    """A TSV changed after its byte-offset index was built or loaded."""


class DuplicateImageIdError(FeatureFileError):
    """One img_id occurs twice in the rows of one feature source."""


class MissingImageError(LxmertPlError, KeyError):
    """An img_id that no feature source holds."""

    def __init__(self, img_id: str, searched: Sequence[str]):
        super().__init__(img_id, list(searched))  # both in `args`, so the error survives pickling
        self.img_id = img_id
        self.searched = list(searched)

    def __str__(self) -> str:
        return f"img_id {self.img_id!r} not found in {'; '.join(self.searched)}"


def repair_command(path: str | Path) -> str:
    """The shell command that removes a truncated last line from `path`."""
    return f"python -m lxmert_pl.features repair {path}"


def _location(path: str | Path | None, line_no: int | None) -> str:
    if path is not None and line_no is not None:
        return f"{path}:{line_no}"
    if path is not None:
        return str(path)
    if line_no is not None:
        return f"line {line_no}"
    return "TSV row"


# --------------------------------------------------------------------------------------------------------------
# Row codec
# --------------------------------------------------------------------------------------------------------------


def decode_row(line: str | bytes, *, path: str | Path | None = None, line_no: int | None = None) -> ImageFeatures:
    """Decode and validate one TSV line (with or without its line terminator).

    Raises FeatureFileError naming `path:line_no` (and the img_id once known) for a wrong field count, a
    non-integer or non-positive size field, invalid base64, a byte length that does not match `num_boxes`, or
    NaN/inf in `boxes` or `features`. Arrays are read-only views of the decoded bytes, as in the original loader.
    """
    where = _location(path, line_no)
    fields = _split_fields(line.encode("utf-8") if isinstance(line, str) else bytes(line), where)
    img_id = _decode_img_id(fields[0], where)
    where = f"{where} (img_id {img_id!r})"
    img_h = _parse_positive_int(fields[_FIELD_POSITION["img_h"]], "img_h", where)
    img_w = _parse_positive_int(fields[_FIELD_POSITION["img_w"]], "img_w", where)
    num_boxes = _parse_positive_int(fields[_FIELD_POSITION["num_boxes"]], "num_boxes", where)
    per_box = {
        name: _decode_array(fields[_FIELD_POSITION[name]], name, dtype, (num_boxes, *trailing), where)
        for name, dtype, trailing in _PER_BOX_FIELDS
    }
    features = _decode_features(fields[_FIELD_POSITION["features"]], num_boxes, where)
    _check_finite(per_box["boxes"], "boxes", where)
    _check_finite(features, "features", where)
    return ImageFeatures(img_id=img_id, img_h=img_h, img_w=img_w, features=features, **per_box)


def _split_fields(raw: bytes, where: str) -> list[memoryview]:
    """The tab-separated fields of a line, as zero-copy views (rows are ~400 kB: copies cost)."""
    end = len(raw)
    while end and raw[end - 1] in b"\r\n":
        end -= 1
    view = memoryview(raw)
    fields = []
    start = 0
    for _ in range(len(FIELDNAMES) - 1):
        tab = raw.find(b"\t", start, end)
        if tab < 0:
            break
        fields.append(view[start:tab])
        start = tab + 1
    fields.append(view[start:end])
    if len(fields) != len(FIELDNAMES) or raw.find(b"\t", start, end) >= 0:
        found = raw.count(b"\t", 0, end) + 1
        raise FeatureFileError(
            f"{where}: expected {len(FIELDNAMES)} tab-separated fields ({', '.join(FIELDNAMES)}), found {found}"
        )
    return fields


def _decode_img_id(raw_id: bytes | memoryview, where: str) -> str:
    try:
        img_id = bytes(raw_id).decode("utf-8")
    except UnicodeDecodeError as err:
        raise FeatureFileError(f"{where}: img_id is not valid UTF-8 ({err})") from None
    if not img_id.strip():
        raise FeatureFileError(f"{where}: empty img_id")
    return img_id


def _parse_positive_int(raw_value: memoryview, name: str, where: str) -> int:
    try:
        value = int(bytes(raw_value))
    except ValueError:
        raise FeatureFileError(f"{where}: field {name!r} is not an integer: {bytes(raw_value[:40])!r}") from None
    if value < 1:
        raise FeatureFileError(f"{where}: field {name!r} must be >= 1, got {value}")
    return value


def _decode_base64(raw_value: memoryview, name: str, where: str) -> bytes:
    try:
        return binascii.a2b_base64(raw_value, strict_mode=True)
    except binascii.Error as err:
        raise FeatureFileError(f"{where}: field {name!r} is not valid base64 ({err})") from None


def _decode_array(raw_value: memoryview, name: str, dtype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    data = _decode_base64(raw_value, name, where)
    item_size = np.dtype(dtype).itemsize
    expected = int(np.prod(shape)) * item_size
    if len(data) != expected:
        raise FeatureFileError(
            f"{where}: field {name!r} holds {len(data)} bytes, expected {expected} "
            f"(shape {shape} of {np.dtype(dtype).name}, from num_boxes={shape[0]})"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _decode_features(raw_value: memoryview, num_boxes: int, where: str) -> np.ndarray:
    data = _decode_base64(raw_value, "features", where)
    row_unit = num_boxes * np.dtype(_FEATURE_DTYPE).itemsize
    if not data or len(data) % row_unit:
        raise FeatureFileError(
            f"{where}: field 'features' holds {len(data)} bytes, not a positive multiple of "
            f"num_boxes x 4 = {row_unit} (float32, num_boxes={num_boxes})"
        )
    return np.frombuffer(data, dtype=_FEATURE_DTYPE).reshape(num_boxes, -1)


def _check_finite(values: np.ndarray, name: str, where: str) -> None:
    finite = np.isfinite(values)
    if not finite.all():
        first_bad = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise FeatureFileError(
            f"{where}: {name} contain {int((~finite).sum())} NaN/inf value(s), "
            f"first at {first_bad}: {values[first_bad]}"
        )


def _validated_arrays(feat: ImageFeatures) -> dict[str, np.ndarray]:
    """Arrays of `feat` in the file's dtypes, checked so that the reader will accept the row written."""
    where = f"img_id {feat.img_id!r}"
    if not isinstance(feat.img_id, str) or not feat.img_id.strip() or any(c in feat.img_id for c in "\t\r\n"):
        raise ValueError(f"{where}: an img_id must be a non-empty string without tabs or line breaks")
    for name in ("img_h", "img_w"):
        value = getattr(feat, name)
        if int(value) != value or value < 1:
            raise ValueError(f"{where}: {name} must be a positive integer, got {value!r}")
    num_boxes = feat.num_boxes
    if num_boxes < 1:
        raise ValueError(f"{where}: at least one box is needed, got boxes of shape {feat.boxes.shape}")
    arrays = {}
    for name, dtype, trailing in _PER_BOX_FIELDS:
        arrays[name] = np.ascontiguousarray(getattr(feat, name), dtype=dtype)
        if arrays[name].shape != (num_boxes, *trailing):
            raise ValueError(f"{where}: {name} has shape {arrays[name].shape}, expected {(num_boxes, *trailing)}")
    features = np.ascontiguousarray(feat.features, dtype=_FEATURE_DTYPE)
    if features.ndim != 2 or features.shape[0] != num_boxes or features.shape[1] < 1:
        raise ValueError(f"{where}: features have shape {features.shape}, expected ({num_boxes}, D)")
    arrays["features"] = features
    _check_finite(arrays["boxes"], "boxes", where)
    _check_finite(features, "features", where)
    return arrays


def _encode_line(feat: ImageFeatures) -> bytes:
    arrays = _validated_arrays(feat)

    def b64(name: str) -> bytes:
        return binascii.b2a_base64(arrays[name].tobytes(), newline=False)

    fields = [
        feat.img_id.encode("utf-8"), b"%d" % feat.img_h, b"%d" % feat.img_w,
        b64("objects_id"), b64("objects_conf"), b64("attrs_id"), b64("attrs_conf"),
        b"%d" % feat.num_boxes, b64("boxes"), b64("features"),
    ]  # fmt: skip
    return b"\t".join(fields) + b"\n"


def encode_row(feat: ImageFeatures) -> str:
    """One TSV line, trailing "\\n" included, that `decode_row` and the original loader decode bit-exactly.

    Arrays are cast to the file's dtypes (int64 ids, float32 otherwise). Raises ValueError naming the img_id for
    shapes that disagree with the box count, an empty box list, NaN/inf in boxes or features, or an img_id that
    contains tabs or line breaks.
    """
    return _encode_line(feat).decode("utf-8")


# --------------------------------------------------------------------------------------------------------------
# Sequential scanning
# --------------------------------------------------------------------------------------------------------------


def _iter_lines(handle: BinaryIO) -> Iterator[tuple[int, int, bytes]]:
    """(line number from 1, byte offset, line bytes with terminator) of every physical line, a partial last one too."""
    offset = 0
    for line_no, line in enumerate(handle, start=1):
        yield line_no, offset, line
        offset += len(line)


def _is_blank(line: bytes) -> bool:
    """Blank lines ("\\n", "\\r\\n") are skipped, as the original csv reader does. (`isspace` stops at the first
    non-space byte; `strip` would copy a whole row.)"""
    return line.isspace()


def _truncation_error(path: Path, line_no: int, num_bytes: int) -> TruncatedTsvError:
    return TruncatedTsvError(
        f"{path}:{line_no}: the last line is truncated ({num_bytes:,} bytes without a final newline, probably an "
        f"interrupted write); drop it with `{repair_command(path)}`"
    )


def iter_tsv_features(path: str | Path) -> Iterator[ImageFeatures]:
    """Decode every row of a TSV in file order with one sequential read (the fastest full pass).

    Raises TruncatedTsvError when the last line is partial, after yielding the complete rows before it.
    """
    path = Path(path)
    with open(path, "rb", buffering=_READ_BUFFER_BYTES) as handle:
        for line_no, _, line in _iter_lines(handle):
            if not line.endswith(b"\n"):
                raise _truncation_error(path, line_no, len(line))
            if not _is_blank(line):
                yield decode_row(line, path=path, line_no=line_no)


def read_img_ids(path: str | Path) -> list[str]:
    """img_ids of the complete rows, in file order (to resume an interrupted extraction).

    A partial last line is ignored (with a logged warning); rows are not decoded.
    """
    path = Path(path)
    img_ids = []
    with open(path, "rb", buffering=_READ_BUFFER_BYTES) as handle:
        for line_no, _, line in _iter_lines(handle):
            if not line.endswith(b"\n"):
                logger.warning("%s:%d: ignoring a truncated last line (%d bytes)", path, line_no, len(line))
            elif not _is_blank(line):
                img_ids.append(_img_id_of_line(line, path, line_no))
    return img_ids


def _img_id_of_line(line: bytes, path: Path, line_no: int) -> str:
    tab = line.find(b"\t", 0, _MAX_IMG_ID_BYTES)
    if tab < 0:
        raise FeatureFileError(f"{path}:{line_no}: no tab within the first {_MAX_IMG_ID_BYTES} bytes: not a TSV row")
    return _decode_img_id(line[:tab], f"{path}:{line_no}")


def _complete_length(path: Path) -> int:
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


def truncated_tail_bytes(path: str | Path) -> int:
    """How many bytes follow the last newline (0 for a file whose rows are all complete)."""
    path = Path(path)
    return path.stat().st_size - _complete_length(path)


def repair_truncated(path: str | Path) -> int:
    """Cut away a partial last line; returns the number of bytes removed (0 when the file was complete)."""
    path = Path(path)
    keep = _complete_length(path)
    removed = path.stat().st_size - keep
    if removed:
        os.truncate(path, keep)
        logger.warning("%s: removed a truncated last line (%d bytes)", path, removed)
    return removed


@dataclass
class TsvCheckReport:
    """Outcome of `check_tsv`: counts, the first errors, the feature dims seen and a truncated tail."""

    path: Path
    rows: int = 0
    error_count: int = 0
    errors: list[str] = field(default_factory=list)
    feature_dims: set[int] = field(default_factory=set)
    truncated_bytes: int = 0

    @property
    def ok(self) -> bool:
        return self.error_count == 0 and self.truncated_bytes == 0 and len(self.feature_dims) <= 1

    def summary(self) -> str:
        dims = ", ".join(str(d) for d in sorted(self.feature_dims)) or "-"
        lines = [f"{self.path}: {self.rows:,} valid rows, feature dim {dims}, {self.error_count} bad rows"]
        lines += [f"  {message}" for message in self.errors]
        if self.error_count > len(self.errors):
            lines.append(f"  ... and {self.error_count - len(self.errors)} more")
        if len(self.feature_dims) > 1:
            lines.append("  rows disagree on the feature dim")
        if self.truncated_bytes:
            lines.append(
                f"  truncated last line ({self.truncated_bytes:,} bytes); drop it with `{repair_command(self.path)}`"
            )
        return "\n".join(lines)


def check_tsv(path: str | Path, max_errors: int = 20) -> TsvCheckReport:
    """Decode every row of a TSV and collect what is wrong (bad rows, duplicate img_ids, truncated tail)."""
    report = TsvCheckReport(Path(path))
    first_line_of: dict[str, int] = {}
    with open(report.path, "rb", buffering=_READ_BUFFER_BYTES) as handle:
        for line_no, _, line in _iter_lines(handle):
            if not line.endswith(b"\n"):
                report.truncated_bytes = len(line)
            elif not _is_blank(line):
                problem = _check_line(line, report, line_no, first_line_of)
                if problem:
                    report.error_count += 1
                    if len(report.errors) < max_errors:
                        report.errors.append(problem)
    return report


def _check_line(line: bytes, report: TsvCheckReport, line_no: int, first_line_of: dict[str, int]) -> str | None:
    try:
        feat = decode_row(line, path=report.path, line_no=line_no)
    except FeatureFileError as err:
        return str(err)
    if feat.img_id in first_line_of:
        return f"{report.path}:{line_no}: duplicate img_id {feat.img_id!r} (first on line {first_line_of[feat.img_id]})"
    first_line_of[feat.img_id] = line_no
    report.rows += 1
    report.feature_dims.add(int(feat.features.shape[1]))
    return None


# --------------------------------------------------------------------------------------------------------------
# Byte-offset index
# --------------------------------------------------------------------------------------------------------------


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

    Raises TruncatedTsvError for a partial last line, DuplicateImageIdError naming both lines, and
    FeatureFileError for a line without an img_id field or a file that changed during the scan.
    """
    path = Path(path)
    stat_before = path.stat()
    img_ids: list[str] = []
    offsets: list[int] = []
    lengths: list[int] = []
    line_numbers: list[int] = []
    first_line_of: dict[str, int] = {}
    with open(path, "rb", buffering=_READ_BUFFER_BYTES) as handle:
        for line_no, offset, line in _iter_lines(handle):
            if not line.endswith(b"\n"):
                raise _truncation_error(path, line_no, len(line))
            if _is_blank(line):
                continue
            img_id = _img_id_of_line(line, path, line_no)
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


def _write_atomically(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


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
            _write_atomically(location, index.to_json())
            return index, location
        except OSError as err:
            logger.debug("cannot save index at %s: %s", location, err)
    logger.warning("could not save the index of %s at %s; it will be rebuilt next time", tsv_path, locations)
    return index, None


# --------------------------------------------------------------------------------------------------------------
# Random access
# --------------------------------------------------------------------------------------------------------------


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
        if len(data) != length or not data.startswith(img_id.encode("utf-8") + b"\t") or not data.endswith(b"\n"):
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


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------


class TsvWriter:
    """Write rows in the original format, each as one complete line in one unbuffered write.

    `append=True` (default) adds to an existing file; if that file ends in a partial line (an interrupted
    write), opening raises TruncatedTsvError unless `repair=True`, which cuts the partial line away (the number
    of bytes dropped is logged and kept in `repaired_bytes`). `append=False` starts the file afresh. The file is
    fsync-ed on close, and after every row with `fsync_every_row=True`.
    """

    def __init__(self, path: str | Path, append: bool = True, *, repair: bool = False, fsync_every_row: bool = False):
        self.path = Path(path)
        self.fsync_every_row = fsync_every_row
        self.rows_written = 0
        self.repaired_bytes = 0
        if append and self.path.exists():
            self._handle_partial_tail(repair)
        self._handle: BinaryIO | None = open(self.path, "ab" if append else "wb", buffering=0)

    def _handle_partial_tail(self, repair: bool) -> None:
        partial = truncated_tail_bytes(self.path)
        if not partial:
            return
        if not repair:
            raise TruncatedTsvError(
                f"{self.path} ends in a truncated line ({partial:,} bytes without a final newline, probably an "
                f"interrupted write); appending would corrupt the next row. Run `{repair_command(self.path)}` "
                "or open the writer with repair=True"
            )
        self.repaired_bytes = repair_truncated(self.path)

    def write(self, feat: ImageFeatures) -> None:
        if self._handle is None:
            raise ValueError(f"TsvWriter for {self.path} is closed")
        pending = memoryview(_encode_line(feat))
        while pending:  # a regular file takes the whole line in one write; loop only for a short write
            pending = pending[self._handle.write(pending) :]
        if self.fsync_every_row:
            os.fsync(self._handle.fileno())
        self.rows_written += 1

    def close(self) -> None:
        if self._handle is not None:
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None

    def __enter__(self) -> TsvWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
