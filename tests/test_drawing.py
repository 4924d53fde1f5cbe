"""Drawing detections (lxmert_pl/drawing.py) and the headless-browser helper (tests/browser.py)."""

from __future__ import annotations

import base64
import io

import numpy as np
from browser import open_page
from PIL import Image

from lxmert_pl.drawing import ATTENDED_COLOUR, CANVAS_COLOUR, draw_detections, image_data_uri, label_colour


def _colour_count(picture: Image.Image, colour) -> int:
    return int(np.all(np.asarray(picture) == np.array(colour, dtype=np.uint8), axis=-1).sum())


def test_boxes_and_labels_are_drawn_at_the_scaled_position():
    image = Image.new("RGB", (200, 100), (0, 0, 0))
    boxes = np.array([[100, 50, 180, 90], [10, 10, 40, 40]], dtype=np.float32)
    out = draw_detections(image, boxes, ["red circle 0.93", "blue star 0.50"], long_side=400, max_boxes=1)
    assert out.size == (400, 200) and out.mode == "RGB"
    colour = label_colour("red circle 0.93")
    pixels = np.asarray(out)
    assert tuple(pixels[170, 359]) == colour  # the right edge of box 0, scaled x2 (inside the 2 px outline)
    assert tuple(pixels[60, 40]) == (0, 0, 0)  # box 1 is beyond max_boxes: not drawn
    assert _colour_count(out, colour) > 300  # outline + the label tag's fill
    assert label_colour("red circle 0.12") == colour  # the colour follows the class, not the confidence


def test_attended_boxes_are_dashed_and_drawn_beyond_max_boxes():
    boxes = np.array([[5, 5, 60, 60], [70, 20, 150, 90]], dtype=np.float32)
    out = draw_detections(None, boxes, ["a", "b"], size=(160, 100), attended=[(1, 0.75)], max_boxes=0)
    assert out.size == (160, 100)
    assert tuple(np.asarray(out)[2, 2]) == CANVAS_COLOUR
    assert _colour_count(out, ATTENDED_COLOUR) > 100
    column = np.asarray(out)[:, 150]  # the dashed right edge alternates yellow and dark
    yellow = np.all(column == np.array(ATTENDED_COLOUR, dtype=np.uint8), axis=-1)
    assert yellow[25:88].any() and not yellow[25:88].all()


def test_image_data_uri_is_a_small_jpeg():
    uri = image_data_uri(Image.new("RGB", (1000, 500), (200, 10, 10)), long_side=256)
    assert uri.startswith("data:image/jpeg;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert decoded.format == "JPEG" and decoded.size == (256, 128)


def test_browser_helper_sees_images_and_console_errors(tmp_path):
    uri = image_data_uri(draw_detections(None, np.array([[4, 4, 40, 40]]), ["x"], size=(64, 48)))
    page_file = tmp_path / "page.html"
    page_file.write_text(f'<!doctype html><html><body><img id="ok" src="{uri}"><img id="bad" src="missing.png">'
                         f'<script>console.error("boom")</script></body></html>', encoding="utf-8")
    with open_page(page_file, tmp_path / "shot.png") as page:
        widths = {img["src_prefix"][:10]: img["natural_width"] for img in page.images}
        assert widths["data:image"] == 64
        assert sum(1 for img in page.images if img["natural_width"] == 0) == 1
        assert any("boom" in e for e in page.console_errors)
        assert page.run("return document.images.length") == 2
    assert Image.open(tmp_path / "shot.png").width == 1280
