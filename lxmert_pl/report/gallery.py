"""Which prediction rows a report shows: the galleries of an evaluation (pure selection, no drawing).

Labelled rows: false positives with the highest scores, false negatives with the lowest, the most uncertain
(|score - threshold| smallest) and a seeded sample of correct ones. Unlabelled rows (test dumps): highest, lowest,
most uncertain. Rows are the dicts of `predictions.json` (`score`, `answer`, optional `ground`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence


@dataclass
class Gallery:
    """One gallery: `key` (an HTML id), a title, a one-line description, the total rows of its kind and the shown
    rows' positions in the prediction rows."""

    key: str
    title: str
    description: str
    total: int
    rows: list[int] = field(default_factory=list)


def _is_labelled(row: dict) -> bool:
    return row.get("ground") in ("True", "False")


def select_galleries(rows: Sequence[dict], threshold: float, cards: int, seed: int = 0) -> list[Gallery]:
    """The galleries of `rows` with at most `cards` rows each (0: none)."""
    if cards <= 0 or not rows:
        return []
    labelled = [i for i, row in enumerate(rows) if _is_labelled(row)]
    uncertain = sorted(range(len(rows)), key=lambda i: (abs(rows[i]["score"] - threshold), i))
    if not labelled:
        by_score = sorted(range(len(rows)), key=lambda i: (rows[i]["score"], i))
        return [
            Gallery("highest", "Highest scores", "the pairs the model finds most likely to match", len(rows),
                    by_score[::-1][:cards]),
            Gallery("lowest", "Lowest scores", "the pairs the model finds least likely to match", len(rows),
                    by_score[:cards]),
            Gallery("uncertain", "Most uncertain", f"scores closest to the threshold {threshold:g}", len(rows),
                    uncertain[:cards]),
        ]
    false_pos = [i for i in labelled if rows[i]["answer"] == "True" and rows[i]["ground"] == "False"]
    false_neg = [i for i in labelled if rows[i]["answer"] == "False" and rows[i]["ground"] == "True"]
    correct = [i for i in labelled if rows[i]["answer"] == rows[i]["ground"]]
    false_pos.sort(key=lambda i: (-rows[i]["score"], i))
    false_neg.sort(key=lambda i: (rows[i]["score"], i))
    sample = sorted(random.Random(seed).sample(correct, min(cards, len(correct))))
    labelled_uncertain = [i for i in uncertain if _is_labelled(rows[i])]
    return [
        Gallery("false-positives", "False positives", "ground False, answered True: highest scores first",
                len(false_pos), false_pos[:cards]),
        Gallery("false-negatives", "False negatives", "ground True, answered False: lowest scores first",
                len(false_neg), false_neg[:cards]),
        Gallery("uncertain", "Most uncertain", f"labelled pairs with scores closest to the threshold {threshold:g}",
                len(labelled), labelled_uncertain[:cards]),
        Gallery("correct", "Correct (a sample)", f"a random sample of the correct answers (seed {seed})",
                len(correct), sample),
    ]


def shown_rows(galleries: Sequence[Gallery]) -> list[int]:
    """Every row position shown by any gallery, each once, in first-shown order."""
    return list(dict.fromkeys(i for gallery in galleries for i in gallery.rows))


__all__ = ["Gallery", "select_galleries", "shown_rows"]
