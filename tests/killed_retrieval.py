"""`eval.py --task retrieval` that SIGKILLs itself after writing N block shards: a real crash of a real run.

    python tests/killed_retrieval.py N -- EVAL.PY ARGUMENTS...

The kill comes right after the N-th shard file of this process was renamed into place (no clean-up, no exception
handler runs), as an out-of-memory kill or a pre-empted node would end it.
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
    limit, separator, *argv = sys.argv[1:]
    if separator != "--":
        raise SystemExit(f"usage: {__doc__}")
    from lxmert_pl.runs import retrieval

    write_block = retrieval.ShardStore.write_block
    written = {"count": 0}

    def write_then_maybe_die(self, part) -> None:
        write_block(self, part)
        written["count"] += 1
        if written["count"] >= int(limit):
            print(f"killed_retrieval: SIGKILL after {written['count']} blocks", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    retrieval.ShardStore.write_block = write_then_maybe_die
    sys.exit(load_script(REPO_ROOT / "eval.py", "eval_entry_point").main(argv))


if __name__ == "__main__":
    main()
