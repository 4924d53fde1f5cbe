"""The bundled sample scenes as the demo page uses them: its examples, and their ground-truth boxes.

The bundled demo detector is not trained to detect (data/sample/README.md): on the sample images the demo extracts
features at the scenes' boxes (`data/sample/boxes.json`), as `python eval.py` does. An image reaches the page as an
upload (a copy under another path, maybe another name), so a sample image is recognised by its decoded pixels, not
its path: `SampleBoxes.lookup(image)` gives its boxes, or None for any other picture.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE_DIR = REPO_ROOT / "data" / "sample"
# Val scenes shown as examples: each with one true caption and two false sentences of the sample's pairs
# (negatives name a colour+shape the image does not hold). Chosen among scenes the demo matcher gets right.
EXAMPLE_IDS = ("sample_val_000000", "sample_val_000003", "sample_val_000006", "sample_val_000011")


def pixel_key(image: Image.Image) -> str:
    """Content key of a picture: its size and RGB pixels (not its file bytes, which a re-encoding changes)."""
    rgb = np.asarray(image.convert("RGB"))
    return f"{rgb.shape[1]}x{rgb.shape[0]}:" + hashlib.sha1(rgb.tobytes()).hexdigest()


@dataclass
class Example:
    img_id: str
    path: Path
    sentences: list[str]  # the true caption first

    @property
    def text(self) -> str:
        return "\n".join(self.sentences)


class SampleBoxes:
    """Ground-truth boxes of the bundled sample images, found by picture content (lazily indexed, val and test)."""

    def __init__(self, sample_dir: str | Path = SAMPLE_DIR, splits: tuple[str, ...] = ("val", "test")):
        self.sample_dir = Path(sample_dir)
        self.splits = splits
        self._boxes: dict[str, list[list[float]]] | None = None
        self._by_pixels: dict[str, str] | None = None

    @property
    def available(self) -> bool:
        return (self.sample_dir / "boxes.json").is_file()

    def boxes(self, img_id: str) -> list[list[float]]:
        if self._boxes is None:
            self._boxes = json.loads((self.sample_dir / "boxes.json").read_text(encoding="utf-8"))
        return self._boxes[img_id]

    def lookup(self, image: Image.Image) -> tuple[str, list[list[float]]] | None:
        """(img_id, boxes) when `image` is one of the indexed sample images, else None."""
        if not self.available:
            return None
        if self._by_pixels is None:
            index = {}
            for split in self.splits:
                for path in sorted((self.sample_dir / "images" / split).glob("*.png")):
                    with Image.open(path) as im:
                        index[pixel_key(im)] = path.stem
            self._by_pixels = index
        img_id = self._by_pixels.get(pixel_key(image))
        return None if img_id is None else (img_id, self.boxes(img_id))


def load_examples(sample_dir: str | Path = SAMPLE_DIR, ids: tuple[str, ...] = EXAMPLE_IDS) -> list[Example]:
    """The page's examples: each listed val scene with its first true caption and two false sentences."""
    sample_dir = Path(sample_dir)
    pairs_file, captions_file = sample_dir / "val_pairs.json", sample_dir / "captions_val.json"
    if not (pairs_file.is_file() and captions_file.is_file()):
        return []
    captions = {row["img_id"]: row["sentf"]["mscoco"] for row in json.loads(captions_file.read_text("utf-8"))}
    false = [row for row in json.loads(pairs_file.read_text("utf-8")) if row["ground"] == "False"]
    examples = []
    for n, img_id in enumerate(ids):
        own = [row["sent"] for row in false if row["img_id"] == img_id]
        other = [row["sent"] for row in false if row["img_id"] == ids[(n + 1) % len(ids)]]
        examples.append(Example(img_id, sample_dir / "images" / "val" / f"{img_id}.png",
                                [captions[img_id][0]] + own[:1] + other[:1]))
    return examples
