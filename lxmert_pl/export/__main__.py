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
from pathlib import Path

from lxmert_pl.errors import UserInputError
from lxmert_pl.export.hf import CONFIG_FILE, TOKENIZER_FILES, WEIGHTS_FILE, export_hf
from lxmert_pl.export.model_card import CARD_FILE, card_for_checkpoint, read_model_card
from lxmert_pl.model.loading import load_lxmert
from lxmert_pl.registry import resolve_checkpoint

FORMATS = ("hf",)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lxmert_pl.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--ckpt", required=True, help="checkpoint: alias, hf://ORG/NAME[@REV] or path, any format")
    parser.add_argument("--out", required=True, help="output folder: new, empty, or an earlier export (its files are "
                        "replaced); another folder only with --overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help="export into a non-empty folder that is not an earlier export (says which files it replaces)")
    parser.add_argument("--format", choices=FORMATS, default="hf", help="hf: transformers' LxmertForPreTraining")
    parser.add_argument("--model-config", help="architecture JSON (HF LxmertConfig names) for a file without one")
    parser.add_argument("--title", help="the card's title (default: from the checkpoint's name)")
    parser.add_argument("--max-seq-length", type=int, help="tokens incl. [CLS]/[SEP] (default: the run's, else 20)")
    parser.add_argument("--detector", help="the detector whose features the model expects (card text)")
    parser.add_argument("--geometry", help="the detector's proposal geometry, e.g. caffe or port (card text)")
    parser.add_argument("--boxes", help="boxes per image the model expects, e.g. '36' or '10-100' (card text)")
    return parser.parse_args(argv)


def check_out(out: str, overwrite: bool) -> list[Path]:
    """Refuse an empty `--out` (an unset shell variable would export into the current folder) and a non-empty
    folder that is not an earlier export of ours, unless `overwrite`; return the files the export will replace."""
    if not out.strip():
        raise UserInputError("--out is empty (an unset shell variable?): name the folder to export into")
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(20, "--out must be a folder, got a file", str(folder))
    present = sorted(p for p in folder.iterdir() if not p.name.startswith(".")) if folder.is_dir() else []
    replaced = [folder / name for name in (CONFIG_FILE, WEIGHTS_FILE, *TOKENIZER_FILES, CARD_FILE)
                if (folder / name).exists()]
    if not present or overwrite:
        return replaced
    try:
        ours = read_model_card(folder)[0] is not None and (folder / CONFIG_FILE).is_file()
    except UserInputError:
        ours = False
    if not ours:
        shown = ", ".join(p.name for p in present[:8]) + (", ..." if len(present) > 8 else "")
        raise UserInputError(f"--out {folder} is not empty ({shown}) and is not an earlier export of lxmert_pl: "
                             "choose a new folder, or pass --overwrite to replace the export's files in it")
    return replaced


def run_export(args: argparse.Namespace, command: str) -> list:
    """Load, build the card (carrying over a train.py card beside the checkpoint), export; return the files."""
    replaced = check_out(args.out, args.overwrite)
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
    written = export_hf(model, args.out, card, evaluations)
    if replaced:
        print(f"Replaced in {args.out}: {', '.join(p.name for p in replaced)}", flush=True)
    return written


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
