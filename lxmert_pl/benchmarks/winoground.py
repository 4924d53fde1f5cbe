"""Winoground (Thrush et al., CVPR 2022): two images, two captions with the same words in another order.

File: `examples.jsonl`, one example per line with `id`, `caption_0`, `caption_1`, `image_0`, `image_1` (image names
without extension, e.g. `ex_0_img_0`, found in the image folder by their stem) and the tags `tag` (fine-grained
linguistic tag, e.g. "Noun"), `secondary_tag` ("", or tags such as "Symbolic", "Pragmatics", "Series"; several are
separated by commas), `num_main_preds` (1 or 2) and `collapsed_tag` ("Object", "Relation" or "Both"). The five
fields before the tags are required; a missing tag leaves the example out of that tag's table.

Scores, with s(c, i) the model's score of caption c on image i, per example (the paper's definitions, strict):
- text score: s(c0, i0) > s(c1, i0) and s(c1, i1) > s(c0, i1) (each image picks its own caption);
- image score: s(c0, i0) > s(c0, i1) and s(c1, i1) > s(c1, i0) (each caption picks its own image);
- group score: both. A tie is not ">": it counts as wrong (`num_examples_with_ties` counts them).
Reported overall, and per collapsed tag, tag, secondary tag and number of main predicates.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .common import (
    BenchmarkFileError,
    BenchmarkResult,
    PairKey,
    Table,
    grouped_rates,
    image_key,
    rate,
    read_json_lines,
    require_text,
)

REQUIRED = ("id", "caption_0", "caption_1", "image_0", "image_1")
SCORES = ("text", "image", "group")
EXAMPLES_FILE = "examples.jsonl"


@dataclass(frozen=True)
class WinogroundExample:
    id: str
    caption_0: str
    caption_1: str
    image_0: str  # img_id
    image_1: str
    tag: str | None = None
    secondary_tag: str | None = None
    num_main_preds: str | None = None
    collapsed_tag: str | None = None

    @property
    def images(self) -> tuple[str, str]:
        return (self.image_0, self.image_1)

    def describe(self) -> str:
        return f"winoground example {self.id}"

    def pairs(self) -> list[PairKey]:
        return [PairKey(self.image_0, self.caption_0), PairKey(self.image_0, self.caption_1),
                PairKey(self.image_1, self.caption_0), PairKey(self.image_1, self.caption_1)]

    @property
    def secondary_tags(self) -> list[str]:
        return [t.strip() for t in (self.secondary_tag or "").split(",") if t.strip()]


def examples_file(path: str | Path) -> Path:
    """The examples file: `path` itself, or `examples.jsonl` (or `data/examples.jsonl`) in the folder `path`."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / EXAMPLES_FILE, path / "data" / EXAMPLES_FILE):
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"no {EXAMPLES_FILE} in {path} (nor in {path / 'data'})")
    if not path.exists():
        raise FileNotFoundError(f"Winoground examples file not found: {path}")
    return path


def default_image_folder(path: str | Path) -> Path:
    """Where the published layout keeps the images: `images/` beside the examples file."""
    return examples_file(path).parent / "images"


def load_winoground(path: str | Path) -> list[WinogroundExample]:
    """The examples of a Winoground `examples.jsonl` (or a folder holding it), in file order."""
    path = examples_file(path)
    examples: list[WinogroundExample] = []
    seen: dict[str, int] = {}
    for line_no, row in read_json_lines(path):
        where = f"{path}:{line_no}"
        for key in REQUIRED:
            if key not in row:
                raise BenchmarkFileError(f"{where}: missing field {key!r}" + (f" (example {row['id']})" if "id" in row
                                                                                 else ""))
        example_id = str(row["id"])
        where = f"{where} (example {example_id})"
        if example_id in seen:
            raise BenchmarkFileError(f"{where}: duplicate id {example_id!r} (first on line {seen[example_id]})")
        seen[example_id] = line_no
        tags = {key: None if row.get(key) is None else str(row[key])
                for key in ("tag", "secondary_tag", "num_main_preds", "collapsed_tag")}
        examples.append(WinogroundExample(
            id=example_id,
            caption_0=require_text(row, "caption_0", where),
            caption_1=require_text(row, "caption_1", where),
            image_0=image_key(require_text(row, "image_0", where)),
            image_1=image_key(require_text(row, "image_1", where)),
            **tags,
        ))
    if not examples:
        raise BenchmarkFileError(f"{path}: no examples")
    return examples


def example_outcome(example: WinogroundExample, score: Callable[[str, str], float]) -> dict:
    """The four scores of an example and whether it passes the text, image and group criteria."""
    c0_i0 = score(example.image_0, example.caption_0)
    c1_i0 = score(example.image_0, example.caption_1)
    c0_i1 = score(example.image_1, example.caption_0)
    c1_i1 = score(example.image_1, example.caption_1)
    text = c0_i0 > c1_i0 and c1_i1 > c0_i1
    image = c0_i0 > c0_i1 and c1_i1 > c1_i0
    tie = c0_i0 == c1_i0 or c1_i1 == c0_i1 or c0_i0 == c0_i1 or c1_i1 == c1_i0
    return {"id": example.id, "c0_i0": c0_i0, "c0_i1": c0_i1, "c1_i0": c1_i0, "c1_i1": c1_i1,
            "text": text, "image": image, "group": text and image, "tie": tie}


def evaluate_winoground(examples: Sequence[WinogroundExample], score: Callable[[str, str], float],
                        threshold: float | None = None) -> BenchmarkResult:
    """Text, image and group scores overall and per tag (`threshold` is not used: Winoground only compares)."""
    outcomes = [example_outcome(ex, score) for ex in examples]
    metrics = {f"{name}_score": rate([o[name] for o in outcomes]) for name in SCORES}
    metrics["num_examples"] = float(len(outcomes))
    metrics["num_examples_with_ties"] = float(sum(o["tie"] for o in outcomes))
    tables = []
    for key, title, groups_of in (
        ("collapsed_tag", "by collapsed tag", lambda ex: [ex.collapsed_tag] if ex.collapsed_tag else []),
        ("tag", "by tag", lambda ex: [ex.tag] if ex.tag else []),
        ("secondary_tag", "by secondary tag", lambda ex: ex.secondary_tags),
        ("num_main_preds", "by number of main predicates", lambda ex: [ex.num_main_preds] if ex.num_main_preds
         else []),
    ):
        groups: dict[str, list[dict]] = defaultdict(list)
        for example, outcome in zip(examples, outcomes):
            for group in groups_of(example):
                groups[group].append(outcome)
        if groups:
            rows = grouped_rates(dict(sorted(groups.items())), SCORES, key)
            tables.append(Table(title, key, ["num", *SCORES], rows))
    items = []
    for example, outcome in zip(examples, outcomes):
        items.append({**outcome, "caption_0": example.caption_0, "caption_1": example.caption_1,
                      "image_0": example.image_0, "image_1": example.image_1, "tag": example.tag,
                      "secondary_tag": example.secondary_tag, "num_main_preds": example.num_main_preds,
                      "collapsed_tag": example.collapsed_tag})
    return BenchmarkResult(metrics, tables, items)
