#!/usr/bin/env python
"""Write the bundled Winoground-format demo from the sample scenes (data/sample/scenes.json).

    python scripts/make_benchmark_demo.py [--sample data/sample]

An example takes a held-out scene (val or test) with two objects of different colours and shapes, image_0 =
{c0 s0, c1 s1}, and a scene of any split holding the swapped objects, image_1 = {c1 s0, c0 s1}. caption_0 =
"there is a c0 s0 and a c1 s1" ("an" before a vowel); caption_1 holds the same words in another order: the colours
swapped in place ("a c1 s0 and a c0 s1", tag "Adjective-Color") or the shapes ("a c0 s1 and a c1 s0", tag "Noun"),
alternately.
collapsed_tag "Object", num_main_preds 1, no secondary tag. Writes `winoground_demo.jsonl` and
`winoground_demo_images.txt` (the images it names, relative to the sample folder: the `--images` list file).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from lxmert_pl.fileio import write_atomically  # noqa: E402

HELD_OUT = ("val", "test")


def phrase(colour: str, shape: str) -> str:
    return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"


def objects_key(objects: list[tuple[str, str]]) -> frozenset:
    return frozenset(objects)


def demo_examples(scenes: dict) -> list[dict]:
    """The examples, in the order of the held-out scenes' ids; each image_0 once, image_1 the first match by id."""
    by_objects: dict[frozenset, list[str]] = {}
    two = {img_id: [(o["color"], o["shape"]) for o in scene["objects"]]
           for img_id, scene in sorted(scenes.items()) if len(scene["objects"]) == 2}
    for img_id, objects in two.items():
        by_objects.setdefault(objects_key(objects), []).append(img_id)
    examples = []
    for img_id, ((c0, s0), (c1, s1)) in two.items():
        if scenes[img_id]["split"] not in HELD_OUT or c0 == c1 or s0 == s1:
            continue
        matches = by_objects.get(objects_key([(c1, s0), (c0, s1)]), [])
        if not matches:
            continue
        colour_swap = len(examples) % 2 == 0
        examples.append({
            "id": len(examples),
            "caption_0": f"there is {phrase(c0, s0)} and {phrase(c1, s1)}",
            "caption_1": f"there is {phrase(c1, s0)} and {phrase(c0, s1)}" if colour_swap else
                         f"there is {phrase(c0, s1)} and {phrase(c1, s0)}",
            "image_0": img_id,
            "image_1": matches[0],
            "tag": "Adjective-Color" if colour_swap else "Noun",
            "secondary_tag": "",
            "num_main_preds": 1,
            "collapsed_tag": "Object",
        })
    return examples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--sample", default=str(REPO_ROOT / "data" / "sample"), help="the sample folder")
    args = parser.parse_args(argv)
    sample = Path(args.sample)
    scenes = json.loads((sample / "scenes.json").read_text())
    examples = demo_examples(scenes)
    write_atomically(sample / "winoground_demo.jsonl", "".join(json.dumps(ex) + "\n" for ex in examples))
    images = dict.fromkeys(img for ex in examples for img in (ex["image_0"], ex["image_1"]))
    listing = "".join(f"images/{scenes[img]['split']}/{img}.png\n" for img in images)
    header = "# the images data/sample/winoground_demo.jsonl names (scripts/make_benchmark_demo.py)\n"
    write_atomically(sample / "winoground_demo_images.txt", header + listing)
    print(f"{len(examples)} examples, {len(images)} images -> {sample / 'winoground_demo.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
