"""VALSE (Parcalabescu et al., ACL 2022): an image, its caption and one or more foils, per linguistic "piece".

Files: one JSON object per piece (`existence.json`, `plurals.json`, `counting_hard.json`, ...), `{id: item}` with
`image_file` (found in the image folder by its stem), `caption` (a string; a list: its first sentence is used, as
the authors' LXMERT script does), `foil` (a string, or a list of foils), `mturk` (`caption`: how many of the 3
annotators chose the caption and not the foil), plus `dataset`, `linguistic_phenomena`, `classes`, ... (kept in
the item outcomes). `--data` is one such file or a folder of them; each file is a piece, named by its file stem.

Only the validated items are scored by default (`mturk.caption >= 2`, the repository's "valid set"; then a missing
`mturk` is an error naming the item). Metrics per piece, with s(i, t) the score and `threshold` the run's decision
threshold (0.5 for itm, i.e. "matched" logit > "not matched" logit as in the authors' script):
- `acc_r` (pairwise ranking accuracy): the fraction of (caption, foil) comparisons with s(i, caption) > s(i, foil),
  strict (a tie is wrong);
- `p_c` (caption precision): the fraction of captions with s > threshold;
- `p_f` (foil precision): the fraction of foils with s <= threshold (a foil at the threshold is detected, as the
  authors' script counts it);
- `acc`: binary accuracy over every caption and foil ((p_c + p_f) / 2 with one foil per caption); `min_pc_pf`.
The overall numbers are the unweighted means over the pieces (the paper's "Avg." column).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .common import (
    BenchmarkFileError,
    BenchmarkResult,
    PairKey,
    Table,
    data_files,
    image_key,
    read_json_object,
    require_text,
)

METRICS = ("acc_r", "p_c", "p_f", "acc", "min_pc_pf")
VALID_VOTES = 2


@dataclass(frozen=True)
class ValseItem:
    piece: str
    id: str
    img_id: str
    caption: str
    foils: tuple[str, ...]
    caption_votes: int | None  # mturk.caption
    info: dict = field(default_factory=dict, compare=False, hash=False)  # dataset, linguistic_phenomena, classes...

    @property
    def images(self) -> tuple[str]:
        return (self.img_id,)

    @property
    def valid(self) -> bool:
        return self.caption_votes is not None and self.caption_votes >= VALID_VOTES

    def describe(self) -> str:
        return f"valse {self.piece} item {self.id}"

    def pairs(self) -> list[PairKey]:
        return [PairKey(self.img_id, self.caption), *(PairKey(self.img_id, foil) for foil in self.foils)]


def _texts(record: dict, key: str, where: str) -> list[str]:
    value = record.get(key)
    if key not in record:
        raise BenchmarkFileError(f"{where}: missing field {key!r}")
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise BenchmarkFileError(f"{where}: field {key!r} must be a non-empty string or list of strings, got "
                                 f"{value!r}")
    return values


def load_valse(path: str | Path, valid_only: bool = True) -> tuple[list[ValseItem], int]:
    """(items, number of items left out as not validated) of a VALSE piece file or a folder of them."""
    items: list[ValseItem] = []
    not_valid = 0
    for file in data_files(Path(path), (".json",)):
        data = read_json_object(file)
        if not data:
            raise BenchmarkFileError(f"{file}: no items")
        for item_id, record in data.items():
            where = f"{file} (item {item_id})"
            if not isinstance(record, dict):
                raise BenchmarkFileError(f"{where}: expected an object, found {type(record).__name__}")
            votes = record.get("mturk", {}).get("caption") if isinstance(record.get("mturk"), dict) else None
            if valid_only and not isinstance(votes, int):
                raise BenchmarkFileError(f"{where}: missing field 'mturk' with an integer 'caption' (the annotators' "
                                         "votes); pass benchmark.valid_only=false to score every item")
            item = ValseItem(
                piece=file.stem, id=str(item_id), img_id=image_key(require_text(record, "image_file", where)),
                caption=_texts(record, "caption", where)[0], foils=tuple(_texts(record, "foil", where)),
                caption_votes=votes if isinstance(votes, int) else None,
                info={k: v for k, v in record.items() if k not in ("image_file", "caption", "foil", "mturk")},
            )
            if valid_only and not item.valid:
                not_valid += 1
                continue
            items.append(item)
    if not items:
        raise BenchmarkFileError(f"{path}: no items to score ({not_valid} not validated)")
    return items, not_valid


def item_outcome(item: ValseItem, score: Callable[[str, str], float], threshold: float) -> dict:
    caption = score(item.img_id, item.caption)
    foils = [score(item.img_id, foil) for foil in item.foils]
    return {**item.info, "piece": item.piece, "id": item.id, "img_id": item.img_id, "caption": item.caption,
            "foils": list(item.foils), "caption_score": caption, "foil_scores": foils,
            "ranked": [caption > f for f in foils], "caption_fits": caption > threshold,
            "foil_detected": [f <= threshold for f in foils]}


def piece_metrics(outcomes: Sequence[dict]) -> dict[str, float]:
    ranked = [r for o in outcomes for r in o["ranked"]]
    detected = [d for o in outcomes for d in o["foil_detected"]]
    fits = [o["caption_fits"] for o in outcomes]
    p_c, p_f = sum(fits) / len(fits), sum(detected) / len(detected)
    return {"num": len(outcomes), "acc_r": sum(ranked) / len(ranked), "p_c": p_c, "p_f": p_f,
            "acc": (sum(fits) + sum(detected)) / (len(fits) + len(detected)), "min_pc_pf": min(p_c, p_f)}


def evaluate_valse(items: Sequence[ValseItem], score: Callable[[str, str], float], threshold: float) -> BenchmarkResult:
    """Per-piece acc_r, p_c, p_f, acc, min(p_c, p_f) and their unweighted means over the pieces."""
    outcomes = [item_outcome(item, score, threshold) for item in items]
    by_piece: dict[str, list[dict]] = defaultdict(list)
    for outcome in outcomes:
        by_piece[outcome["piece"]].append(outcome)
    rows = [{"piece": piece, **piece_metrics(group)} for piece, group in by_piece.items()]
    metrics = {name: sum(row[name] for row in rows) / len(rows) for name in METRICS}
    metrics.update(num_items=float(len(outcomes)), num_pieces=float(len(rows)))
    average = {"piece": "avg (unweighted over pieces)", "num": len(outcomes), **{m: metrics[m] for m in METRICS}}
    return BenchmarkResult(metrics, [Table("by piece", "piece", ["num", *METRICS], [*rows, average])], outcomes)
