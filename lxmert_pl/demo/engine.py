"""What the demo page does with an image and some sentences, without Gradio: checks, scores, drawings.

Everything goes through one `lxmert_pl.Matcher` (no second scoring path): `score` for the table, `detect` for the
boxes, `explain` for the regions behind a sentence. The Matcher caches detections by image content, so a new
sentence on the same image does not run the detector again.

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
from lxmert_pl.drawing import draw_detections
from lxmert_pl.errors import UserInputError
from lxmert_pl.scoring import Scorer

MAX_PIXELS = 40_000_000  # the largest picture the page takes (width x height); the detector resizes it anyway
MAX_SENTENCES = 16  # sentences per query
DISPLAY_LONG_SIDE = 512  # a smaller picture is drawn scaled up to this long side, for legible labels ...
DISPLAY_MAX_SIDE = 1024  # ... and a larger one scaled down to at most this (a quick page)
MAX_DRAWN = 10  # detections drawn (the most confident); the attended ones always are
MAX_ATTENDED = 3  # the "why": at most this many boxes, the ones holding most of the sentence's attention
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


def top_attended(weights: np.ndarray, most: int = MAX_ATTENDED) -> list[tuple[int, float]]:
    """(box, weight) of the boxes holding most attention: the largest first, at most `most`, each at least half
    the largest one's weight."""
    order = np.argsort(-weights, kind="stable")[:most]
    return [(int(i), float(weights[i])) for i in order if weights[i] >= 0.5 * weights[order[0]]]


def detection_labels(detections) -> list[str]:
    """A label per detected box: the Matcher's (from the detector's vocabulary) when it gives them."""
    labels = getattr(detections, "labels", None)
    if labels is not None:
        return list(labels)
    record = detections.features
    return [f"class {int(c)} {p:.2f}" for c, p in zip(record.objects_id, record.objects_conf)]


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
        self._explainer: Scorer | None = None

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
        """The image with its detections (the most confident `MAX_DRAWN` of them), and `sentence`'s attended boxes
        highlighted (dashed, with their share of the attention) when one is given."""
        detections = self.matcher.detect(query.path, given_boxes=query.given_boxes)
        record = detections.features
        order = np.argsort(-record.objects_conf, kind="stable")  # most confident first: they are the ones drawn
        labels = detection_labels(detections)
        attended = ()
        if sentence is not None:
            weights = self.explain(query, sentence)
            position = {int(box): rank for rank, box in enumerate(order)}
            attended = [(position[i], w) for i, w in top_attended(weights)]
        long_side = min(max(DISPLAY_LONG_SIDE, max(query.image.size)), DISPLAY_MAX_SIDE)
        return draw_detections(query.image, record.boxes[order], [labels[i] for i in order], attended=attended,
                               max_boxes=MAX_DRAWN, long_side=long_side)

    def explain(self, query: Query, sentence: str) -> np.ndarray:
        """The weight of each detected box in the sentence's last cross-layer attention (sums to 1): the report's
        "why" (`Scorer.explain`) on the Matcher's cached detections. ADAPTER: the Matcher has no explain() yet."""
        record = self.matcher.detect(query.path, given_boxes=query.given_boxes).features
        if self._explainer is None:
            self._explainer = Scorer(self.matcher.model, self.matcher.tokenizer, device=self.matcher.device)
        return self._explainer.explain([sentence], [record.features], [record.normalized_boxes()])[0]

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
