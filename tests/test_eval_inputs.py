"""eval.py on what users really pass: globs, reused output folders, bad boxes/pair files, wrong paths.

Each case runs the real entry point on the bundled sample (demo weights, the val TSV) and checks the exit status and
the one-line message (exit 2, no traceback) or the files left behind. Most cases call eval.py's `main` in this
process (`run_in_process`: what the run computes, writes and says is the same, without ~10 s of start-up each); Ctrl-C
and the wandb fallback run eval.py as a process of its own (a real signal, wandb's global state; the exit status 2 of
a real eval.py process is checked in test_eval_e2e and test_config_schema).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from e2e_helpers import REPO_ROOT, run_in_process, run_script

pytestmark = pytest.mark.slow
SAMPLE = REPO_ROOT / "data" / "sample"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("eval_inputs")
    rows = json.loads((SAMPLE / "val_pairs.json").read_text())[:24]
    labelled, unlabelled = tmp / "labelled.json", tmp / "unlabelled.json"
    labelled.write_text(json.dumps(rows))
    unlabelled.write_text(json.dumps([{k: v for k, v in r.items() if k not in ("label", "ground")} for r in rows]))
    return {"tmp": tmp, "labelled": labelled, "unlabelled": unlabelled}


def _eval_here(*args):
    """eval.py --ckpt demo-lxrt ... in this process (see the module's docstring)."""
    return run_in_process("eval.py", "--ckpt", "demo-lxrt", *args)


def _user_error(done, *needles: str) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]
    for needle in needles:
        assert needle in line, line
    return line


def test_feature_glob_and_reused_output_folder(pairs):
    out = pairs["tmp"] / "out"
    first = _eval_here("--pairs", pairs["labelled"], "--features", str(SAMPLE / "features" / "val_*.tsv"), "--out", out)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "metrics.json").exists() and (out / "plots").is_dir()
    # The same folder, unlabelled pairs: the old metrics and plots must not sit beside the new predictions.
    second = _eval_here("--pairs", pairs["unlabelled"], "--features", SAMPLE / "features" / "val_obj.tsv", "--out", out)
    assert second.returncode == 0, second.stderr[-3000:]
    assert not (out / "metrics.json").exists() and not (out / "plots").exists()
    assert "Replaced the results of an earlier run" in second.stdout
    assert all("ground" not in row for row in json.loads((out / "predictions.json").read_text()))
    assert not list(out.glob(".results-*")), "the staging folder is left behind"


def test_bad_boxes_files_are_named(pairs):
    tmp = pairs["tmp"]
    not_json = tmp / "boxes.txt"
    not_json.write_text("sample_val_000000 1 2 3 4\n")
    wrong_shape = tmp / "boxes_wrong.json"
    wrong_shape.write_text(json.dumps({"sample_val_000000": [[1, 2, 3]]}))
    inverted = tmp / "boxes_inverted.json"
    inverted.write_text(json.dumps({"sample_val_000000": [[30, 2, 10, 40]]}))
    for boxes in (not_json, wrong_shape, inverted):
        done = _eval_here("--pairs", pairs["labelled"], "--images", SAMPLE / "images" / "val", "--given-boxes", boxes,
                         "--out", tmp / "boxes_out")
        _user_error(done, boxes.name)


def test_bad_paths_and_pair_files(pairs):
    tmp = pairs["tmp"]
    empty = tmp / "empty.json"
    empty.write_text("[]")
    an_object = tmp / "object.json"
    an_object.write_text(json.dumps({"img_id": "x", "sent": "a red circle"}, indent=2))
    features = ["--features", str(SAMPLE / "features" / "val_obj.tsv")]
    _user_error(_eval_here("--pairs", empty, *features, "--out", tmp / "e"), "empty.json")
    _user_error(_eval_here("--pairs", an_object, *features, "--out", tmp / "o"), "object.json")
    _user_error(_eval_here("--pairs", tmp, *features, "--out", tmp / "d"), str(tmp))
    _user_error(_eval_here("--pairs", pairs["labelled"], "--images", pairs["labelled"], "--out", tmp / "i"),
                "labelled.json")


def test_sigint_says_it_was_interrupted_and_writes_nothing(pairs):
    import os
    import signal
    import sys
    import time

    out = pairs["tmp"] / "interrupted"
    many = pairs["tmp"] / "many.json"
    rows = json.loads((SAMPLE / "val_pairs.json").read_text())
    many.write_text(json.dumps(rows * 20))  # 4,000 pairs at batch size 1: long enough to interrupt
    command = [sys.executable, str(REPO_ROOT / "eval.py"), "--ckpt", "demo-lxrt", "--pairs", str(many), "--features",
               str(SAMPLE / "features" / "val_obj.tsv"), "--out", str(out), "--batch-size", "1"]
    proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if line.startswith("Scoring:"):
            break
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "eval.py: interrupted: no results were written to" in stderr
    assert "Traceback" not in stderr
    assert not (out / "predictions.json").exists()


def test_wandb_online_without_a_reachable_server_falls_back_offline(pairs):
    import socket

    with socket.socket() as probe:  # a local port with nothing listening: connection refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = pairs["tmp"] / "wandb_fallback"
    env = {"WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": f"http://127.0.0.1:{port}", "WANDB_SILENT": "true"}
    done = run_script("eval.py", "--ckpt", "demo-lxrt", "--pairs", pairs["labelled"], "--features",
                      SAMPLE / "features" / "val_obj.tsv", "--out", out, "logger.wandb.project=lxmert_pl_test",
                      "logger.wandb.mode=online", env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"wandb: cannot reach 127.0.0.1:{port}" in done.stdout
    assert list((out / "wandb").glob("offline-run-*"))


def test_nonfinite_scores_are_named_or_skipped_when_asked(pairs):
    import dataclasses

    import numpy as np

    from lxmert_pl.features import TsvWriter, iter_tsv_features

    tmp = pairs["tmp"]
    rows = json.loads(pairs["labelled"].read_text())
    poisoned_id = rows[0]["img_id"]
    tsv = tmp / "poisoned.tsv"
    with TsvWriter(tsv) as writer:
        for record in iter_tsv_features(SAMPLE / "features" / "val_obj.tsv"):
            if record.img_id == poisoned_id:  # finite, but overflows inside the model
                record = dataclasses.replace(record, features=np.full_like(record.features, 3e38))
            writer.write(record)
    refused = _eval_here("--pairs", pairs["labelled"], "--features", tsv, "--out", tmp / "nan_refused")
    line = _user_error(refused, "non-finite score", poisoned_id, "skip_nonfinite=true")
    assert not (tmp / "nan_refused" / "predictions.json").exists(), line
    skipped = _eval_here("--pairs", pairs["labelled"], "--features", tsv, "--out", tmp / "nan_skipped",
                        "skip_nonfinite=true")
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    bad = sum(row["img_id"] == poisoned_id for row in rows)
    predictions = json.loads((tmp / "nan_skipped" / "predictions.json").read_text())  # strict JSON: no bare NaN
    assert len(predictions) == len(rows) - bad
    metrics = json.loads((tmp / "nan_skipped" / "metrics.json").read_text())
    assert metrics["num_nonfinite"] == bad and metrics["metrics"]["num_pairs"] == len(rows) - bad
