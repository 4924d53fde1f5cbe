"""Extract bottom-up-attention features of images into an obj36-format TSV (resumable, shardable).

    python extract.py --images DIR_OR_LISTFILE --out FILE.tsv --detector frcnn-vg-finetuned
                      [--boxes 36 | --min-boxes 10 --max-boxes 100] [--given-boxes BOXES.json]
                      [--batch-size N] [--devices N] [--device cpu|cuda] [--geometry port|caffe]
                      [--precision fp32|bf16]

DIR: the image files directly in it; LISTFILE: one image path per line (relative to the list file). The row id is the
file name without its extension. The detector is an alias of checkpoints/registry.yaml (`frcnn-vg-finetuned`,
downloaded on first use; `demo-frcnn`, bundled) or a directory in the HF port's format (`config.yaml` +
`pytorch_model.bin` or `*.safetensors`). Rerunning the same command after an interruption extracts
only what is missing. Unreadable images are skipped and listed in `<out>.skipped.txt`. With `--given-boxes`
(`{img_id: [[x1, y1, x2, y2], ...]}`, original pixels) the features of those boxes are extracted instead of detected
ones, and images without an entry are skipped. `--geometry` picks the proposal layer: `caffe` (the original
bottom-up-attention one, the registry's default for frcnn-vg-finetuned) or `port` (the HF port's; the default for
demo-frcnn and for detector directories); the run prints the one it used. `--precision bf16` runs
the detector's RoI head (res5, ~92% of its compute) in bfloat16: faster on CPUs with AVX-512 bf16 / AMX and on GPU
tensor cores; proposals and outputs stay float32 (bench/README.md gives its speed and agreement with fp32).
"""

from __future__ import annotations

import argparse
import sys

from lxmert_pl.detector.extraction import list_images, load_given_boxes, run_extraction
from lxmert_pl.detector.geometry import GEOMETRIES, choose_geometry
from lxmert_pl.detector.selection import BoxSelection
from lxmert_pl.runs.errors import user_errors
from lxmert_pl.registry import resolve_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, help="image folder or list file")
    parser.add_argument("--out", required=True, help="output TSV (appended to when it exists)")
    parser.add_argument("--detector", required=True,
                        help="registry alias (frcnn-vg-finetuned, demo-frcnn) or detector directory / weights file")
    parser.add_argument("--detector-config", default=None, help="config.yaml, if not next to the weights")
    parser.add_argument("--boxes", type=int, default=None, help="fixed number of boxes per image (default 36)")
    parser.add_argument("--min-boxes", type=int, default=None, help="adaptive: at least this many boxes (10)")
    parser.add_argument("--max-boxes", type=int, default=None, help="adaptive: at most this many boxes (100)")
    parser.add_argument("--given-boxes", default=None, help="JSON {img_id: [[x1, y1, x2, y2], ...]}: pool these boxes")
    parser.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    parser.add_argument("--devices", type=int, default=1, help="worker processes (one GPU each with --device cuda)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--geometry", default=None, choices=GEOMETRIES,
                        help="proposal geometry (default: the registry's for an alias, else port)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="detector RoI head precision (bf16: faster, features within cosine 0.9999 of fp32)")
    args = parser.parse_args(argv)
    adaptive = args.min_boxes is not None or args.max_boxes is not None
    if adaptive and args.boxes is not None:
        parser.error("use either --boxes N or --min-boxes/--max-boxes")
    if adaptive:
        args.selection = BoxSelection(
            10 if args.min_boxes is None else args.min_boxes, 100 if args.max_boxes is None else args.max_boxes
        )
    else:
        args.selection = BoxSelection(
            36 if args.boxes is None else args.boxes, 36 if args.boxes is None else args.boxes
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with user_errors("extract.py"):
        detector = resolve_checkpoint(args.detector)
        print(f"Detector: {detector.describe()}")
        geometry = choose_geometry(args.geometry, detector.geometry)
        result = run_extraction(
            list_images(args.images),
            args.out,
            detector.path,
            args.selection,
            given_boxes=None if args.given_boxes is None else load_given_boxes(args.given_boxes),
            batch_size=args.batch_size,
            devices=args.devices,
            device=args.device,
            detector_config=args.detector_config,
            geometry=geometry,
            precision=args.precision,
        )
    return 0 if result.written + result.already_done > 0 or not result.skipped else 1


if __name__ == "__main__":
    sys.exit(main())
