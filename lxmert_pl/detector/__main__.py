"""Detector tools: `python -m lxmert_pl.detector SUBCOMMAND ...`.

    convert FILE.caffemodel --out DIR [--detector-config CONFIG.yaml]
        Read an original bottom-up-attention caffemodel once and write DIR/config.yaml + DIR/model.safetensors (the
        HF port's format); `extract.py --detector DIR` then gives the same features as `--detector FILE.caffemodel`.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import LxmertPlError


def _convert(args: argparse.Namespace) -> int:
    from .caffemodel import convert_caffemodel

    report = convert_caffemodel(args.caffemodel, args.out, config=args.detector_config)
    print(report.summary())
    print(f"wrote {args.out}/config.yaml and {args.out}/model.safetensors")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lxmert_pl.detector", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="caffemodel -> config.yaml + model.safetensors (port format)")
    convert.add_argument("caffemodel", help="an original bottom-up-attention .caffemodel")
    convert.add_argument("--out", required=True, help="output directory (created)")
    convert.add_argument(
        "--detector-config", default=None,
        help="port-format config.yaml of the architecture (default: the built-in preset of the real models)",
    )
    convert.set_defaults(run=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (LxmertPlError, FileNotFoundError) as error:  # a user error: one line, no traceback
        print(f"python -m lxmert_pl.detector {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
