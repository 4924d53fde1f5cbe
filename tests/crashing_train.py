"""`train.py` that dies at a chosen point, for the resume tests: a real crash of a real training process.

    python tests/crashing_train.py AT HOW -- TRAIN.PY ARGUMENTS...

AT: `step:N` (right after the optimizer step that makes the global step N, once `last.ckpt` callbacks have run),
`batch:K` (at the end of the K-th training batch of this process, counted from 1) or `epoch:E` (at the end of epoch
E, after its `last.ckpt` was written). HOW: `kill` (SIGKILL to itself: no clean-up, no exception handler runs),
`raise` (a RuntimeError from the callback: Lightning's exception path runs) or `sigint` (SIGINT, as Ctrl-C).
The crash callback is added after the run's own callbacks, so whatever they write at that point is on disk.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from pytorch_lightning.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's train.py


class CrashAt(Callback):
    def __init__(self, at: str, how: str):
        kind, _, value = at.partition(":")
        if kind not in ("step", "batch", "epoch") or how not in ("kill", "raise", "sigint"):
            raise SystemExit(f"usage: {__doc__}")
        self.kind, self.value, self.how = kind, int(value), how
        self.batches = 0

    def _crash(self, where: str) -> None:
        print(f"crashing_train: {self.how} at {where}", file=sys.stderr, flush=True)
        if self.how in ("kill", "sigint"):
            os.kill(os.getpid(), signal.SIGKILL if self.how == "kill" else signal.SIGINT)
            return  # SIGINT: KeyboardInterrupt is raised at the next bytecode boundary, as after Ctrl-C
        raise RuntimeError(f"crash injected at {where}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1
        if self.kind == "step" and trainer.global_step == self.value:
            self._crash(f"step {trainer.global_step}")
            self.kind = "done"
        if self.kind == "batch" and self.batches == self.value:
            self._crash(f"batch {self.batches} (global step {trainer.global_step})")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.kind == "epoch" and trainer.current_epoch == self.value:
            self._crash(f"the end of epoch {trainer.current_epoch}")


def main() -> int:
    at, how, separator, *train_args = sys.argv[1:]
    assert separator == "--", __doc__
    import train
    from lxmert_pl.runs import training

    crash = CrashAt(at, how)
    run_train = training.run_train
    training.run_train = lambda cfg: run_train(cfg, callbacks=[crash])
    return train.main(train_args)


if __name__ == "__main__":
    sys.exit(main())
