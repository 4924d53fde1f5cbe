"""Command line for feature files.

    python -m lxmert_pl.features convert IN.tsv [IN2.tsv ...] --out DIR [--fp16] [--overwrite]
    python -m lxmert_pl.features index PATH.tsv [...] [--rebuild]     build or refresh byte-offset indexes
    python -m lxmert_pl.features check PATH.tsv [...]                 decode every row, report problems
    python -m lxmert_pl.features repair PATH.tsv [...]                drop a truncated last line (keep a complete one)
    python -m lxmert_pl.features show F.tsv --images DIR (--ids ID ... | --first N) --out DIR
                                                                      draw each image's boxes with labels to PNG

Exit status: 0 on success, 1 when `check` found problems, 2 on an error (message on stderr).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from tqdm import tqdm

from lxmert_pl.features.sources import expand_feature_paths
from lxmert_pl.features.store import convert_tsvs_to_store
from lxmert_pl.features.check import check_tsv
from lxmert_pl.features.errors import FeatureFileError
from lxmert_pl.features.index import load_or_build_index
from lxmert_pl.features.lines import repair_tail
from lxmert_pl.errors import UserInputError


def _add_cache_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir", help="where to keep indexes of TSVs in read-only folders (default ~/.cache/lxmert_pl/index)"
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lxmert_pl.features", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser("convert", help="convert TSVs into one memory-mapped binary feature store")
    convert.add_argument("inputs", nargs="+", help="TSV files (or glob patterns)")
    convert.add_argument("--out", required=True, help="store directory to create")
    convert.add_argument("--fp16", action="store_true", help="store features as float16 (lossy, half the size)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    _add_cache_dir(convert)

    index = commands.add_parser("index", help="build or refresh the byte-offset index of TSVs")
    index.add_argument("inputs", nargs="+")
    index.add_argument("--rebuild", action="store_true", help="rebuild even when the saved index is up to date")
    _add_cache_dir(index)

    check = commands.add_parser("check", help="decode every row of TSVs and report problems")
    check.add_argument("inputs", nargs="+")
    check.add_argument("--max-errors", type=int, default=20, help="errors listed per file (all are counted)")

    repair = commands.add_parser("repair", help="remove a truncated last line left by an interrupted write")
    repair.add_argument("inputs", nargs="+")

    show = commands.add_parser("show", help="draw images' boxes with their labels and confidences to PNG")
    show.add_argument("inputs", nargs="+", help="TSV files or stores")
    show.add_argument("--images", help="folder of the raw images (without: a blank canvas of the recorded size)")
    choose = show.add_mutually_exclusive_group(required=True)
    choose.add_argument("--ids", nargs="+", default=[], help="img_ids to draw")
    choose.add_argument("--first", type=int, help="draw the first N rows")
    show.add_argument("--out", required=True, help="folder for <img_id>.png")
    show.add_argument("--boxes", type=int, default=10, help="most confident boxes drawn per image")
    show.add_argument("--long-side", type=int, default=512, help="picture size (long side, px); 0: the image's own")
    show.add_argument("--detector", help="detector alias or folder whose names label the boxes (default: the one "
                                         "the file's .meta.json records, else Visual Genome's)")
    return parser


def _convert(args: argparse.Namespace) -> int:
    with tqdm(desc="converting", unit="img", disable=None) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        store = convert_tsvs_to_store(
            expand_feature_paths(args.inputs), args.out, fp16=args.fp16, overwrite=args.overwrite,
            cache_dir=args.cache_dir, progress=progress,
        )  # fmt: skip
    print(f"wrote {store.describe()}")
    return 0


def _index(args: argparse.Namespace) -> int:
    for path in expand_feature_paths(args.inputs):
        started = time.perf_counter()
        index, location = load_or_build_index(path, args.cache_dir, rebuild=args.rebuild)
        seconds = time.perf_counter() - started
        print(f"{path}: {len(index.img_ids):,} rows, index {location or '(not saved)'} ({seconds:.2f} s)")
    return 0


def _check(args: argparse.Namespace) -> int:
    all_ok = True
    for path in expand_feature_paths(args.inputs):
        report = check_tsv(path, max_errors=args.max_errors)
        print(report.summary())
        all_ok &= report.ok
    return 0 if all_ok else 1


def _repair(args: argparse.Namespace) -> int:
    for path in expand_feature_paths(args.inputs):
        print(repair_tail(path).describe(path))
    return 0


def _show(args: argparse.Namespace) -> int:
    from lxmert_pl.features.show import show_features

    written = show_features(args.inputs, args.out, images=args.images, ids=args.ids, first=args.first,
                            max_boxes=args.boxes, long_side=args.long_side, detector=args.detector)
    print(f"{len(written)} picture(s) in {args.out}")
    return 0


_COMMANDS = {"convert": _convert, "index": _index, "check": _check, "repair": _repair, "show": _show}


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (FeatureFileError, UserInputError, FileNotFoundError, FileExistsError, IsADirectoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
