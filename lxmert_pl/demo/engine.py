"""What the demo page does with an image and some sentences, without Gradio: checks, scores, drawings.

Everything goes through one `lxmert_pl.Matcher` (no second scoring path): `score` for the table, `detect` for the
boxes, `explain` for the regions behind a sentence. The Matcher caches detections by image content, so a new
sentence on the same image does not run the detector again.

User errors (not an image, no sentence, an image too large) raise `UserInputError` with one plain sentence; the
page shows it as a Gradio error.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from lxmert_pl.demo.samples import SampleBoxes
from lxmert_pl.errors import UserInputError

MAX_PIXELS = 40_000_000  # the largest picture the page takes (width x height); the detector resizes it anyway
MAX_SENTENCES = 16  # sentences per query
DISPLAY_LONG_SIDE = 512  # the drawn picture is scaled up (never down) to about this long side, for legible labels
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
    """The demo's work on one loaded Matcher; `samples`: the bundled scenes' boxes (None: always detect)."""

    def __init__(self, matcher, samples: SampleBoxes | None = None, max_pixels: int = MAX_PIXELS):
        self.matcher = matcher
        self.samples = samples
        self.max_pixels = max_pixels
        self._queries: OrderedDict[str, Query] = OrderedDict()  # upload path -> checked image (uploads never change)

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
                probe.load()
                image = probe.copy()
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
        scores = np.asarray(self.matcher.score(query.path, sentences, given_boxes=self._given(query), mode=mode))
        order = np.argsort(-scores, kind="stable")
        return Ranked([sentences[i] for i in order], scores[order], mode)

    def draw(self, query: Query, sentence: str | None = None) -> Image.Image:
        """The image with its detections, and `sentence`'s attended boxes highlighted when one is given."""
        given = self._given(query)
        detections = self.matcher.detect(query.path, given_boxes=given)
        attended = () if sentence is None else self.matcher.explain(query.path, sentence, given_boxes=given)
        scale = max(1, DISPLAY_LONG_SIDE // max(query.image.size))
        return self.matcher.draw(query.path, detections, attended=attended, scale=scale)

    def _given(self, query: Query):
        return None if query.given_boxes is None else [query.given_boxes]
