"""Caption-vs-negative sets in SugarCrepe's layout (Hsieh et al., NeurIPS 2023): an image, a true caption, a hard
negative.

Files: a JSON object `{id: {"filename", "caption", "negative_caption"}}` (SugarCrepe's `add_att.json`,
`swap_obj.json`, ...), or JSON Lines of objects with the same fields (`id` optional there: the line number). The
image `filename` is found in the image folder by its stem. `--data` is one file or a folder of them; each file is a
category, named by its file stem.

Metric: accuracy of s(image, caption) > s(image, negative_caption), strict (a tie is wrong), per category, pooled
over all items (`accuracy`) and the unweighted mean over the categories (`mean_category_accuracy`).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .common import (
    BenchmarkFileError,
    BenchmarkResult,
    PairKey,
    Table,
    data_files,
    image_key,
    read_json_lines,
    read_json_object,
    read_text,
    require_text,
)


@dataclass(frozen=True)
class NegativeItem:
    category: str
    id: str
    img_id: str
    caption: str
    negative: str

    @property
    def images(self) -> tuple[str]:
        return (self.img_id,)

    def describe(self) -> str:
        return f"negatives {self.category} item {self.id}"

    def pairs(self) -> list[PairKey]:
        return [PairKey(self.img_id, self.caption), PairKey(self.img_id, self.negative)]


def _is_json_lines(file: Path) -> bool:
    if file.suffix.lower() in (".jsonl", ".ndjson"):
        return True
    try:
        data = json.loads(read_text(file))
    except json.JSONDecodeError as err:
        return err.msg == "Extra data"  # one object per line: the first line parses, the rest is "extra"
    return isinstance(data, dict) and isinstance(data.get("caption"), str)  # JSON Lines of a single item


def _records(file: Path) -> list[tuple[str, str, dict]]:
    """(id, where, record) of every item of one file."""
    if _is_json_lines(file):
        rows = []
        for line_no, row in read_json_lines(file):
            item_id = str(row.get("id", line_no))
            rows.append((item_id, f"{file}:{line_no} (item {item_id})", row))
        return rows
    rows = []
    for item_id, record in read_json_object(file).items():
        if not isinstance(record, dict):
            raise BenchmarkFileError(f"{file} (item {item_id}): expected an object, found {type(record).__name__}")
        rows.append((str(item_id), f"{file} (item {item_id})", record))
    return rows


def load_negatives(path: str | Path) -> list[NegativeItem]:
    """The items of a caption-vs-negative file (or a folder of them), in file order."""
    items: list[NegativeItem] = []
    for file in data_files(Path(path), (".json", ".jsonl", ".ndjson")):
        seen: dict[str, str] = {}
        records = _records(file)
        if not records:
            raise BenchmarkFileError(f"{file}: no items")
        for item_id, where, record in records:
            if item_id in seen:
                raise BenchmarkFileError(f"{where}: duplicate id {item_id!r} (first at {seen[item_id]})")
            seen[item_id] = where
            items.append(NegativeItem(
                category=file.stem, id=item_id, img_id=image_key(require_text(record, "filename", where)),
                caption=require_text(record, "caption", where),
                negative=require_text(record, "negative_caption", where),
            ))
    return items


def evaluate_negatives(items: Sequence[NegativeItem], score: Callable[[str, str], float],
                       threshold: float | None = None) -> BenchmarkResult:
    """Accuracy of caption over negative, per category and overall (`threshold` is not used)."""
    outcomes = []
    for item in items:
        caption, negative = score(item.img_id, item.caption), score(item.img_id, item.negative)
        outcomes.append({"category": item.category, "id": item.id, "img_id": item.img_id, "caption": item.caption,
                         "negative_caption": item.negative, "caption_score": caption, "negative_score": negative,
                         "correct": caption > negative, "tie": caption == negative})
    by_category: dict[str, list[dict]] = defaultdict(list)
    for outcome in outcomes:
        by_category[outcome["category"]].append(outcome)
    rows = [{"category": name, "num": len(group), "accuracy": sum(o["correct"] for o in group) / len(group)}
            for name, group in by_category.items()]
    metrics = {
        "accuracy": sum(o["correct"] for o in outcomes) / len(outcomes),
        "mean_category_accuracy": sum(r["accuracy"] for r in rows) / len(rows),
        "num_items": float(len(outcomes)),
        "num_ties": float(sum(o["tie"] for o in outcomes)),
    }
    return BenchmarkResult(metrics, [Table("by category", "category", ["num", "accuracy"], rows)], outcomes)
