"""Score sentences against one image, from the raw image: detector -> LXMERT.

    python -m lxmert_pl.match IMAGE "a dog on a couch" "a plane" --ckpt lxr955 --detector frcnn-vg-finetuned
    python -m lxmert_pl.match data/sample/images/val/sample_val_000000.png "a green triangle" "a red circle"

Prints the sentences sorted by score in a table. Without --ckpt/--detector it runs the bundled demo, like
`python eval.py`: a bundled sample image (data/sample/images/) takes its boxes from data/sample/boxes.json, as the
demo config does (the demo detector is not trained to detect); other images take --given-boxes FILE, or the
detector's boxes. Exit status: 0 on success, 2 on an error (one line on stderr).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lxmert_pl.fileio import atomic_writer
from lxmert_pl.matcher import DEFAULT_ATTENDED, DEFAULT_DRAW_BOXES
from lxmert_pl.runs.errors import user_errors

PROGRAM = "python -m lxmert_pl.match"
REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE_IMAGES = REPO_ROOT / "data" / "sample" / "images"
SAMPLE_BOXES = REPO_ROOT / "data" / "sample" / "boxes.json"
SHOW_LONG_SIDE = 512  # pixels: the --show picture's long side (small images drawn larger, labels legible)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", help="an image file")
    parser.add_argument("sentences", nargs="+", help="one or more sentences to score against the image")
    parser.add_argument("--ckpt", default="demo-lxrt", help="LXMERT weights: registry alias or path (default: the "
                        "bundled demo, demo-lxrt; real images: lxr955)")
    parser.add_argument("--detector", default="demo-frcnn", help="detector: registry alias or directory (default: "
                        "the bundled demo, demo-frcnn; real images: frcnn-vg-finetuned)")
    parser.add_argument("--mode", default="itm", choices=("itm", "cosine"),
                        help="itm: P(matched) from the matching head; cosine: max over boxes of cos(vision, pooled)")
    parser.add_argument("--boxes", type=int, default=36, help="detected boxes per image (default 36)")
    parser.add_argument("--given-boxes", default=None,
                        help="JSON {img_id: [[x1, y1, x2, y2], ...]} (pixels): extract features at these boxes")
    parser.add_argument("--cache-dir", default=None, help="keep detections in this folder and reuse them")
    parser.add_argument("--device", default="auto", help="auto (cuda when available) | cpu | cuda")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="LXMERT's precision")
    parser.add_argument("--show", default=None, metavar="OUT.png",
                        help="write the image with its detections and the top sentence's attended boxes")
    args = parser.parse_args(argv)
    if args.boxes < 1:
        parser.error(f"--boxes must be >= 1, got {args.boxes}")
    return args


def default_given_boxes(image: Path) -> Path | None:
    """data/sample/boxes.json for a bundled sample image (the demo detector is not trained to detect), else None."""
    try:
        image.resolve().relative_to(SAMPLE_IMAGES.resolve())
    except ValueError:
        return None
    return SAMPLE_BOXES if SAMPLE_BOXES.exists() else None


def score_table(sentences: list[str], scores, mode: str) -> str:
    """The sentences sorted by score (best first), one per line."""
    header = "P(match)" if mode == "itm" else "cosine"
    order = sorted(range(len(sentences)), key=lambda i: -float(scores[i]))
    lines = [f"{'rank':>4}  {header:>8}  sentence"]
    lines += [f"{rank:>4}  {float(scores[i]):8.4f}  {sentences[i]}" for rank, i in enumerate(order, 1)]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    from lxmert_pl.matcher import Matcher

    image = Path(args.image)
    if not image.is_file():
        raise FileNotFoundError(2, "image file not found", str(image))
    given = Path(args.given_boxes) if args.given_boxes else default_given_boxes(image)
    matcher = Matcher.from_pretrained(args.ckpt, args.detector, mode=args.mode, boxes=args.boxes,
                                      device=args.device, precision=args.precision, cache_dir=args.cache_dir,
                                      progress=False)
    print(matcher.report)
    boxes = None if given is None else _boxes_for(given, image)
    detections = matcher.detect(image, given_boxes=boxes)
    cache = matcher.cache
    origin = ("from the disk cache" if cache.disk_hits else "from the memory cache" if cache.memory_hits
              else "detected")
    where = f"at the given boxes of {given}" if given else matcher.selection.describe()
    print(f"Image: {image} ({detections.size[0]}x{detections.size[1]}), {len(detections)} boxes {where}, {origin}")
    scores = matcher.score(detections.features, args.sentences)
    print(score_table(args.sentences, scores, args.mode))
    if args.show:
        top = args.sentences[max(range(len(scores)), key=lambda i: float(scores[i]))]
        why = matcher.explain(detections.features, top)
        why.detections = detections  # the picture and labels, for drawing
        picture = why.draw(long_side=SHOW_LONG_SIDE)
        with atomic_writer(args.show, "wb") as handle:
            picture.save(handle, format="PNG")
        print(f"Top sentence {top!r} attends to: {why.describe()}")
        print(f"Picture: {args.show} (the {min(len(detections), DEFAULT_DRAW_BOXES)} most confident boxes; the "
              f"{min(len(detections), DEFAULT_ATTENDED)} boxes the top sentence attends to most dashed, with weights)")


def _boxes_for(boxes_file: Path, image: Path):
    from lxmert_pl.detector.extraction import load_given_boxes
    from lxmert_pl.errors import UserInputError

    boxes = load_given_boxes(boxes_file)
    if image.stem not in boxes:
        raise UserInputError(f"{boxes_file} has no boxes for img_id {image.stem!r} (the image's file name without "
                             "extension)")
    return boxes[image.stem]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with user_errors(PROGRAM):
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
