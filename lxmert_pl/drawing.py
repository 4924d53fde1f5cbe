"""Draw detections: boxes with their labels on an image (or a blank canvas), and embed pictures in HTML.

One function draws for every place that shows boxes: the evaluation report's cards, `python -m lxmert_pl.features
show`, `extract.py --show` and the images logged to wandb. The picture is resized FIRST and drawn on afterwards, so
labels keep a fixed, legible pixel size whatever the image's size.

`attended` boxes (the "why" of `lxmert_pl.explain`) are drawn dashed in one colour with their weight as a
percentage; the other boxes get a solid outline and a label tag in a colour of their own label.
"""

from __future__ import annotations

import base64
import hashlib
import io
from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CANVAS_COLOUR = (46, 48, 56)  # neutral dark grey, for runs without images
ATTENDED_COLOUR = (255, 214, 0)  # the "why" boxes: yellow, dashed
# Distinct, saturated colours that read on dark and light pictures; a label's colour is fixed by its text.
PALETTE = [(0, 200, 255), (255, 99, 132), (80, 220, 100), (255, 159, 64), (190, 120, 255), (0, 230, 180),
           (255, 120, 220), (170, 210, 40), (120, 160, 255), (255, 90, 60)]
FONT_PX = 11  # label text height at the drawn size
DEFAULT_CANVAS = (256, 256)


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont:
    """DejaVu Sans Bold where the system has it, else Pillow's built-in scalable font."""
    for name in ("DejaVuSans-Bold.ttf", "DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default(size=size)


def label_colour(label: str) -> tuple[int, int, int]:
    """A palette colour fixed by the label's class part (the text before the confidence), stable across runs."""
    key = " ".join(word for word in str(label).split() if not _is_number(word))
    return PALETTE[int(hashlib.md5(key.encode("utf-8")).hexdigest(), 16) % len(PALETTE)]


def _is_number(word: str) -> bool:
    try:
        float(word.rstrip("%"))
    except ValueError:
        return False
    return True


def draw_detections(
    image: Image.Image | None,
    boxes: np.ndarray,
    labels: Sequence[str],
    *,
    size: tuple[int, int] | None = None,
    attended: Sequence[tuple[int, float]] = (),
    max_boxes: int = 10,
    long_side: int | None = None,
) -> Image.Image:
    """The picture with boxes drawn, RGB.

    `boxes`: (N, 4) x1, y1, x2, y2 in pixels of the ORIGINAL image; `labels[i]` names `boxes[i]`. The first
    `max_boxes` boxes are drawn (order them by confidence first), plus every `attended` (box index, weight) pair,
    dashed, with its weight in percent. `image` None: a neutral canvas of `size` = (width, height). `long_side`: the
    result is scaled so that its long side is this many pixels (labels are drawn after scaling, so they stay legible).
    """
    if image is None:
        width, height = (int(size[0]), int(size[1])) if size else DEFAULT_CANVAS
        picture = Image.new("RGB", (max(width, 1), max(height, 1)), CANVAS_COLOUR)
    else:
        picture = image.convert("RGB")
    orig_w, orig_h = picture.size
    scale = 1.0
    if long_side:
        scale = long_side / max(orig_w, orig_h)
        new_size = (max(1, round(orig_w * scale)), max(1, round(orig_h * scale)))
        picture = picture.resize(new_size, Image.LANCZOS if scale < 1 else Image.BICUBIC)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * scale
    draw = ImageDraw.Draw(picture)
    side = max(picture.size)  # 11 px text at a 256 px thumbnail, growing slower than the picture above that
    font = _font(max(FONT_PX, round(FONT_PX * (side / 256) ** 0.5)))
    weights = {int(i): float(w) for i, w in attended}
    shown = [i for i in range(min(max_boxes, len(boxes))) if i not in weights]
    occupied: list[tuple[float, float, float, float]] = []
    for i in shown:  # plain boxes first, so the attended ones stay on top
        colour = label_colour(labels[i]) if i < len(labels) else PALETTE[0]
        _outline(draw, boxes[i], colour, picture.size, dashed=False)
    for i in sorted(weights, key=weights.get):
        if 0 <= i < len(boxes):
            _outline(draw, boxes[i], ATTENDED_COLOUR, picture.size, dashed=True)
    for i in shown:
        if i < len(labels) and labels[i]:
            _tag(draw, boxes[i], str(labels[i]), label_colour(labels[i]), font, picture.size, occupied)
    for i in sorted(weights, key=weights.get, reverse=True):
        if 0 <= i < len(boxes):
            text = f"{labels[i]} · {weights[i]:.0%}" if i < len(labels) and labels[i] else f"{weights[i]:.0%}"
            _tag(draw, boxes[i], text, ATTENDED_COLOUR, font, picture.size, occupied)
    return picture


def _clip(box: np.ndarray, size: tuple[int, int]) -> tuple[float, float, float, float]:
    w, h = size
    x1, y1, x2, y2 = (float(v) for v in box)
    return max(0.0, min(x1, w - 1)), max(0.0, min(y1, h - 1)), max(0.0, min(x2, w - 1)), max(0.0, min(y2, h - 1))


def _outline(draw: ImageDraw.ImageDraw, box: np.ndarray, colour, size, *, dashed: bool) -> None:
    x1, y1, x2, y2 = _clip(box, size)
    if not dashed:
        draw.rectangle((x1, y1, x2, y2), outline=(0, 0, 0), width=3)  # a dark rim keeps thin boxes visible
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=2)
        return
    dash, gap = 6, 4
    for (ax, ay, bx, by) in ((x1, y1, x2, y1), (x2, y1, x2, y2), (x2, y2, x1, y2), (x1, y2, x1, y1)):
        length = max(abs(bx - ax), abs(by - ay))
        steps = max(1, int(length // (dash + gap)) + 1)
        for k in range(steps):
            t0, t1 = k * (dash + gap) / max(length, 1e-9), min(1.0, (k * (dash + gap) + dash) / max(length, 1e-9))
            if t0 >= 1.0:
                break
            seg = (ax + (bx - ax) * t0, ay + (by - ay) * t0, ax + (bx - ax) * t1, ay + (by - ay) * t1)
            draw.line(seg, fill=(0, 0, 0), width=4)
            draw.line(seg, fill=colour, width=2)


def _tag(draw: ImageDraw.ImageDraw, box: np.ndarray, text: str, colour, font, size, occupied: list) -> None:
    """A filled label tag at the box's top-left corner (inside the picture), moved down past earlier tags."""
    x1, y1, x2, y2 = _clip(box, size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    tw, th = right - left + 6, bottom - top + 4
    x = min(max(0.0, x1), max(0.0, size[0] - tw))
    y = y1 - th if y1 - th >= 0 else y1
    for _ in range(8):  # step past overlapping tags
        clash = next((o for o in occupied if x < o[2] and x + tw > o[0] and y < o[3] and y + th > o[1]), None)
        if clash is None:
            break
        y = clash[3] if clash[3] + th <= size[1] else max(0.0, clash[1] - th)
    occupied.append((x, y, x + tw, y + th))
    draw.rectangle((x, y, x + tw, y + th), fill=colour)
    luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    draw.text((x + 3 - left, y + 2 - top), text, fill=(0, 0, 0) if luminance > 140 else (255, 255, 255), font=font)


def image_data_uri(image: Image.Image, long_side: int = 256, quality: int = 85) -> str:
    """A JPEG "data:image/jpeg;base64,..." URI of the picture, scaled down to at most `long_side` pixels."""
    picture = image.convert("RGB")
    if max(picture.size) > long_side:
        scale = long_side / max(picture.size)
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                                 Image.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


__all__ = ["draw_detections", "image_data_uri", "label_colour", "CANVAS_COLOUR", "ATTENDED_COLOUR"]
