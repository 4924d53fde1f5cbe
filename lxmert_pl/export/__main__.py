"""`python -m lxmert_pl.export --ckpt ANY_CHECKPOINT --out DIR [--format hf]`: a folder transformers loads.

    python -m lxmert_pl.export --ckpt outputs/RUN/checkpoints/best.ckpt --out exported/my-matcher
    python -m lxmert_pl.export --ckpt lxr955 --out exported/lxr955-hf
    python -m lxmert_pl.export --ckpt model_LXRT.pth --model-config tiny_config.json --out DIR

The checkpoint is anything `eval.py --ckpt` takes (alias, hf:// reference, path; every format the loader knows).
The folder gets `config.json`, `model.safetensors`, the tokenizer files and a model card `README.md`. A card that
`train.py` wrote next to the checkpoint (same sha256) passes its training record and evaluations on to the new card.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import replace

from lxmert_pl.export.hf import export_hf
from lxmert_pl.export.model_card import card_for_checkpoint, read_model_card
from lxmert_pl.model.loading import load_lxmert
from lxmert_pl.registry import resolve_checkpoint

FORMATS = ("hf",)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lxmert_pl.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--ckpt", required=True, help="checkpoint: alias, hf://ORG/NAME[@REV] or path, any format")
    parser.add_argument("--out", required=True, help="output folder (created; files in it are overwritten)")
    parser.add_argument("--format", choices=FORMATS, default="hf", help="hf: transformers' LxmertForPreTraining")
    parser.add_argument("--model-config", help="architecture JSON (HF LxmertConfig names) for a file without one")
    parser.add_argument("--title", help="the card's title (default: from the checkpoint's name)")
    parser.add_argument("--max-seq-length", type=int, help="tokens incl. [CLS]/[SEP] (default: the run's, else 20)")
    parser.add_argument("--detector", help="the detector whose features the model expects (card text)")
    parser.add_argument("--geometry", help="the detector's proposal geometry, e.g. caffe or port (card text)")
    parser.add_argument("--boxes", help="boxes per image the model expects, e.g. '36' or '10-100' (card text)")
    return parser.parse_args(argv)


def run_export(args: argparse.Namespace, command: str) -> list:
    """Load, build the card (carrying over a train.py card beside the checkpoint), export; return the files."""
    resolved = resolve_checkpoint(args.ckpt)
    model, report = load_lxmert(resolved.path, model_config=args.model_config)
    print(f"Weights: {resolved.describe()}\n  {report.summary()}", flush=True)
    card = card_for_checkpoint(model, resolved, title=args.title, command=command)
    evaluations = []
    if resolved.path.is_file():
        previous, evaluations = read_model_card(resolved.path.parent)
        if previous is not None and previous.source_sha256 == card.source_sha256:
            card = replace(card, training=previous.training, features=previous.features,
                           max_seq_length=previous.max_seq_length, base_model=previous.base_model,
                           title=args.title or previous.title)
        else:
            evaluations = []
    given = {"detector": args.detector, "geometry": args.geometry, "boxes": args.boxes}
    if any(given.values()):
        card.features = replace(card.features, **{k: v for k, v in given.items() if v}, note=None)
    if args.max_seq_length:
        card.max_seq_length = args.max_seq_length
    return export_hf(model, args.out, card, evaluations)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    from lxmert_pl.runs.errors import user_errors  # the entry point's error reporting (not the library's)

    with user_errors("lxmert_pl.export"):
        written = run_export(args, "python -m lxmert_pl.export " + shlex.join(argv))
        print("Wrote " + ", ".join(str(p) for p in written), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
