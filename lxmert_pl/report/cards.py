"""The cards of a report: per shown prediction row, its picture with the top boxes and the "why" boxes drawn.

`make_cards` is the reusable piece (evaluation reports, benchmark reports): it takes prediction rows, the positions
to show, a feature lookup (img_id -> `ImageFeatures`), an optional image lookup (img_id -> picture) and an optional
explainer (sentences + features -> box weights, e.g. `Scorer.explain`), and draws each picture once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from lxmert_pl.drawing import draw_detections, image_data_uri
from lxmert_pl.features.record import ImageFeatures
from lxmert_pl.vocab import Vocabulary

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")

FeatureLookup = Callable[[str], "ImageFeatures | None"]
Explainer = Callable[[list[str], list[ImageFeatures]], list[np.ndarray]]


@dataclass
class Detections:
    """The boxes a card shows, in pixels of `image` (the raw picture, or a canvas of the recorded size)."""

    image: Image.Image
    boxes: np.ndarray  # (K, 4) x1 y1 x2 y2
    object_ids: list[int]
    labels: list[str]  # "red circle 0.98"
    names: list[str]  # "red circle"
    confidences: list[float]
    class_names: list[str]  # "circle"


@dataclass
class Card:
    """One shown row: the drawn picture as a data URI, a note when the image could not be shown, the why boxes."""

    position: int
    row: dict
    picture_uri: str | None = None
    note: str | None = None
    why: list[tuple[str, float]] = field(default_factory=list)  # (box label, attention weight)
    detections: Detections | None = None


class ImageLookup:
    """img_id -> the raw picture, from explicit paths (a one-step run's image list) and/or a folder (by file stem)."""

    def __init__(self, folder: str | Path | None = None, paths: dict[str, str | Path] | None = None):
        self.folder = Path(folder) if folder else None
        self._paths = {k: Path(v) for k, v in (paths or {}).items()}
        self._scanned = False

    def path(self, img_id: str) -> Path | None:
        if img_id not in self._paths and self.folder is not None and not self._scanned:
            self._scanned = True
            if self.folder.is_dir():
                for child in sorted(self.folder.iterdir()):
                    if child.suffix.lower() in IMAGE_SUFFIXES:
                        self._paths.setdefault(child.stem, child)
        return self._paths.get(img_id)

    def open(self, img_id: str) -> tuple[Image.Image | None, str | None]:
        """(picture, None), or (None, a note saying why there is none)."""
        path = self.path(img_id)
        if path is None:
            return None, f"image {img_id} not found in {self.folder}" if self.folder else None
        try:
            with Image.open(path) as image:
                return image.convert("RGB"), None
        except (OSError, UnidentifiedImageError, ValueError) as err:
            return None, f"image {path.name} unreadable ({type(err).__name__})"


def card_detections(record: ImageFeatures, vocabulary: Vocabulary, image: Image.Image | None,
                    max_boxes: int) -> Detections:
    """The record's boxes, most confident first (all of them: the why boxes may be any), in the picture's pixels."""
    width, height = int(record.img_w), int(record.img_h)
    picture = image if image is not None else Image.new("RGB", (max(width, 1), max(height, 1)), (46, 48, 56))
    scale = np.array([picture.width / max(width, 1), picture.height / max(height, 1)] * 2)
    order = np.argsort(-np.asarray(record.objects_conf, dtype=np.float64), kind="stable")
    boxes = np.asarray(record.boxes, dtype=np.float64)[order] * scale
    labels = [vocabulary.label(int(record.objects_id[i]), int(record.attrs_id[i]), float(record.objects_conf[i]))
              for i in order]
    object_ids = [int(record.objects_id[i]) for i in order]
    names = [vocabulary.label(int(record.objects_id[i]), int(record.attrs_id[i])) for i in order]
    return Detections(picture, boxes, object_ids, labels, names, [float(record.objects_conf[i]) for i in order],
                      [vocabulary.object_name(i) for i in object_ids])


def make_cards(
    rows: Sequence[dict],
    positions: Sequence[int],
    features: FeatureLookup,
    vocabulary: Vocabulary,
    images: ImageLookup | None = None,
    explain: Explainer | None = None,
    *,
    boxes: int = 5,
    why: int = 2,
    thumbnail: int = 256,
) -> dict[int, Card]:
    """Cards for `rows[p]`, p in `positions` (each drawn once). A row whose features cannot be had gets a card with a
    note and no picture; a missing or unreadable image is drawn on a canvas of the recorded size, with a note."""
    cards: dict[int, Card] = {}
    records: dict[int, ImageFeatures] = {}
    for position in positions:
        row = rows[position]
        card = cards[position] = Card(position, row)
        try:
            record = features(str(row["img_id"]))
        except (KeyError, OSError, ValueError) as err:
            record, card.note = None, f"no features for img_id {row['img_id']} ({type(err).__name__})"
        if record is not None:
            records[position] = record
    weights: dict[int, np.ndarray] = {}
    if explain is not None and why > 0 and records:
        shown = list(records)
        for position, w in zip(shown, explain([str(rows[p]["sent"]) for p in shown], [records[p] for p in shown])):
            weights[position] = np.asarray(w)
    for position, record in records.items():
        card = cards[position]
        image, card.note = images.open(str(card.row["img_id"])) if images is not None else (None, None)
        card.detections = card_detections(record, vocabulary, image, boxes)
        attended: list[tuple[int, float]] = []
        if position in weights and len(weights[position]):
            order = np.argsort(-np.asarray(record.objects_conf, dtype=np.float64), kind="stable")
            rank_of = {int(box): k for k, box in enumerate(order)}  # record box -> position in drawn order
            top = np.argsort(-weights[position], kind="stable")[:why]
            attended = [(rank_of[int(b)], float(weights[position][b])) for b in top]
            card.why = [(card.detections.names[k], w) for k, w in attended]
        labels = list(card.detections.labels)
        for k, _ in attended:  # the why tag carries the weight instead of the confidence
            labels[k] = card.detections.names[k]
        picture = draw_detections(card.detections.image, card.detections.boxes, labels,
                                  attended=attended, max_boxes=boxes, long_side=thumbnail)
        card.picture_uri = image_data_uri(picture, long_side=thumbnail)
    return cards


__all__ = ["Card", "Detections", "ImageLookup", "make_cards", "card_detections"]
