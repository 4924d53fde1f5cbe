#!/usr/bin/env python
"""Fine-tune LXMERT's matching head (and model) on labelled pairs or captions.

    python train.py --ckpt lxr955 --train train_pairs.json --val val_pairs.json --features train_obj36.tsv
    python train.py --ckpt lxr955 --train mscoco_train.json --val val.json --features F.tsv data.negative_ratio=0.5
    python train.py ... --resume outputs/RUN/checkpoints/last.ckpt            # continue exactly
    python train.py ... model.finetune=head optim.lr=1e-4 trainer.max_epochs=2  # any config key as key=value

Config: configs/train.yaml. The best checkpoint (val ROC-AUC) is usable as `eval.py --ckpt PATH`.
"""

from __future__ import annotations

import argparse
import sys

from lxmert_pl.runs.config import ConfigError, compose


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--ckpt", help="starting weights: alias or path (any format the loader knows)")
    parser.add_argument("--train", help="labelled pairs, or a caption file (negatives made on the fly)")
    parser.add_argument("--val", help="labelled validation pairs")
    parser.add_argument("--features", action="append", help="obj36 TSV or binary store; repeat for several")
    parser.add_argument("--resume", help="a last.ckpt of train.py to resume exactly")
    parser.add_argument("--name", help="run name (output folder outputs/NAME)")
    parser.add_argument("--out", help="output folder")
    parser.add_argument("--model-config", help="architecture JSON (HF LxmertConfig field names)")
    parser.add_argument("--devices", type=int)
    parser.add_argument("--accelerator", choices=["cpu", "gpu", "auto"])
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--max-epochs", type=int)
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    unknown = [a for a in overrides if a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    flags = {
        "ckpt": args.ckpt, "resume": args.resume, "name": args.name, "out": args.out,
        "model_config": args.model_config, "data.train": args.train, "data.val": args.val,
        "data.features": args.features, "data.batch_size": args.batch_size, "trainer.devices": args.devices,
        "trainer.accelerator": args.accelerator, "trainer.max_epochs": args.max_epochs,
    }
    try:
        cfg = compose("train", flags=flags, overrides=overrides)
    except ConfigError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    from lxmert_pl.runs.errors import user_errors
    from lxmert_pl.runs.training import run_train

    with user_errors("train.py"):
        run_train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
