"""Command line for pair sets.

    python -m lxmert_pl.pairs build --captions CAPTIONS [...] --features TSV [...] --out pairs.json
        [--negatives random|similar|cluster] [--per-positive K] [--seed S] [--pool P] [--clusters C]
        [--kmeans-iters N] [--caption-source mscoco] [--skip-missing] [--cache-dir DIR]

`build` makes every caption a positive pair and adds K negatives per positive: the same caption with another
image (see `lxmert_pl.pairs.builder`). Caption files are any format `load_pairs` reads (JSONL, CSV, LXMERT caption
files); rows labelled 0 (not matched) are not captions and are ignored. The output is the seed's pair JSON, each
positive followed by its negatives; same inputs and seed, byte-identical output.

Exit status: 0 on success, 2 on an error (message on stderr).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Callable, Sequence

from lxmert_pl.features.sources import FeatureSource, open_feature_source
from lxmert_pl.features.errors import MissingImageError
from lxmert_pl.pairs.builder import (
    DEFAULT_KMEANS_ITERS,
    DEFAULT_POOL_FACTOR,
    METHODS,
    BuildStats,
    build_pairs,
    image_vectors,
    write_pairs,
)
from lxmert_pl.pairs.io import load_pairs

_SHOWN_MISSING = 5  # img_ids named in the "not in the features" error


@dataclass
class _Captions:
    """Positive (img_id, caption) pairs read from caption files, and what was left out."""

    positives: list[tuple[str, str]] = field(default_factory=list)
    ignored: int = 0  # rows labelled 0 (not matched)
    skipped: int = 0  # captions of images without features (--skip-missing)
    skipped_images: int = 0


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer not below `minimum`."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lxmert_pl.pairs", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build a pair set: captions as positives, K negatives each")
    build.add_argument("--captions", nargs="+", required=True, help="caption files (JSONL, CSV, LXMERT caption JSON)")
    build.add_argument("--features", nargs="+", required=True, help="feature TSVs, stores or glob patterns")
    build.add_argument("--out", required=True, help="pair JSON to write")
    build.add_argument("--negatives", choices=METHODS, default="random", help="how negative images are chosen")
    build.add_argument("--per-positive", type=_int_at_least(1), default=1, help="K: negatives per positive")
    build.add_argument("--seed", type=_int_at_least(0), default=0, help="random seed (output depends only on it)")
    build.add_argument(
        "--pool", type=_int_at_least(1),
        help=f"similar: choose among the P nearest images (default {DEFAULT_POOL_FACTOR} * K)",
    )  # fmt: skip
    build.add_argument("--clusters", type=_int_at_least(1), help="cluster: k-means k (default sqrt(number of images))")
    build.add_argument(
        "--kmeans-iters", type=_int_at_least(1), default=DEFAULT_KMEANS_ITERS, help="cluster: at most N iterations"
    )
    build.add_argument("--caption-source", default="mscoco", help="sentence source of LXMERT caption files")
    build.add_argument("--skip-missing", action="store_true", help="drop captions of images absent from the features")
    build.add_argument("--cache-dir", help="where to keep indexes of TSVs in read-only folders")
    return parser


def _read_captions(paths: Sequence[str], caption_source: str) -> _Captions:
    """Pairs labelled 1 or unlabelled are captions (positives); pairs labelled 0 are counted as ignored."""
    captions = _Captions()
    for path in paths:
        for pair in load_pairs(path, caption_source=caption_source):
            if pair.label == 0:
                captions.ignored += 1
            else:
                captions.positives.append((pair.img_id, pair.sent))
    if not captions.positives:
        raise ValueError(f"no captions (pairs labelled 1 or unlabelled) in {', '.join(paths)}")
    return captions


def _drop_missing(captions: _Captions, source: FeatureSource, skip_missing: bool) -> None:
    """Remove captions of images the features lack, or fail naming how many and the first few."""
    img_ids = dict.fromkeys(img_id for img_id, _ in captions.positives)
    missing = [img_id for img_id in img_ids if img_id not in source]
    if not missing:
        return
    if not skip_missing:
        raise ValueError(
            f"{len(missing):,} of {len(img_ids):,} caption images are not in the features ({source.describe()}), "
            f"e.g. {', '.join(missing[:_SHOWN_MISSING])}; pass --skip-missing to drop their captions"
        )
    absent = set(missing)
    kept = [(img_id, sent) for img_id, sent in captions.positives if img_id not in absent]
    if not kept:
        raise ValueError(f"none of the {len(img_ids):,} caption images is in the features ({source.describe()})")
    captions.skipped = len(captions.positives) - len(kept)
    captions.skipped_images = len(missing)
    captions.positives = kept


def _summary(args: argparse.Namespace, stats: BuildStats, captions: _Captions) -> str:
    lines = [
        f"wrote {args.out}: {stats.positives + stats.negatives:,} pairs = {stats.positives:,} positives + "
        f"{stats.negatives:,} negatives ({args.negatives}, {args.per_positive} per positive, seed {args.seed})",
        f"images: {stats.images:,}",
        f"captions left out: {stats.duplicates:,} duplicates, {captions.ignored:,} labelled 0, "
        f"{captions.skipped:,} whose image has no features ({captions.skipped_images:,} images)",
    ]
    if args.negatives == "cluster":
        lines.append(f"clusters: {stats.clusters:,}; fallbacks (negatives from another cluster): {stats.fallbacks:,}")
    if stats.shortfall:
        lines.append(f"shortfall: {stats.shortfall:,} negatives not made (too few images not matching the caption)")
    return "\n".join(lines)


def _build(args: argparse.Namespace) -> int:
    if args.pool is not None and args.pool < args.per_positive:
        raise ValueError(f"--pool ({args.pool}) must be at least --per-positive ({args.per_positive})")
    captions = _read_captions(args.captions, args.caption_source)
    source = open_feature_source(args.features, cache_dir=args.cache_dir)
    _drop_missing(captions, source, args.skip_missing)
    img_ids = dict.fromkeys(img_id for img_id, _ in captions.positives)
    vectors = image_vectors(source, img_ids, progress=sys.stderr.isatty())
    stats = BuildStats()
    rows = build_pairs(
        captions.positives, vectors, args.negatives, args.per_positive, args.seed,
        pool=args.pool, clusters=args.clusters, kmeans_iters=args.kmeans_iters, stats=stats,
    )  # fmt: skip
    write_pairs(args.out, rows)
    print(_summary(args, stats, captions))
    return 0


_COMMANDS = {"build": _build}


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (ValueError, OSError, MissingImageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
