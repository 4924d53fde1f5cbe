"""`eval.py` with every detection counted and, optionally, one node killed mid-way: a real crash of a real run.

    python tests/counted_eval.py LOG KILL_AFTER -- EVAL.PY ARGUMENTS...

Each image the detector runs on is appended to LOG as a line "NODE_RANK<TAB>pid<TAB>img_id" (one unbuffered
O_APPEND write per batch), so a test can count, across processes and runs, how often each image was detected and
by which node. KILL_AFTER > 0: the process of node 1 (NODE_RANK=1) SIGKILLs itself right after its KILL_AFTER-th row
reached its shard file of the feature cache (no clean-up, no exception handler runs); 0: no kill.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from conftest import load_script

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # the repository's lxmert_pl


def main() -> None:
    log, kill_after, separator, *argv = sys.argv[1:]
    if separator != "--":
        raise SystemExit(f"usage: {__doc__}")
    from lxmert_pl.detector.model import BottomUpFasterRCNN
    from lxmert_pl.features.tsv import TsvWriter

    node = os.environ.get("NODE_RANK", "0")
    extract = BottomUpFasterRCNN.extract

    def counted_extract(self, images, img_ids=None, *args, **kwargs):
        lines = "".join(f"{node}\t{os.getpid()}\t{img_id}\n" for img_id in img_ids)
        with open(log, "a", encoding="utf-8", buffering=1) as handle:
            handle.write(lines)
        return extract(self, images, img_ids, *args, **kwargs)

    BottomUpFasterRCNN.extract = counted_extract
    if int(kill_after) > 0 and node == "1":
        write = TsvWriter.write
        written = {"rows": 0}

        def write_then_maybe_die(self, features) -> None:
            write(self, features)
            if ".shard" in self.path.name:
                written["rows"] += 1
                if written["rows"] >= int(kill_after):
                    print(f"counted_eval: SIGKILL after {written['rows']} shard rows", file=sys.stderr, flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)

        TsvWriter.write = write_then_maybe_die
    sys.exit(load_script(REPO_ROOT / "eval.py", "eval_entry_point").main(argv))


if __name__ == "__main__":
    main()
