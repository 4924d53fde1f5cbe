"""The demo page (`python -m lxmert_pl.demo`, lxmert_pl/demo/): its input checks, its answers through gradio_client
against `Matcher.score`, the detector cache across queries, the page itself in headless Chromium, and the command.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lxmert_pl.demo.engine import DemoEngine, parse_sentences
from lxmert_pl.demo.samples import SAMPLE_DIR, SampleBoxes, load_examples
from lxmert_pl.errors import UserInputError

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
VAL_IMAGE = SAMPLE_DIR / "images" / "val" / "sample_val_000000.png"


# ------------------------------------------------------------------------------------------- input checks


def test_sentences_one_a_line_blank_lines_dropped_none_refused():
    assert parse_sentences("a red circle\n\n  a blue star  \n") == ["a red circle", "a blue star"]
    with pytest.raises(UserInputError, match="at least one sentence"):
        parse_sentences(" \n\n")
    with pytest.raises(UserInputError, match="at most 3"):
        parse_sentences("a\nb\nc\nd", limit=3)


def test_open_image_refuses_a_non_image_and_a_too_large_image_naming_the_limit(tmp_path):
    engine = DemoEngine(matcher=None, samples=None, max_pixels=10_000)
    text = tmp_path / "notes.txt"
    text.write_text("not a picture")
    with pytest.raises(UserInputError, match="notes.txt is not an image"):
        engine.open_image(str(text))
    big = tmp_path / "big.png"
    Image.new("RGB", (200, 100)).save(big)
    with pytest.raises(UserInputError, match=r"200 x 100 = 0.02 megapixels; the limit is 0.01 megapixels"):
        engine.open_image(str(big), "big.png")
    with pytest.raises(UserInputError, match="drop an image first"):
        engine.open_image(None)


def test_a_sample_scene_is_recognised_by_its_pixels_under_any_name(tmp_path):
    samples = SampleBoxes()
    renamed = tmp_path / "upload.png"
    shutil.copy(VAL_IMAGE, renamed)
    engine = DemoEngine(matcher=None, samples=samples)
    query = engine.open_image(str(renamed))
    assert query.sample_id == "sample_val_000000"
    assert query.given_boxes == samples.boxes("sample_val_000000")
    changed = np.asarray(Image.open(VAL_IMAGE).convert("RGB")).copy()
    changed[0, 0] ^= 1  # one pixel differs: not the sample scene any more
    Image.fromarray(changed).save(tmp_path / "changed.png")
    assert engine.open_image(str(tmp_path / "changed.png")).given_boxes is None


def test_examples_hold_the_true_caption_first_and_two_false_sentences():
    examples = load_examples()
    assert len(examples) >= 3
    for example in examples:
        assert example.path.is_file() and len(example.sentences) == 3
        assert len(set(example.sentences)) == 3
