"""What the demo page does with an image and some sentences, without Gradio: checks, scores, drawings.

Everything goes through one `lxmert_pl.Matcher` (no second scoring path): `score` for the table, `draw` for the
labelled boxes and the regions behind a sentence (its `explain`). The Matcher caches detections by image content,
so a new sentence on the same image does not run the detector again.

User errors (not an image, no sentence, an image too large) raise `UserInputError` with one plain sentence; the
page shows it as a Gradio error.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lxmert_pl.demo.samples import SampleBoxes
from lxmert_pl.errors import UserInputError

MAX_PIXELS = 40_000_000  # the largest picture the page takes (width x height); the detector resizes it anyway
MAX_SENTENCES = 16  # sentences per query
DISPLAY_LONG_SIDE = 512  # a smaller picture is drawn scaled up to this long side, for legible labels ...
DISPLAY_MAX_SIDE = 1024  # ... and a larger one scaled down to at most this (a quick page)
MODE_NAMES = {"itm": "P(matched)", "cosine": "cosine"}


@dataclass
class Query:
    """A checked input image: the picture, a name for messages, and the sample scene's boxes when it is one."""

    path: str
    name: str
    image: Image.Image
    given_boxes: list[list[float]] | None
    sample_id: str | None


@dataclass
class Ranked:
    """The sentences of one query, best first, with their scores (as `Matcher.score` returned them)."""

    sentences: list[str]
    scores: np.ndarray
    mode: str


def parse_sentences(text: str | None, limit: int = MAX_SENTENCES) -> list[str]:
    """One sentence a line; blank lines dropped; at least one, at most `limit`."""
    sentences = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not sentences:
        raise UserInputError("type at least one sentence (one a line)")
    if len(sentences) > limit:
        raise UserInputError(f"{len(sentences)} sentences: the page takes at most {limit} at a time")
    return sentences


class DemoEngine:
    """The demo's work on one loaded Matcher; `samples`: the bundled scenes' boxes (None: always detect);
    `demo_weights`: the bundled demo weights are loaded (its detector means nothing outside the sample scenes)."""

    def __init__(self, matcher, samples: SampleBoxes | None = None, max_pixels: int = MAX_PIXELS,
                 demo_weights: bool = False):
        self.matcher = matcher
        self.demo_weights = demo_weights
        self.samples = samples
        self.max_pixels = max_pixels
        self._queries: OrderedDict[str, Query] = OrderedDict()  # upload path -> checked image (uploads never change)
        self._siblings: dict[str, object] = {}  # score mode -> Matcher

    # ------------------------------------------------------------------------------------------- inputs

    def open_image(self, path: str | None, name: str | None = None) -> Query:
        """Check an uploaded file: readable as an image, not too large. Remembers the last few uploads."""
        if not path:
            raise UserInputError("drop an image first (or pick one of the examples below)")
        name = name or Path(path).name
        if path in self._queries:
            self._queries.move_to_end(path)
            return self._queries[path]
        try:
            with Image.open(path) as probe:  # reads the header only: the size is known before decoding
                width, height = probe.size
                if width * height > self.max_pixels:
                    raise UserInputError(
                        f"{name} is too large: {width} x {height} = {width * height / 1e6:.3g} megapixels; "
                        f"the limit is {self.max_pixels / 1e6:g} megapixels")
                image = ImageOps.exif_transpose(probe)  # as the Matcher reads it: its boxes are in these pixels
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError) as err:
            if isinstance(err, Image.DecompressionBombError):
                raise UserInputError(f"{name} is too large (the limit is {self.max_pixels / 1e6:g} megapixels)")
            raise UserInputError(f"{name} is not an image that can be read (PNG, JPEG, WebP, BMP, TIFF ...)") from None
        found = self.samples.lookup(image) if self.samples is not None else None
        query = Query(str(path), name, image, None if found is None else found[1], None if found is None else found[0])
        self._queries[path] = query
        while len(self._queries) > 8:
            self._queries.popitem(last=False)
        return query

    # ------------------------------------------------------------------------------------------- work

    def rank(self, query: Query, sentences: list[str], mode: str | None = None) -> Ranked:
        """Score every sentence against the image (one `Matcher.score` call) and sort them, best first."""
        mode = mode or self.matcher.mode
        matcher = self._in_mode(mode)
        scores = np.asarray(matcher.score(query.path, sentences, given_boxes=self._given(query)))
        order = np.argsort(-scores, kind="stable")
        return Ranked([sentences[i] for i in order], scores[order], mode)

    def draw(self, query: Query, sentence: str | None = None) -> Image.Image:
        """The image with its detections (`Matcher.draw`: the most confident ones, labelled) and, for `sentence`,
        the boxes it attended to most (`Matcher.explain`: the report's "why"), dashed with their share."""
        long_side = min(max(DISPLAY_LONG_SIDE, max(query.image.size)), DISPLAY_MAX_SIDE)
        return self.matcher.draw(query.path, sentence, given_boxes=query.given_boxes, long_side=long_side)

    def _in_mode(self, mode: str):
        """The Matcher scoring in `mode`: itself, or a sibling sharing its model, detector and detection cache.
        ADAPTER: a Matcher fixes its mode when built (its retriever holds it); the page switches per query."""
        if mode == self.matcher.mode:
            return self.matcher
        if mode not in self._siblings:
            from lxmert_pl.retrieval import Retriever, check_mode

            check_mode(self.matcher.model, mode)
            sibling = copy.copy(self.matcher)
            sibling.mode = mode
            sibling._retriever = Retriever(self.matcher.model, self.matcher.tokenizer, device=self.matcher.device,
                                           mode=mode, batch_size=self.matcher.batch_size)
            self._siblings[mode] = sibling
        return self._siblings[mode]

    def describe(self, query: Query) -> str:
        """One line under the drawing: where the boxes come from (and a warning where they mean nothing)."""
        if query.sample_id is not None:
            return (f"{query.sample_id}: a bundled sample scene; its regions are the scene's own boxes "
                    "(data/sample/boxes.json), as `python eval.py` uses them.")
        if self.demo_weights:
            return ("Not one of the sample scenes: the bundled demo detector is not trained to detect, so these "
                    "boxes and scores mean nothing here (start the demo with real weights for your own pictures).")
        return f"{query.name}: the detector's boxes."

    def _given(self, query: Query):
        return None if query.given_boxes is None else [query.given_boxes]
