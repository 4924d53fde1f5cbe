#!/usr/bin/env python
"""Fine-tune LXMERT's matching head (and model) on labelled pairs or captions.

    python train.py --ckpt lxr955 --train train_pairs.json --val val_pairs.json --features train_obj36.tsv
    python train.py --ckpt lxr955 --train mscoco_train.json --val val.json --features F.tsv data.negative_ratio=0.5
    python train.py ... --resume outputs/RUN/checkpoints/last.ckpt            # continue exactly
    python train.py ... model.finetune=head optim.lr=1e-4 trainer.max_epochs=2  # any config key as key=value

Config: configs/train.yaml. The best checkpoint (val ROC-AUC) is usable as `eval.py --ckpt PATH`.
"""

from __future__ import annotations

import sys

from lxmert_pl.runs.cli import BATCH_SIZE, CKPT, FEATURES, MODEL_CONFIG, NAME, OUT, TRAINER_FLAGS, Command, Flag

FLAGS = [
    CKPT, NAME, OUT, MODEL_CONFIG,
    Flag("--train", "data.train", "labelled pairs, or a caption file (negatives made on the fly)"),
    Flag("--val", "data.val", "labelled validation pairs"),
    FEATURES,
    Flag("--resume", "resume", "a last.ckpt of train.py to resume exactly"),
    Flag("--max-epochs", "trainer.max_epochs", "epochs to train", type=int),
    BATCH_SIZE, *TRAINER_FLAGS,
]


COMMAND = Command("train.py", __doc__, "train", FLAGS)


def run(cfg) -> None:
    from lxmert_pl.runs.training import run_train  # imported after parsing: --help and option errors answer at once

    run_train(cfg)


def main(argv: list[str] | None = None) -> int:
    return COMMAND.main(run, argv)

if __name__ == "__main__":
    sys.exit(main())
