"""Detections as pictures: each image of a feature file with its boxes, labels and confidences drawn, to PNG.

    python -m lxmert_pl.features show F.tsv --images DIR (--ids ID ... | --first N) --out DIR [--boxes 10]

Used by `extract.py --show N` too. Label names come from the detector that made the file (its provenance sidecar),
else from `--detector`, else Visual Genome's names (the released features), else "class N" (see `lxmert_pl.vocab`).
An image missing from `--images` is drawn on a blank canvas of the recorded size (and said so).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from pathlib import Path

from lxmert_pl.drawing import draw_detections
from lxmert_pl.errors import UserInputError
from lxmert_pl.features.provenance import read_settings
from lxmert_pl.features.record import ImageFeatures
from lxmert_pl.features.sources import iter_source_features, open_feature_source
from lxmert_pl.fileio import atomic_writer
from lxmert_pl.vocab import Vocabulary, load_vocabulary

logger = logging.getLogger(__name__)

DEFAULT_LONG_SIDE = 512  # small images are drawn larger, so that labels stay legible


def vocabulary_for(paths: Sequence[str | Path], detector: str | None = None) -> Vocabulary:
    """The names for a feature file: `detector` (an alias or folder), else the one its sidecar records."""
    from lxmert_pl.registry import RegistryError, resolve_checkpoint

    names = [detector] if detector else []
    names += [s.detector for s in (read_settings(p) for p in paths if Path(p).is_file()) if s is not None]
    for name in names:
        try:
            return load_vocabulary(resolve_checkpoint(name, download=False, progress=False).path)
        except (RegistryError, OSError):
            continue
    return load_vocabulary()


def draw_record(record: ImageFeatures, images, vocabulary: Vocabulary, *, max_boxes: int = 10,
                long_side: int | None = DEFAULT_LONG_SIDE):
    """(picture, note): the record's boxes drawn on its image from `images` (a folder or an `ImageLookup`), or on a
    canvas of the recorded size (with a note why)."""
    from lxmert_pl.report.cards import ImageLookup, card_detections

    lookup = images if isinstance(images, ImageLookup) or images is None else ImageLookup(images)
    image, note = lookup.open(record.img_id) if lookup is not None else (None, None)
    det = card_detections(record, vocabulary, image, max_boxes)
    picture = draw_detections(det.image, det.boxes, det.labels, max_boxes=max_boxes, long_side=long_side or None)
    return picture, note


def show_features(paths: Sequence[str | Path], out_dir: str | Path, *, images=None,
                  ids: Sequence[str] = (), first: int | None = None, max_boxes: int = 10,
                  long_side: int | None = DEFAULT_LONG_SIDE, detector: str | None = None) -> list[Path]:
    """Write `<out_dir>/<img_id>.png` for the chosen rows (`ids`, else the `first` N); returns the PNG paths.
    `images`: a folder of the raw images or an `ImageLookup`; None: blank canvases."""
    if not ids and not first:
        raise UserInputError("choose the images: --ids ID [ID ...] or --first N")
    source = open_feature_source([str(p) for p in paths])
    vocabulary = vocabulary_for(paths, detector)
    missing = [i for i in ids if i not in source]
    if missing:
        raise UserInputError(f"img_id {missing[0]!r} is not in {', '.join(map(str, paths))}"
                             + (f" ({len(missing)} ids missing)" if len(missing) > 1 else ""))
    records = [source.get(i) for i in ids] if ids else list(itertools.islice(iter_source_features(source), first))
    if images is not None and not hasattr(images, "open"):
        from lxmert_pl.report.cards import ImageLookup

        images = ImageLookup(images)  # one folder scan for all the records
    out_dir = Path(out_dir)
    written = []
    for record in records:
        picture, note = draw_record(record, images, vocabulary, max_boxes=max_boxes, long_side=long_side)
        if note:
            logger.warning("%s: %s; drawn on a blank canvas", record.img_id, note)
        path = out_dir / f"{record.img_id}.png"
        with atomic_writer(path, "wb") as handle:
            picture.save(handle, format="PNG")
        written.append(path)
    return written


__all__ = ["show_features", "draw_record", "vocabulary_for"]
