#!/usr/bin/env python
"""Generate the bundled demo's synthetic scenes: 1-3 coloured shapes per image, their boxes, captions and pairs.

Usage: python scripts/make_sample_data.py --out data/sample --seed 0 --train 1600 --val 100 --test 100

Writes into OUT:
  images/<split>/<img_id>.png  RGB PNG, 128-200 px wide and 128-160 px high, on a plain or blotchy dark background
  boxes.json                   {img_id: [[x1, y1, x2, y2], ...]} for every split: tight pixel boxes of the shapes,
                               x2/y2 exclusive (0 <= x1 < x2 <= width), in the order of scenes.json's objects
  scenes.json                  {img_id: {"split", "width", "height", "objects": [{"color", "shape", "size", "box"}]}}
  captions_<split>.json        LXMERT caption files: [{"img_id", "sentf": {"mscoco": [caption, ...]}}]
  <split>_pairs.json           matching pairs: [{"question_id", "img_id", "sent", "ground", "label"}], one positive
                               (a caption of the image) and one negative per image. A negative is a caption of
                               another image that names a colour+shape combination absent from this image (so it is
                               false whatever the sizes), or, when no other image offers one, a made-up caption of
                               such a combination.

Every caption names objects as "[a|an] [small|large] <colour> <shape>"; the first caption of an image names all its
objects, the others a subset. Shapes do not overlap and each image holds distinct colour+shape combinations. The output
depends only on the seed and each split's count (each split has its own random stream).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "white": (245, 245, 245),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
SIZES: dict[str, tuple[int, int]] = {"small": (16, 26), "large": (36, 52)}  # side of the shape's square, pixels
# Dark, greyish backgrounds: no background pixel can equal a shape colour, even with noise added.
BACKGROUNDS = ((24, 24, 28), (48, 52, 60), (70, 70, 70), (40, 56, 48), (60, 44, 52), (96, 96, 104))
BACKGROUND_NOISE = 8  # blotch amplitude (grey levels) of the noisy backgrounds
BLOTCH_PX = 8  # side of one noise blotch; coarse noise keeps the PNGs small
WIDTHS, HEIGHTS = (128, 200), (128, 160)
GAP = 4  # minimum distance between shapes, and between a shape and the border
MAX_OBJECTS = 3
CAPTIONS_PER_IMAGE = 3
SIZE_WORD_PROBABILITY = 0.3
TEMPLATES = ("{}", "there is {}", "a picture of {}", "an image with {}", "this image shows {}")
SPLITS = ("train", "val", "test")
QUESTION_ID_BASE = {"train": 1_000_000, "val": 2_000_000, "test": 3_000_000}
DEFAULT_COUNTS = {"train": 1600, "val": 100, "test": 100}

Mention = tuple[str | None, str, str]  # (size word or None, colour, shape)


@dataclass(frozen=True)
class SceneObject:
    """One shape of a scene; `box` is (x1, y1, x2, y2) in pixels, x2/y2 exclusive."""

    color: str
    shape: str
    size: str
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class Caption:
    """A caption and the objects it names."""

    text: str
    mentions: tuple[Mention, ...]


@dataclass
class Scene:
    """One generated image with its objects and captions."""

    img_id: str
    image: Image.Image
    objects: list[SceneObject]
    captions: list[Caption]


# ----------------------------------------------------------------------------------------------- drawing


def shape_outline(shape: str, x: int, y: int, side: int) -> list[tuple[float, float]] | None:
    """Polygon of `shape` inscribed in the square at (x, y) with `side` pixels; None for circle and square."""
    last = side - 1
    cx, cy = x + last / 2, y + last / 2
    if shape == "triangle":
        return [(cx, y), (x + last, y + last), (x, y + last)]
    if shape == "diamond":
        return [(cx, y), (x + last, cy), (cx, y + last), (x, cy)]
    if shape == "star":
        radii = (last / 2, last / 5)
        return [(cx + radii[k % 2] * math.sin(k * math.pi / 5), cy - radii[k % 2] * math.cos(k * math.pi / 5))
                for k in range(10)]
    return None


def draw_shape(image: Image.Image, color: str, shape: str, x: int, y: int, side: int) -> tuple[int, int, int, int]:
    """Draw a filled shape and return its exact pixel box (x2/y2 exclusive)."""
    mask = Image.new("L", image.size, 0)
    draw = ImageDraw.Draw(mask)
    square = (x, y, x + side - 1, y + side - 1)
    outline = shape_outline(shape, x, y, side)
    if outline is not None:
        draw.polygon(outline, fill=255)
    elif shape == "circle":
        draw.ellipse(square, fill=255)
    else:
        draw.rectangle(square, fill=255)
    image.paste(COLORS[color], mask=mask)
    return mask.getbbox()


def make_background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A plain or coarsely blotchy dark background."""
    base = np.array(BACKGROUNDS[rng.integers(len(BACKGROUNDS))], dtype=np.int16)
    pixels = np.broadcast_to(base, (height, width, 3)).copy()
    if rng.random() < 0.5:
        cells = rng.integers(-BACKGROUND_NOISE, BACKGROUND_NOISE + 1,
                             size=(height // BLOTCH_PX + 1, width // BLOTCH_PX + 1), dtype=np.int16)
        blotches = np.repeat(np.repeat(cells, BLOTCH_PX, axis=0), BLOTCH_PX, axis=1)[:height, :width]
        pixels += blotches[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def place(rng: np.random.Generator, width: int, height: int, side: int,
          taken: list[tuple[int, int, int]]) -> tuple[int, int] | None:
    """A top-left corner for a `side`-pixel square keeping GAP from the border and the `taken` squares."""
    for _ in range(50):
        x = int(rng.integers(GAP, width - GAP - side + 1))
        y = int(rng.integers(GAP, height - GAP - side + 1))
        if all(x + side + GAP <= ox or ox + oside + GAP <= x or y + side + GAP <= oy or oy + oside + GAP <= y
               for ox, oy, oside in taken):
            return x, y
    return None


def make_scene_image(rng: np.random.Generator) -> tuple[Image.Image, list[SceneObject]]:
    """Draw 1-3 shapes of distinct colour+shape combinations on a background."""
    width, height = int(rng.integers(WIDTHS[0], WIDTHS[1] + 1)), int(rng.integers(HEIGHTS[0], HEIGHTS[1] + 1))
    image = make_background(rng, width, height)
    combos = [(color, shape) for color in COLORS for shape in SHAPES]
    chosen = rng.choice(len(combos), size=int(rng.integers(1, MAX_OBJECTS + 1)), replace=False)
    objects: list[SceneObject] = []
    taken: list[tuple[int, int, int]] = []
    for index in chosen:
        color, shape = combos[index]
        size = ("small", "large")[rng.integers(2)]
        side = int(rng.integers(SIZES[size][0], SIZES[size][1] + 1))
        corner = place(rng, width, height, side, taken)
        if corner is None:  # no room left: the scene keeps fewer shapes
            continue
        taken.append((*corner, side))
        objects.append(SceneObject(color, shape, size, draw_shape(image, color, shape, *corner, side)))
    return image, objects


# ----------------------------------------------------------------------------------------------- captions


def with_article(phrase: str) -> str:
    """Prefix "a" or "an"."""
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def render_caption(rng: np.random.Generator, mentions: tuple[Mention, ...]) -> Caption:
    """Put mentions into a random template: "a red circle", "there is a red circle and a small blue star", ..."""
    phrases = [with_article(" ".join(word for word in mention if word)) for mention in mentions]
    listed = phrases[0] if len(phrases) == 1 else f"{', '.join(phrases[:-1])} and {phrases[-1]}"
    return Caption(TEMPLATES[rng.integers(len(TEMPLATES))].format(listed), mentions)


def describe(rng: np.random.Generator, objects: list[SceneObject]) -> Caption:
    """A true caption naming the given objects, in random order, each with its size word at random."""
    order = rng.permutation(len(objects))
    return render_caption(rng, tuple(
        (objects[i].size if rng.random() < SIZE_WORD_PROBABILITY else None, objects[i].color, objects[i].shape)
        for i in order))


def make_captions(rng: np.random.Generator, objects: list[SceneObject]) -> list[Caption]:
    """Distinct true captions: the first names every object, the others a random non-empty subset."""
    captions = [describe(rng, objects)]
    for _ in range(10 * CAPTIONS_PER_IMAGE):
        if len(captions) == CAPTIONS_PER_IMAGE:
            break
        subset = rng.choice(len(objects), size=int(rng.integers(1, len(objects) + 1)), replace=False)
        caption = describe(rng, [objects[i] for i in sorted(subset)])
        if caption.text not in {c.text for c in captions}:
            captions.append(caption)
    return captions


def is_false_for(caption: Caption, objects: list[SceneObject]) -> bool:
    """True when the caption names a colour+shape combination that the scene does not contain."""
    present = {(obj.color, obj.shape) for obj in objects}
    return any((color, shape) not in present for _, color, shape in caption.mentions)


def pick_negative(rng: np.random.Generator, scenes: list[Scene], index: int) -> Caption:
    """A caption of another scene that is false for scene `index`; a made-up false one if there is none."""
    target = scenes[index].objects
    for other in rng.permutation(len(scenes)):
        if other != index:
            for choice in rng.permutation(len(scenes[other].captions)):
                caption = scenes[other].captions[choice]
                if is_false_for(caption, target):
                    return caption
    present = {(obj.color, obj.shape) for obj in target}
    absent = [(color, shape) for color in COLORS for shape in SHAPES if (color, shape) not in present]
    color, shape = absent[rng.integers(len(absent))]
    return render_caption(rng, ((None, color, shape),))


# ----------------------------------------------------------------------------------------------- splits and files


def make_split(split: str, count: int, seed: int) -> list[Scene]:
    """Generate one split's scenes from its own random stream."""
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    scenes = []
    for number in range(count):
        image, objects = make_scene_image(rng)
        scenes.append(Scene(f"sample_{split}_{number:06d}", image, objects, make_captions(rng, objects)))
    return scenes


def make_pairs(split: str, scenes: list[Scene], seed: int) -> list[dict[str, Any]]:
    """One positive and one negative pair per scene, in the research fork's pair-file format."""
    rng = np.random.default_rng([seed, SPLITS.index(split), 1])
    pairs = []
    for index, scene in enumerate(scenes):
        positive = scene.captions[rng.integers(len(scene.captions))]
        negative = pick_negative(rng, scenes, index)
        for offset, (caption, matched) in enumerate(((positive, True), (negative, False))):
            pairs.append({"question_id": QUESTION_ID_BASE[split] + 2 * index + offset, "img_id": scene.img_id,
                          "sent": caption.text, "ground": str(matched),
                          "label": {"yes": 1} if matched else {"no": 1}})
    return pairs


def write_json_lines(path: Path, data: list[Any] | dict[str, Any]) -> None:
    """JSON with one list element or one mapping item per line (readable, and small)."""
    if isinstance(data, dict):
        items = [f"{json.dumps(key)}: {json.dumps(value)}" for key, value in data.items()]
        text = "{\n" + ",\n".join(items) + "\n}\n"
    else:
        text = "[\n" + ",\n".join(json.dumps(item) for item in data) + "\n]\n"
    path.write_text(text, encoding="utf-8")


def write_images(out: Path, split: str, scenes: list[Scene]) -> None:
    """Save the split's PNGs, removing images of an earlier run that this one does not rewrite."""
    folder = out / "images" / split
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("sample_*.png"):
        stale.unlink()
    for scene in scenes:
        scene.image.save(folder / f"{scene.img_id}.png", optimize=True)


def scene_record(split: str, scene: Scene) -> dict[str, Any]:
    """The scenes.json record of one scene."""
    return {"split": split, "width": scene.image.width, "height": scene.image.height,
            "objects": [{"color": o.color, "shape": o.shape, "size": o.size, "box": list(o.box)}
                        for o in scene.objects]}


def generate(out: Path, seed: int, counts: dict[str, int]) -> dict[str, int]:
    """Generate every split into `out`; returns the number of images per split."""
    out.mkdir(parents=True, exist_ok=True)
    boxes: dict[str, list[list[int]]] = {}
    records: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        scenes = make_split(split, counts[split], seed)
        write_images(out, split, scenes)
        write_json_lines(out / f"captions_{split}.json", [
            {"img_id": s.img_id, "sentf": {"mscoco": [c.text for c in s.captions]}} for s in scenes])
        write_json_lines(out / f"{split}_pairs.json", make_pairs(split, scenes, seed))
        boxes.update({s.img_id: [list(o.box) for o in s.objects] for s in scenes})
        records.update({s.img_id: scene_record(split, s) for s in scenes})
    write_json_lines(out / "boxes.json", boxes)
    write_json_lines(out / "scenes.json", records)
    return {split: counts[split] for split in SPLITS}


def total_bytes(paths: Iterable[Path]) -> int:
    """Sum of the sizes of the files among `paths`."""
    return sum(path.stat().st_size for path in paths if path.is_file())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/sample"), help="output folder (default: data/sample)")
    parser.add_argument("--seed", type=int, default=0)
    for split in SPLITS:
        parser.add_argument(f"--{split}", type=int, default=DEFAULT_COUNTS[split], metavar="N",
                            help=f"number of {split} images (default: {DEFAULT_COUNTS[split]})")
    args = parser.parse_args(argv)
    if any(getattr(args, split) < 0 for split in SPLITS):
        parser.error("image counts must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = generate(args.out, args.seed, {split: getattr(args, split) for split in SPLITS})
    size = total_bytes(args.out.rglob("*"))
    print(f"wrote {', '.join(f'{n} {split}' for split, n in counts.items())} images to {args.out} "
          f"({size / 1e6:.2f} MB in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
