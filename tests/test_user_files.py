"""Files a user owns (model cards, exports, pair files) are replaced whole or not at all, and a failed write names
the file: checked under a file-size limit (`ulimit -f`), as a full disk would fail them. And `export --out` is
checked: never empty, never a foreign folder without --overwrite."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

from e2e_helpers import REPO_ROOT, save_tiny_snapshot
from helpers_features import write_synthetic_tsv


def _run_limited(limit_bytes: int | None, *args: str) -> subprocess.CompletedProcess:
    """`python ARGS...` with RLIMIT_FSIZE (what `ulimit -f` sets) of `limit_bytes`."""
    def limit():
        if limit_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300, preexec_fn=limit)


CARD_SCRIPT = """
import sys
from lxmert_pl.export import EvaluationResult, add_evaluation
from lxmert_pl.runs.errors import user_errors
with user_errors("eval.py"):
    add_evaluation(sys.argv[1], EvaluationResult("run", "pairs.json", "itm", {"accuracy": 0.5}))
"""


def test_card_is_replaced_whole_or_not_at_all_under_a_file_size_limit(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# My project\n\n" + "A long user README line.\n" * 16_500, encoding="utf-8")  # ~400 KB
    before = readme.read_bytes()
    done = _run_limited(300_000, "-c", CARD_SCRIPT, str(readme))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("eval.py: error: File too large") and str(readme) in done.stderr, done.stderr
    assert readme.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]
    from lxmert_pl.export import EvaluationResult, add_evaluation

    add_evaluation(readme, EvaluationResult("run", "pairs.json", "itm", {"accuracy": 0.5}))
    assert readme.read_text(encoding="utf-8").startswith(before.decode())


def _export_in_process(capsys, out, *extra, ckpt) -> tuple[int, str, str]:
    from lxmert_pl.export.__main__ import main

    capsys.readouterr()
    try:
        status = main(["--ckpt", str(ckpt), "--out", str(out), *extra])
    except SystemExit as stop:
        status = stop.code
    said = capsys.readouterr()
    return status, said.out, said.err


def test_export_out_is_checked_and_replaced_whole_or_not_at_all(tmp_path, capsys):
    ckpt = tmp_path / "model_LXRT.pth"
    save_tiny_snapshot(ckpt)
    status, _, err = _export_in_process(capsys, "", ckpt=ckpt)  # an unset shell variable
    assert status == 2 and "--out is empty" in err, err
    foreign = tmp_path / "project"
    foreign.mkdir()
    (foreign / "README.md").write_text("my project\n")
    (foreign / "config.json").write_text("{}\n")
    status, _, err = _export_in_process(capsys, foreign, ckpt=ckpt)
    assert status == 2 and "is not an earlier export" in err and "--overwrite" in err, err
    assert (foreign / "README.md").read_text() == "my project\n"
    status, said, err = _export_in_process(capsys, foreign, "--overwrite", ckpt=ckpt)
    assert status == 0 and f"Replaced in {foreign}: config.json, README.md" in said, err

    out = tmp_path / "exported"
    assert _export_in_process(capsys, out, ckpt=ckpt)[0] == 0
    assert _export_in_process(capsys, out, ckpt=ckpt)[0] == 0  # an earlier export of ours: no --overwrite needed
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    save_tiny_snapshot(ckpt, seed=1)
    done = _run_limited(100_000, "-m", "lxmert_pl.export", "--ckpt", str(ckpt), "--out", str(out))
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "File too large" in done.stderr and str(out / "model.safetensors") in done.stderr, done.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing replaced, no staging folder left


def test_pair_file_is_replaced_whole_or_not_at_all_under_a_file_size_limit(tmp_path):
    img_ids = [f"img{i}" for i in range(4)]
    tsv = tmp_path / "f.tsv"
    write_synthetic_tsv(tsv, img_ids, num_boxes=2, dim=8)
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"img_id": img_ids[i % 4], "sent": f"caption number {i} of a test"}) + "\n"
                                for i in range(400)), encoding="utf-8")
    out = tmp_path / "pairs.json"
    out.write_text("[]\n")
    args = ["-m", "lxmert_pl.pairs", "build", "--captions", str(captions), "--features", str(tsv), "--out", str(out)]
    from lxmert_pl.pairs.__main__ import main

    assert main(args[2:-1] + [str(tmp_path / "first.json")]) == 0  # the TSV's index is built here, unlimited
    done = _run_limited(20_000, *args)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "File too large" in done.stderr and str(out) in done.stderr, done.stderr
    assert out.read_text() == "[]\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
