"""Detector commands.

    python -m lxmert_pl.detector probe --detector ALIAS_OR_DIR --images DIR [--max-images N]

`probe`: which proposal geometry (port or caffe) the detector's weights expect, judged by their own RoI box
regressor on the images (see `lxmert_pl/detector/probe.py`); prints per-geometry statistics and a verdict.
"""

from __future__ import annotations

import argparse
import sys

from lxmert_pl.detector.probe import GeometryProbe, probe_detector
from lxmert_pl.registry import resolve_checkpoint
from lxmert_pl.runs.errors import user_errors

PROGRAM = "python -m lxmert_pl.detector"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    probe = commands.add_parser("probe", help="which proposal geometry the detector's weights expect")
    probe.add_argument("--detector", required=True,
                       help="registry alias (frcnn-vg-finetuned, demo-frcnn) or detector directory / weights file")
    probe.add_argument("--detector-config", default=None, help="config.yaml, if not next to the weights")
    probe.add_argument("--images", required=True, help="image folder or list file")
    probe.add_argument("--max-images", type=int, default=50, help="use at most this many images (50)")
    probe.add_argument("--min-confidence", type=float, default=0.2,
                       help="object probability a detection needs to count (0.2)")
    probe.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    if args.max_images < 1:
        parser.error(f"--max-images must be >= 1, got {args.max_images}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with user_errors(PROGRAM):
        detector = resolve_checkpoint(args.detector)
        print(f"Detector: {detector.describe()}")
        if detector.geometry is not None:
            print(f"registry default geometry for {detector.alias}: {detector.geometry}")
        report = probe_detector(
            detector.path,
            args.images,
            max_images=args.max_images,
            config=args.detector_config,
            device=args.device,
            probe=GeometryProbe(min_confidence=args.min_confidence),
        )
        print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
