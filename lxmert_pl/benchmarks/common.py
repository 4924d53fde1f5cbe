"""What the benchmark formats share: image names, reading files item by item, the pairs to score, rate tables.

A benchmark item names images and texts; the model scores (image, text) pairs. `unique_pairs` turns the items into
the list of distinct pairs (each scored once, in the order the items need them, so that an image or a caption that
repeats sits in the same batch and the matching module encodes it once); `ScoreTable` answers a pair's score back.
Every comparison a metric makes is strict: a tie counts as wrong.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lxmert_pl.errors import UserInputError

# The suffixes taken off an image name to get its img_id (the file name without the extension, as the detector's
# image folders and extract.py key their rows); `ex_0_img_0` (Winoground) is already an img_id.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".jp2", ".pbm", ".pgm", ".ppm"}


class BenchmarkFileError(UserInputError):
    """A benchmark file is malformed; the message names the file and the item (or line)."""


def image_key(name: str) -> str:
    """The img_id of an image named in a benchmark file: its file name, without an image extension if it has one."""
    base = Path(str(name)).name
    suffix = Path(base).suffix
    return base[: -len(suffix)] if suffix.lower() in IMAGE_SUFFIXES else base


def read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise BenchmarkFileError(f"{path}: not valid UTF-8 (offset {err.start})") from None
    except IsADirectoryError:
        raise BenchmarkFileError(f"{path}: a folder, expected a file") from None


def _unique_keys(path: Path) -> Callable[[list[tuple[str, Any]]], dict]:
    """A `json` object hook that refuses a key given twice (json.loads would keep the last one silently)."""

    def hook(pairs: list[tuple[str, Any]]) -> dict:
        result: dict = {}
        for key, value in pairs:
            if key in result:
                raise BenchmarkFileError(f"{path}: item id {key!r} appears twice")
            result[key] = value
        return result

    return hook


def read_json_object(path: Path) -> dict:
    """A JSON file holding one object `{id: item, ...}`; a duplicate id is an error naming it."""
    try:
        data = json.loads(read_text(path), object_pairs_hook=_unique_keys(path))
    except json.JSONDecodeError as err:
        raise BenchmarkFileError(f"{path}:{err.lineno}:{err.colno}: invalid JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise BenchmarkFileError(f"{path}: expected a JSON object {{id: item, ...}}, found {type(data).__name__}")
    return data


def read_json_lines(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSON Lines file."""
    rows = []
    for line_no, line in enumerate(read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise BenchmarkFileError(f"{path}:{line_no}: invalid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise BenchmarkFileError(f"{path}:{line_no}: expected a JSON object, found {type(row).__name__}")
        rows.append((line_no, row))
    return rows


def require_text(record: Mapping, key: str, where: str) -> str:
    """`record[key]` as a non-blank string, else an error naming `where` (file and item) and the key."""
    if key not in record:
        raise BenchmarkFileError(f"{where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise BenchmarkFileError(f"{where}: field {key!r} must be a non-empty string, got {value!r}")
    return value


def data_files(path: Path, suffixes: Sequence[str]) -> list[Path]:
    """`path` itself, or the files of the folder `path` ending in one of `suffixes` (sorted by name)."""
    if not path.exists():
        raise FileNotFoundError(f"benchmark data not found: {path}")
    if path.is_file():
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise BenchmarkFileError(f"{path}: no {' or '.join(suffixes)} files in this folder")
    return files


def check_unique(ids: Iterable[str], what: str) -> None:
    seen: set[str] = set()
    for item_id in ids:
        if item_id in seen:
            raise BenchmarkFileError(f"{what}: item id {item_id!r} appears twice")
        seen.add(item_id)


@dataclass(frozen=True)
class PairKey:
    """One (image, text) pair a benchmark needs scored."""

    img_id: str
    sent: str


def unique_pairs(needed: Iterable[PairKey]) -> list[PairKey]:
    """Distinct pairs in the order first needed."""
    return list(dict.fromkeys(needed))


class ScoreTable:
    """Scores by (img_id, sentence), from the pairs as scored."""

    def __init__(self, scores: Mapping[PairKey, float]):
        self.scores = dict(scores)

    def __call__(self, img_id: str, sent: str) -> float:
        return self.scores[PairKey(img_id, sent)]


def split_available(items: Sequence, images_of: Callable[[Any], Sequence[str]], has_image: Callable[[str], bool],
                    describe: Callable[[Any], str], where: str, skip: bool) -> tuple[list, list]:
    """(kept, skipped) items: an item one of whose images `has_image` refuses is an error naming it and the image,
    or with `skip` it is left out (returned in `skipped`, to be counted)."""
    kept, skipped = [], []
    for item in items:
        missing = [img for img in images_of(item) if not has_image(img)]
        if not missing:
            kept.append(item)
        elif skip:
            skipped.append(item)
        else:
            raise BenchmarkFileError(f"{describe(item)}: image {missing[0]!r} not found in {where}; pass "
                                     "data.skip_missing=true to leave such items out (counted)")
    return kept, skipped


def rate(flags: Sequence[bool]) -> float:
    return sum(bool(f) for f in flags) / len(flags) if flags else float("nan")


@dataclass
class Table:
    """A per-tag (per-piece, per-category) table: one row per group, numbers per column."""

    title: str
    key: str  # the column naming the group
    columns: list[str]
    rows: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "key": self.key, "columns": self.columns, "rows": self.rows}

    def markdown(self) -> str:
        head = [self.key, *self.columns]
        lines = [f"### {self.title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.rows:
            lines.append("| " + " | ".join(_cell(row.get(c)) for c in head) + " |")
        return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if value != value else f"{value:.4f}"
    return str(value)


def grouped_rates(groups: Mapping[str, Sequence[Mapping[str, bool]]], columns: Sequence[str], key: str) -> list[dict]:
    """One row per group (its name under `key`): `num` (items) and the rate of each column over its items."""
    rows = []
    for name, outcomes in groups.items():
        row: dict[str, Any] = {key: name, "num": len(outcomes)}
        row.update({c: rate([o[c] for o in outcomes]) for c in columns})
        rows.append(row)
    return rows


@dataclass
class BenchmarkResult:
    """What a benchmark's metrics come to: overall numbers, per-group tables, one outcome row per item."""

    metrics: dict[str, float]
    tables: list[Table]
    items: list[dict[str, Any]]

    def markdown(self) -> str:
        return "\n\n".join(t.markdown() for t in self.tables)
