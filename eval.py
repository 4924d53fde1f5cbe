#!/usr/bin/env python
"""Evaluate LXMERT image–text matching.

    python eval.py                                     # bundled demo: raw images -> detector -> matching
    python eval.py --ckpt lxr955 --test matching_val --with-feat
    python eval.py --ckpt PATH --pairs PAIRS.json --features VAL_obj36.tsv --out DIR [--mode cosine]
    python eval.py --task retrieval --ckpt lxr955 --captions dataset_flickr30k.json --split test --features F.tsv [--k 128]
    python eval.py ... data.batch_size=64 trainer.precision=bf16-true    # any config key as key=value

Data path: pairs + features (or images) -> lxmert_pl.data.MatchingDataModule -> lxmert_pl.runs.module.MatchingModule
-> metrics / predictions (lxmert_pl.runs.evaluate). Configs: configs/eval.yaml, configs/test/, configs/experiment/.
"""

from __future__ import annotations

import argparse
import sys

from lxmert_pl.runs.config import ConfigError, available, compose


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--ckpt", help="checkpoint alias (checkpoints/registry.yaml) or path, any known format")
    parser.add_argument("--test", help=f"pairs + features of configs/test/NAME.yaml ({', '.join(available('test'))})")
    parser.add_argument("--experiment", help=f"preset of configs/experiment/ ({', '.join(available('experiment'))})")
    parser.add_argument("--with-feat", action="store_true", help="use pre-extracted features (two-step), not images")
    parser.add_argument("--name", help="run name (output folder outputs/NAME)")
    parser.add_argument("--pairs", help="pair file (seed JSON, JSONL/CSV, or LXMERT caption file)")
    parser.add_argument("--features", action="append", help="obj36 TSV or binary store; repeat for several")
    parser.add_argument("--images", help="folder of raw images (one-step matching with the detector)")
    parser.add_argument("--boxes", help="JSON {img_id: [[x1,y1,x2,y2], ...]}: extract features at these boxes")
    parser.add_argument("--detector", help="detector alias or directory (one-step matching)")
    parser.add_argument("--out", help="output folder (default outputs/<name>)")
    parser.add_argument("--mode", choices=["itm", "cosine"], help="matching head probability or cosine score")
    parser.add_argument("--model-config", help="architecture JSON (HF LxmertConfig field names)")
    parser.add_argument("--devices", type=int, help="number of devices (N > 1: DDP)")
    parser.add_argument("--accelerator", choices=["cpu", "gpu", "auto"])
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--threshold", type=float, help="answer True when score > threshold")
    parser.add_argument("--task", choices=["matching", "retrieval"], help="score pairs, or rank images x captions")
    parser.add_argument("--captions", help="retrieval: Karpathy split file, LXMERT caption file or pair file")
    parser.add_argument("--split", help="retrieval, Karpathy files: train | val | test | restval")
    parser.add_argument("--k", type=int, help="retrieval: re-rank the first stage's top K per query (default: full grid)")
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args, rest


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    flags = {
        "ckpt": args.ckpt, "name": args.name, "out": args.out, "mode": args.mode, "model_config": args.model_config,
        "threshold": args.threshold, "data.pairs": args.pairs, "data.features": args.features,
        "data.images": args.images, "data.boxes": args.boxes, "data.batch_size": args.batch_size,
        "detector.ckpt": args.detector, "trainer.devices": args.devices, "trainer.accelerator": args.accelerator,
        "task": args.task, "retrieval.captions": args.captions, "retrieval.split": args.split, "retrieval.k": args.k,
        "data.source": "features" if args.with_feat or args.features else ("images" if args.images else None),
    }
    try:
        cfg = compose("eval", experiment=args.experiment, test=args.test, flags=flags, overrides=overrides)
    except ConfigError as err:
        print(f"eval.py: error: {err}", file=sys.stderr)
        return 2
    from lxmert_pl.runs.evaluate import run_eval
    from lxmert_pl.runs.errors import user_errors
    from lxmert_pl.runs.retrieval import run_retrieval

    with user_errors("eval.py"):
        (run_retrieval if cfg.task == "retrieval" else run_eval)(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
