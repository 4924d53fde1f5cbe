"""The chains a user runs, fed with what the previous step really produced (not ground-truth or hand-made inputs).

1. two-step: `extract.py` with the detector's OWN boxes (no --given-boxes) -> `eval.py --features` on that TSV;
2. one-step: `eval.py --images DIR` without a boxes file (the detector proposes the boxes).
Both once failed: detected boxes overshot the image border and eval refused them. The entry points' `main` runs in
this process (`run_in_process`: the same runs without ~6 s of start-up each).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from e2e_helpers import REPO_ROOT, run_in_process

pytestmark = pytest.mark.slow
SAMPLE = REPO_ROOT / "data" / "sample"


@pytest.fixture(scope="module")
def small_val_set(tmp_path_factory) -> dict:
    """Six bundled val images and the val pairs that name them."""
    tmp = tmp_path_factory.mktemp("chain")
    images = tmp / "images"
    images.mkdir()
    pairs = json.loads((SAMPLE / "val_pairs.json").read_text())
    chosen = sorted({p["img_id"] for p in pairs})[:6]
    for img_id in chosen:
        shutil.copy(SAMPLE / "images" / "val" / f"{img_id}.png", images)
    subset = [p for p in pairs if p["img_id"] in chosen]
    (tmp / "pairs.json").write_text(json.dumps(subset))
    return {"tmp": tmp, "images": images, "pairs": tmp / "pairs.json", "num_pairs": len(subset)}


def _predictions(out: Path) -> list[dict]:
    return json.loads((out / "predictions.json").read_text())


def test_extract_with_detected_boxes_then_eval(small_val_set):
    tmp = small_val_set["tmp"]
    tsv = tmp / "detected.tsv"
    extracted = run_in_process("extract.py", "--images", small_val_set["images"], "--out", tsv, "--detector",
                               "demo-frcnn", "--boxes", "10")
    assert extracted.returncode == 0, extracted.stderr[-3000:]
    evaluated = run_in_process("eval.py", "--ckpt", "demo-lxrt", "--pairs", small_val_set["pairs"], "--features", tsv,
                               "--out", tmp / "two_step")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert len(_predictions(tmp / "two_step")) == small_val_set["num_pairs"]


def test_one_step_eval_with_detected_boxes(small_val_set):
    tmp = small_val_set["tmp"]
    evaluated = run_in_process("eval.py", "--ckpt", "demo-lxrt", "--pairs", small_val_set["pairs"], "--images",
                               small_val_set["images"], "--out", tmp / "one_step")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert len(_predictions(tmp / "one_step")) == small_val_set["num_pairs"]
