"""Detector commands.

    python -m lxmert_pl.detector probe --detector ALIAS_OR_DIR --images DIR [--max-images N]
    python -m lxmert_pl.detector convert FILE.caffemodel --out DIR [--detector-config CONFIG.yaml]

`probe`: which proposal geometry (port or caffe) the detector's weights expect, judged by their own RoI box
regressor on the images (see `lxmert_pl/detector/probe.py`); prints per-geometry statistics and a verdict.

`convert`: read an original bottom-up-attention caffemodel once and write DIR/config.yaml + DIR/model.safetensors
(the HF port's format, see `lxmert_pl/detector/caffemodel.py`; the config records the caffe geometry);
`extract.py --detector DIR` then gives the same features as `--detector FILE.caffemodel`.
"""

from __future__ import annotations

import argparse
import sys

from lxmert_pl.errors import CheckpointError
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
    convert = commands.add_parser("convert", help="caffemodel -> config.yaml + model.safetensors (port format)")
    convert.add_argument("caffemodel", help="an original bottom-up-attention .caffemodel")
    convert.add_argument("--out", required=True, help="output directory (created)")
    convert.add_argument("--detector-config", default=None,
                         help="port-format config.yaml of the architecture (default: the real models' preset)")
    args = parser.parse_args(argv)
    if args.command == "probe" and args.max_images < 1:
        parser.error(f"--max-images must be >= 1, got {args.max_images}")
    return args


def _probe(args: argparse.Namespace) -> None:
    from lxmert_pl.detector.probe import GeometryProbe, probe_detector

    detector = resolve_checkpoint(args.detector)
    print(f"Detector: {detector.describe()}")
    if detector.format == "frcnn-caffe":  # runs only with the caffe geometry; its port-format copy runs with both
        raise CheckpointError(
            f"{detector.path} is a caffemodel, which runs only with the caffe geometry; to probe its weights under "
            f"both geometries convert it first ({PROGRAM} convert {detector.path} --out DIR) and probe DIR"
        )
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


def _convert(args: argparse.Namespace) -> None:
    from lxmert_pl.detector.caffemodel import CONVERTED_WEIGHTS_NAME, convert_caffemodel
    from lxmert_pl.detector.loading import CONFIG_NAME

    report = convert_caffemodel(args.caffemodel, args.out, config=args.detector_config)
    print(report.summary())
    print(f"wrote {args.out}/{CONFIG_NAME} and {args.out}/{CONVERTED_WEIGHTS_NAME} (the config records the caffe "
          "geometry: --detector DIR runs with it)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with user_errors(PROGRAM):
        {"probe": _probe, "convert": _convert}[args.command](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
