"""eval.py end to end on a tiny checkpoint and a tiny TSV: run as a user runs it (a subprocess) for the DDP run,
wandb and the option errors; the other runs call eval.py's `main` in this process (`run_in_process`: the same run, the
same exit status and messages, without ~10 s of start-up each)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from e2e_helpers import make_eval_fixture, read_wandb_summary, run_in_process, run_script, save_vqa_snapshot

from lxmert_pl.scoring import Scorer


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make_eval_fixture(tmp_path_factory.mktemp("eval"))


def _eval(fx, out, *extra, env=None):
    proc = run_script("eval.py", "--ckpt", fx["ckpt"], "--pairs", fx["pairs"], "--features", fx["tsv"],
                      "--out", out, *extra, env=env)
    return proc


@pytest.fixture(scope="module")
def itm_run(fx, tmp_path_factory):
    out = tmp_path_factory.mktemp("itm")
    proc = run_in_process("eval.py", "--ckpt", fx["ckpt"], "--pairs", fx["pairs"], "--features", fx["tsv"], "--out",
                          out, "data.batch_size=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def _expected_scores(fx, mode):
    rows = fx["pair_rows"]
    feats = [fx["records"][r["img_id"]].features for r in rows]
    boxes = [fx["records"][r["img_id"]].normalized_boxes() for r in rows]
    result = Scorer(fx["model"]).score([r["sent"] for r in rows], feats, boxes)
    return result.scores(mode)


def test_predictions_equal_scoring_api(fx, itm_run):
    out, proc = itm_run
    preds = json.loads((out / "predictions.json").read_text())
    assert [p["question_id"] for p in preds] == [r["question_id"] for r in fx["pair_rows"]]  # input order, once each
    np.testing.assert_allclose([p["score"] for p in preds], _expected_scores(fx, "itm"), atol=1e-5)
    for p, r in zip(preds, fx["pair_rows"]):
        assert p["answer"] == ("True" if p["score"] > 0.5 else "False")
        assert p["ground"] == r["ground"] and p["img_id"] == r["img_id"] and p["sent"] == r["sent"]
        assert p["image_id"] == r["img_id"] and p["sentence"] == r["sent"]  # the fork's dump names
    assert (out / "predictions.csv").read_text().count("\n") == len(preds) + 1
    assert "Metrics on 13 labelled pairs" in proc.stdout
    for name in ("roc.png", "pr.png", "score_hist.png", "confusion_matrix.png"):
        assert (out / "plots" / name).stat().st_size > 1000
    assert (out / "config.yaml").exists()


def _auc(scores, labels):
    pos, neg = scores[labels == 1], scores[labels == 0]
    return float(((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])).mean())


def _average_precision(scores, labels):
    order = np.argsort(-scores, kind="stable")
    hits = labels[order]
    precision_at = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision_at * hits).sum() / hits.sum())


def test_metrics_equal_independent_computation(itm_run):
    out, _ = itm_run
    preds = json.loads((out / "predictions.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    s = np.array([p["score"] for p in preds])
    y = np.array([p["ground"] == "True" for p in preds], dtype=int)
    a = np.array([p["answer"] == "True" for p in preds], dtype=int)
    tp, fp = int(((a == 1) & (y == 1)).sum()), int(((a == 1) & (y == 0)).sum())
    fn, tn = int(((a == 0) & (y == 1)).sum()), int(((a == 0) & (y == 0)).sum())
    assert (metrics["tp"], metrics["fp"], metrics["fn"], metrics["tn"]) == (tp, fp, fn, tn)
    assert metrics["accuracy"] == pytest.approx((tp + tn) / len(y), abs=1e-6)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn)
    assert metrics["precision"] == pytest.approx(precision, abs=1e-6)
    assert metrics["recall"] == pytest.approx(recall, abs=1e-6)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    assert metrics["f1"] == pytest.approx(f1, abs=1e-6)
    assert metrics["roc_auc"] == pytest.approx(_auc(s, y), abs=1e-6)
    assert metrics["average_precision"] == pytest.approx(_average_precision(s, y), abs=1e-6)
    # Retrieval: each image's pairs form a group (5 images, each with matched and unmatched captions).
    r1 = []
    for img in {p["img_id"] for p in preds}:
        group = [p for p in preds if p["img_id"] == img]
        if {g["ground"] for g in group} == {"True", "False"}:
            r1.append(max(group, key=lambda g: g["score"])["ground"] == "True")
    assert metrics["i2t_groups"] == len(r1)
    assert metrics["i2t_R@1"] == pytest.approx(sum(r1) / len(r1), abs=1e-6)


def test_cosine_mode_on_vqa_snapshot(fx, tmp_path):
    vqa = tmp_path / "BEST.pth"
    save_vqa_snapshot(vqa, fx["model"])
    proc = run_in_process("eval.py", "--ckpt", vqa, "--pairs", fx["pairs"], "--features", fx["tsv"], "--out",
                          tmp_path / "out", "--mode", "cosine")
    assert proc.returncode == 0, proc.stderr[-3000:]
    preds = json.loads((tmp_path / "out" / "predictions.json").read_text())
    np.testing.assert_allclose([p["score"] for p in preds], _expected_scores(fx, "cosine"), atol=1e-5)
    assert "lxrt-finetuned" in proc.stdout
    proc = run_in_process("eval.py", "--ckpt", vqa, "--pairs", fx["pairs"], "--features", fx["tsv"], "--out",
                          tmp_path / "out2", "--mode", "itm")
    assert proc.returncode == 2
    assert "no matching head" in proc.stderr and "--mode cosine" in proc.stderr


@pytest.mark.slow
def test_two_cpu_processes_match_one(fx, itm_run, tmp_path):
    out_one, _ = itm_run
    proc = _eval(fx, tmp_path / "ddp", "--accelerator", "cpu", "--devices", "2", "data.batch_size=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((out_one / "predictions.json").read_text())
    two = json.loads((tmp_path / "ddp" / "predictions.json").read_text())
    assert len(two) == 13 and [p["question_id"] for p in two] == [p["question_id"] for p in one]
    np.testing.assert_allclose([p["score"] for p in two], [p["score"] for p in one], atol=1e-6)
    m1 = json.loads((out_one / "metrics.json").read_text())["metrics"]
    m2 = json.loads((tmp_path / "ddp" / "metrics.json").read_text())["metrics"]
    assert m1.keys() == m2.keys()
    for key in m1:
        assert m2[key] == pytest.approx(m1[key], abs=1e-6), key


def test_wandb_offline_without_credentials(fx, tmp_path):
    out = tmp_path / "wb"
    proc = _eval(fx, out, "logger.wandb.project=lxmert-test", env={"HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir()) if (out / "wandb").exists() else "no wandb dir"
    summary = read_wandb_summary(runs[0])
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert summary["test/roc_auc"] == pytest.approx(metrics["roc_auc"])
    assert summary["test/accuracy"] == pytest.approx(metrics["accuracy"])


def test_unknown_test_name_lists_available():
    proc = run_script("eval.py", "--test", "no_such_split")
    assert proc.returncode == 2 and "no_such_split" in proc.stderr and "matching_val" in proc.stderr


def test_unknown_option_and_key(fx, tmp_path):
    proc = run_script("eval.py", "--bogus-flag", "1")
    assert proc.returncode == 2 and "--bogus-flag" in proc.stderr
    proc = _eval(fx, tmp_path, "data.batchsize=4")
    assert proc.returncode == 2 and "data.batch_size" in proc.stderr  # the valid keys are listed


def test_missing_files(fx, tmp_path):
    proc = run_in_process("eval.py", "--ckpt", fx["ckpt"], "--pairs", tmp_path / "nope.json", "--features", fx["tsv"],
                          "--out", tmp_path / "o")
    assert proc.returncode == 2 and "pairs file not found" in proc.stderr and "nope.json" in proc.stderr
    proc = run_in_process("eval.py", "--ckpt", fx["ckpt"], "--pairs", fx["pairs"], "--features", tmp_path / "no.tsv",
                          "--out", tmp_path / "o")
    assert proc.returncode == 2 and "no.tsv" in proc.stderr


def test_pairs_with_unknown_img_id(fx, tmp_path):
    rows = json.loads(fx["pairs"].read_text())
    rows += [{"question_id": 1, "img_id": "COCO_val2014_999999999999", "sent": "a ghost", "ground": "False"}]
    bad = tmp_path / "bad_pairs.json"
    bad.write_text(json.dumps(rows))
    proc = run_in_process("eval.py", "--ckpt", fx["ckpt"], "--pairs", bad, "--features", fx["tsv"], "--out",
                          tmp_path / "o")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "COCO_val2014_999999999999" in proc.stderr and "1 of 14 pairs" in proc.stderr
    proc = run_in_process("eval.py", "--ckpt", fx["ckpt"], "--pairs", bad, "--features", fx["tsv"], "--out",
                          tmp_path / "skip", "data.skip_missing=true")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Skipped 1 pairs" in proc.stdout
    assert len(json.loads((tmp_path / "skip" / "predictions.json").read_text())) == 13
