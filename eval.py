#!/usr/bin/env python
"""Evaluate LXMERT image–text matching.

    python eval.py                                     # bundled demo: raw images -> detector -> matching
    python eval.py --ckpt lxr955 --test matching_val --with-feat
    python eval.py --ckpt PATH --pairs PAIRS.json --features VAL_obj36.tsv --out DIR [--mode cosine]
    python eval.py --task retrieval --ckpt lxr955 --captions dataset_flickr30k.json --split test --features F.tsv [--k 128]
    python eval.py --task benchmark --benchmark winoground|valse|negatives --data PATH [--images DIR | --features F]
    python eval.py ... data.batch_size=64 trainer.precision=bf16-true    # any config key as key=value

Data path: pairs + features (or images) -> lxmert_pl.data.MatchingDataModule -> lxmert_pl.runs.module.MatchingModule
-> metrics / predictions (lxmert_pl.runs.evaluate). Configs: configs/eval.yaml, configs/test/, configs/experiment/.
"""

from __future__ import annotations

import sys

from lxmert_pl.runs.cli import BATCH_SIZE, CKPT, FEATURES, MODEL_CONFIG, NAME, OUT, TRAINER_FLAGS, Command, Flag
from lxmert_pl.runs.cli import finite_float, positive_int

FLAGS = [
    CKPT, NAME, OUT, MODEL_CONFIG,
    Flag("--with-feat", "data.source", "use pre-extracted features (two-step), not images", "switch",
         value_if_set="features"),
    Flag("--pairs", "data.pairs", "pair file (seed JSON, JSONL/CSV, or LXMERT caption file)"),
    FEATURES,
    Flag("--images", "data.images", "folder of raw images, or a list file of image paths (one-step matching with "
         "the detector)"),
    Flag("--given-boxes", "data.given_boxes", "JSON {img_id: [[x1,y1,x2,y2], ...]}: extract features at these boxes"),
    Flag("--boxes", None, "detected boxes per image for one-step matching (sets detector.min_boxes/max_boxes)",
         type=positive_int),
    Flag("--detector", "detector.ckpt", "detector alias or directory (one-step matching)"),
    Flag("--mode", "mode", "matching head probability or cosine score", choices=("itm", "cosine")),
    Flag("--threshold", "threshold", "answer True when score > threshold", type=finite_float),
    Flag("--task", "task", "score pairs, rank images x captions, or score a probing benchmark",
         choices=("matching", "retrieval", "benchmark")),
    Flag("--benchmark", "benchmark.name", "benchmark format (--task benchmark)",
         choices=("winoground", "valse", "negatives")),
    Flag("--data", "benchmark.data", "benchmark file or folder (--task benchmark; winoground: also "
         "hf://datasets/facebook/winoground)"),
    Flag("--captions", "retrieval.captions", "retrieval: Karpathy split file, LXMERT caption file or pair file"),
    Flag("--split", "retrieval.split", "retrieval, Karpathy files: train | val | test | restval"),
    Flag("--k", "retrieval.k", "retrieval: re-rank the first stage's top K per query (default: full grid)",
         type=positive_int),
    Flag("--card", "card", "model card (README.md or its folder) to add this evaluation's metrics to"),
    Flag("--overwrite", "overwrite", "start afresh when --out holds resumable results made otherwise", "switch"),
    BATCH_SIZE, *TRAINER_FLAGS,
]


def derive(namespace, values: dict) -> None:
    """--features/--images choose the source; --boxes N sets both box counts."""
    if "data.source" not in values:
        if "data.features" in values:
            values["data.source"] = "features"
        elif "data.images" in values:
            values["data.source"] = "images"
    if namespace.boxes is not None:
        values["detector.min_boxes"] = values["detector.max_boxes"] = namespace.boxes


COMMAND = Command("eval.py", __doc__, "eval", FLAGS, groups={"--test": "test", "--experiment": "experiment"},
                  adjust=derive)


def run(cfg) -> None:
    # imported after parsing: --help and option errors answer at once
    if cfg.task == "benchmark":
        from lxmert_pl.runs.benchmark import run_benchmark

        run_benchmark(cfg)
    elif cfg.task == "retrieval":
        from lxmert_pl.runs.retrieval import run_retrieval

        run_retrieval(cfg)
    else:
        from lxmert_pl.runs.evaluate import run_eval

        run_eval(cfg)


def main(argv: list[str] | None = None) -> int:
    return COMMAND.main(run, argv)

if __name__ == "__main__":
    sys.exit(main())
