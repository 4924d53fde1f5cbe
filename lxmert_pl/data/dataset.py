"""Image-text matching dataset: pairs + a feature source + the tokenizer -> model inputs, and their collate.

Features are read per item from the source (one indexed row of a TSV, or a slice of a memory-mapped store), so
the memory used follows the batch, not the feature file. Boxes are normalised as in the original LXMERT loader
(x by image width, y by height; a value outside [0, 1] beyond 1e-5 is an error naming the img_id).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from lxmert_pl.errors import LxmertPlError, UserInputError
from lxmert_pl.features.sources import FeatureSource
from lxmert_pl.pairs.io import Pair
from lxmert_pl.tokenizer import LxmertTokenizer

logger = logging.getLogger(__name__)

UNKNOWN_LABEL = -1
_SHOWN_MISSING = 5


class MissingFeaturesError(LxmertPlError, LookupError):
    """Pairs name img_ids that the feature source does not hold."""


def _missing_summary(missing: Sequence[Pair], total: int, source: FeatureSource) -> str:
    distinct = list(dict.fromkeys(pair.img_id for pair in missing))
    shown = ", ".join(repr(img_id) for img_id in distinct[:_SHOWN_MISSING])
    more = f" and {len(distinct) - _SHOWN_MISSING} more" if len(distinct) > _SHOWN_MISSING else ""
    return (
        f"{len(missing):,} of {total:,} pairs name {len(distinct):,} img_id(s) with no features in "
        f"{source.describe()}: {shown}{more}"
    )


def _check_sentences(pairs: Sequence[Pair]) -> None:
    for pair in pairs:
        if not isinstance(pair.sent, str) or not pair.sent.strip():
            raise UserInputError(f"pair #{pair.index} (img_id {pair.img_id!r}): empty or whitespace-only sentence")


class MatchingDataset(Dataset):
    """Items for the matching head, one per pair whose image the source holds.

    Every pair's img_id is looked up when the dataset is built: a missing one raises MissingFeaturesError
    (how many, and the first img_ids), or with `skip_missing=True` the pair is left out, counted in a logged
    warning and kept in `skipped`.

    Item: `index` (the pair's position in its file), `img_id`, `sent`, `input_ids`/`attention_mask`/
    `token_type_ids` (L,), `features` (n, D) float32, `boxes` (n, 4) normalised float32, `label` (1, 0 or -1).
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        source: FeatureSource,
        tokenizer: LxmertTokenizer,
        skip_missing: bool = False,
    ):
        _check_sentences(pairs)
        present = [pair.img_id in source for pair in pairs]
        self.skipped = [pair for pair, found in zip(pairs, present) if not found]
        if self.skipped:
            summary = _missing_summary(self.skipped, len(pairs), source)
            if not skip_missing:
                raise MissingFeaturesError(f"{summary}; pass skip_missing=True to leave those pairs out")
            logger.warning("skipping %s (the skipped pairs are in `.skipped`)", summary)
        self.pairs = [pair for pair, found in zip(pairs, present) if found]
        self.source = source
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, position: int) -> dict:
        pair = self.pairs[position]
        feat = self.source.get(pair.img_id)
        tokens = self.tokenizer([pair.sent])
        return {
            "index": pair.index,
            "img_id": pair.img_id,
            "sent": pair.sent,
            "input_ids": tokens["input_ids"][0],
            "attention_mask": tokens["attention_mask"][0],
            "token_type_ids": tokens["token_type_ids"][0],
            "features": torch.from_numpy(np.array(feat.features, dtype=np.float32)),
            "boxes": torch.from_numpy(feat.normalized_boxes()),
            "label": UNKNOWN_LABEL if pair.label is None else int(pair.label),
        }


def collate_matching(items: Sequence[dict]) -> dict:
    """Stack items, padding boxes to the batch's largest count (zeros; `box_mask` is 1 for real boxes)."""
    dims = {int(item["features"].shape[1]) for item in items}
    if len(dims) > 1:
        example_of = {int(item["features"].shape[1]): item["img_id"] for item in items}
        described = ", ".join(f"dim {dim} (img_id {img_id!r})" for dim, img_id in sorted(example_of.items()))
        raise UserInputError(f"features of different dims in one batch: {described}")
    batch_size = len(items)
    max_boxes = max(int(item["features"].shape[0]) for item in items)
    # Filled with numpy: torch's multi-threaded copies of these sizes can cost milliseconds on a busy CPU.
    features = np.zeros((batch_size, max_boxes, dims.pop()), dtype=np.float32)
    boxes = np.zeros((batch_size, max_boxes, 4), dtype=np.float32)
    box_mask = np.zeros((batch_size, max_boxes), dtype=np.int64)
    for row, item in enumerate(items):
        num_boxes = item["features"].shape[0]
        features[row, :num_boxes] = item["features"].numpy()
        boxes[row, :num_boxes] = item["boxes"].numpy()
        box_mask[row, :num_boxes] = 1
    return {
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
        "img_id": [item["img_id"] for item in items],
        "sent": [item["sent"] for item in items],
        "input_ids": torch.stack([item["input_ids"] for item in items]),
        "attention_mask": torch.stack([item["attention_mask"] for item in items]),
        "token_type_ids": torch.stack([item["token_type_ids"] for item in items]),
        "features": torch.from_numpy(features),
        "boxes": torch.from_numpy(boxes),
        "box_mask": torch.from_numpy(box_mask),
        "labels": torch.tensor([item["label"] for item in items], dtype=torch.long),
    }
