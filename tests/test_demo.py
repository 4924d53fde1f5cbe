"""The bundled demo: `python eval.py` with no arguments (raw images -> demo detector at the ground-truth boxes ->
demo LXRT) reaches the demo's accuracy on data/sample's val pairs, and the two-step run on the bundled val TSV
(`--with-feat`) gives the same predictions. The bundle is made by scripts/make_demo.py. `python eval.py` itself runs as
a user runs it (a process of its own); the other runs call eval.py's `main` in this process (`run_in_process`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_helpers import run_in_process
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CKPT = REPO_ROOT / "checkpoints" / "demo" / "lxrt_demo.ckpt"
DEMO_DETECTOR = REPO_ROOT / "checkpoints" / "demo" / "frcnn"
VAL_TSV = REPO_ROOT / "data" / "sample" / "features" / "val_obj.tsv"
TARGET_ACCURACY = 0.9  # the demo's target (issue 7); measured: val 0.95, test 0.93 (data/sample/README.md)

pytestmark = pytest.mark.skipif(
    not DEMO_CKPT.exists() or not (DEMO_DETECTOR / "config.yaml").exists(),
    reason="bundled demo weights absent (checkpoints/demo/): make them with scripts/make_demo.py",
)


def run_eval(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for key in ("WANDB_API_KEY", "WANDB_MODE"):  # no credentials, no forced mode: as on a fresh machine
        env.pop(key, None)
    return subprocess.run([sys.executable, "eval.py", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def read_run(out_dir: Path) -> tuple[dict, dict[int, float]]:
    metrics = json.loads((out_dir / "metrics.json").read_text())["metrics"]
    rows = json.loads((out_dir / "predictions.json").read_text())
    return metrics, {row["question_id"]: row["score"] for row in rows}


@pytest.fixture(scope="module")
def one_step() -> tuple[subprocess.CompletedProcess, dict, dict[int, float]]:
    out_dir = REPO_ROOT / "outputs" / "demo_val"
    # The default run caches the extracted features in its output folder; start without the cache so that the run
    # really goes raw images -> detector (a cache from an older demo detector would otherwise be read back).
    for name in ("image_features.tsv", "image_features.tsv.meta.json"):
        (out_dir / name).unlink(missing_ok=True)
    proc = run_eval()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics, scores = read_run(out_dir)
    return proc, metrics, scores


def test_eval_without_arguments_runs_the_demo(one_step):
    proc, metrics, scores = one_step
    output = proc.stdout + proc.stderr
    assert "BUNDLED DEMO weights" in output
    assert "bundled demo weights" in output.lower()
    assert "accuracy" in output.lower()
    assert metrics["num_pairs"] == 200 and len(scores) == 200


def test_demo_reaches_its_accuracy_target(one_step):
    proc, metrics, _ = one_step
    assert metrics["accuracy"] >= TARGET_ACCURACY, metrics
    assert f"{metrics['accuracy']:.4f}" in proc.stdout  # the printed table shows it


def test_demo_generalises_to_the_test_pairs(tmp_path):
    """The val pairs chose the training epoch; the test pairs were never seen: the target must hold there too."""
    proc = run_in_process("eval.py", "--test", "demo_test", "--out", tmp_path / "demo_test")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics, scores = read_run(tmp_path / "demo_test")
    assert len(scores) == 200
    assert metrics["accuracy"] >= TARGET_ACCURACY, metrics


@pytest.mark.skipif(not VAL_TSV.exists(), reason="bundled val features absent: scripts/make_demo.py --stages features")
def test_two_step_matches_one_step(one_step, tmp_path):
    _, metrics, scores = one_step
    proc = run_in_process("eval.py", "--with-feat", "--out", tmp_path / "two_step")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two_metrics, two_scores = read_run(tmp_path / "two_step")
    assert two_scores.keys() == scores.keys()
    worst = max(abs(two_scores[q] - scores[q]) for q in scores)
    assert worst <= 1e-4, f"two-step scores differ from one-step by up to {worst:.2e}"
    assert two_metrics["accuracy"] == metrics["accuracy"]


def test_one_step_with_the_bf16_detector_head(one_step, tmp_path):
    """`detector.precision=bf16` (configs/shared/detector.yaml) on the one-step path: the in-memory detector's
    weights are fingerprinted for the feature cache in bf16 too, and the scores stay those of the fp32 head."""
    _, metrics, scores = one_step
    proc = run_in_process("eval.py", "detector.precision=bf16", "--out", tmp_path / "bf16")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    bf16_metrics, bf16_scores = read_run(tmp_path / "bf16")
    assert bf16_scores.keys() == scores.keys()
    assert bf16_metrics["accuracy"] >= TARGET_ACCURACY, bf16_metrics
    assert max(abs(bf16_scores[q] - scores[q]) for q in scores) < 0.05


def test_the_demo_report_in_a_browser(one_step, tmp_path):
    """`python eval.py` writes outputs/demo_val/report.html: headless Chromium loads it without a console error,
    every picture decodes, the galleries hold the demo's 6 false positives and 4 false negatives; the README's
    screenshot script runs on it."""
    from browser import open_page
    from conftest import load_script

    report = REPO_ROOT / "outputs" / "demo_val" / "report.html"
    rows = json.loads((REPO_ROOT / "outputs" / "demo_val" / "predictions.json").read_text())
    false_pos = {r["question_id"] for r in rows if r["answer"] == "True" and r["ground"] == "False"}
    false_neg = {r["question_id"] for r in rows if r["answer"] == "False" and r["ground"] == "True"}
    assert (len(false_pos), len(false_neg)) == (6, 4)
    with open_page(report, tmp_path / "report.png") as page:
        assert page.console_errors == []
        assert len(page.images) > 50 and all(img["natural_width"] > 0 for img in page.images)
        shown = page.run("const out = {}; document.querySelectorAll('section.gallery').forEach(s => out[s.id] = "
                         "Array.from(s.querySelectorAll('.card')).map(c => Number(c.dataset.questionId))); return out;")
        assert set(shown["false-positives"]) == false_pos and set(shown["false-negatives"]) == false_neg
        assert len(shown["correct"]) == 24 and len(shown["uncertain"]) == 24
        assert "why" in page.run("return document.querySelector('#false-positives .card').textContent")
    script = load_script(REPO_ROOT / "scripts" / "report_screenshot.py", "report_screenshot")
    out = script.screenshot(report, tmp_path / "docs" / "report.png")
    assert Image.open(out).size == (1280, 1560)
