"""report.html end to end through eval.py (features-only runs with and without --images, a retrieval run), the
offline wandb table's images with boxes, `python -m lxmert_pl.features show` and `extract.py --show`."""

from __future__ import annotations

import json
import shutil

import pytest
from browser import open_page
from conftest import load_script
from e2e_helpers import REPO_ROOT, run_script
from PIL import Image

from lxmert_pl.runs.config import compose

SAMPLE = REPO_ROOT / "data" / "sample"
VAL_TSV = SAMPLE / "features" / "val_obj.tsv"
INJECTED = "<script>document.title='pwned'</script> a red circle"

pytestmark = pytest.mark.skipif(not VAL_TSV.exists(), reason="bundled sample features absent (data/sample)")
# In-process entry points (as tests/test_extract.py does) where a fresh interpreter adds nothing to what is tested;
# the wandb run keeps its own process (wandb keeps global state).
eval_script = load_script(REPO_ROOT / "eval.py", "eval_entry_point")
extract_script = load_script(REPO_ROOT / "extract.py")


def _pairs(tmp_path, count: int = 12):
    rows = json.loads((SAMPLE / "val_pairs.json").read_text())[:count]
    rows[0] = {**rows[0], "sent": INJECTED}
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(rows))
    return path, rows


def _gallery_captions(page) -> dict[str, list[str]]:
    return page.run("const out = {}; document.querySelectorAll('section.gallery').forEach(s => "
                    "out[s.id] = Array.from(s.querySelectorAll('.card .cap')).map(e => e.textContent)); return out;")


def test_features_only_reports_with_and_without_images_and_wandb_boxes(tmp_path):
    pairs, rows = _pairs(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    ids = sorted({r["img_id"] for r in rows})
    for img_id in ids[:3]:
        shutil.copy(SAMPLE / "images" / "val" / f"{img_id}.png", images)
    (images / f"{ids[3]}.png").write_bytes(b"broken")  # unreadable; the rest are missing
    with_images = tmp_path / "with_images"
    proc = run_script("eval.py", "--pairs", pairs, "--features", VAL_TSV, "--images", images, "--out", with_images,
                      "report.cards=12", "logger.wandb.project=report-test", "logger.wandb.mode=offline")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"Report: {with_images / 'report.html'}" in proc.stdout
    text = (with_images / "report.html").read_text()
    assert "&lt;script&gt;document.title" in text and "<script>" not in text
    assert "unreadable" in text and "not found in" in text
    with open_page(with_images / "report.html", tmp_path / "with_images.png") as page:
        assert page.console_errors == [] and page.run("return document.title") != "pwned"
        assert page.images and all(img["natural_width"] > 0 for img in page.images)
        captions = _gallery_captions(page)
        assert any(INJECTED in c for gallery in captions.values() for c in gallery)
    # wandb (offline): the cards' pictures with their detections as boxes, labelled by name, in the run's files;
    # the predictions table has an image column (its media travel as a run artifact)
    media = next((with_images / "wandb").glob("offline-run-*")) / "files" / "media"
    assert list((media / "images" / "report").glob("false-negatives_*.png"))
    box_files = sorted((media / "metadata" / "boxes2D" / "report").glob("*.boxes2D.json"))
    assert box_files
    for box_file in box_files:
        boxes = json.loads(box_file.read_text())
        assert boxes["box_data"] and set(boxes["class_labels"].values()) <= {"circle", "square", "triangle",
                                                                             "diamond", "star"}
        assert all(b["box_caption"].split()[0] in ("red", "green", "blue", "yellow", "purple", "white", "orange")
                   for b in boxes["box_data"])
    table = json.loads(next((media / "table").glob("predictions_*.table.json")).read_text())
    assert table["columns"][-1] == "image"
    assert next((media / "html").glob("report_*.html")).stat().st_size > 10_000  # the page, for wandb's HTML panel

    no_images = tmp_path / "no_images"
    assert eval_script.main(["--pairs", str(pairs), "--features", str(VAL_TSV), "--out", str(no_images),
                             "report.why=0"]) == 0
    text = (no_images / "report.html").read_text()
    assert "blank canvas" in text and '<div class="why">' not in text and "<b>why</b>" not in text


def test_report_shorthand_and_keys():
    from lxmert_pl.runs.report import report_enabled

    assert compose("eval", overrides=["report=false"]).report.enabled is False
    assert not report_enabled(compose("eval", overrides=["report=false"]))  # evaluate.py / retrieval.py ask this
    assert compose("eval", overrides=["report=true", "report.cards=0"]).report.cards == 0
    assert compose("eval").report.enabled is True


def test_retrieval_run_writes_a_report(tmp_path):
    captions = json.loads((SAMPLE / "captions_val.json").read_text())[:6]
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(captions))
    out = tmp_path / "retrieval"
    assert eval_script.main(["--task", "retrieval", "--captions", str(path), "--features", str(VAL_TSV), "--images",
                             str(SAMPLE / "images" / "val"), "--out", str(out), "report.retrieval_queries=4"]) == 0
    with open_page(out / "report.html", tmp_path / "retrieval.png") as page:
        assert page.console_errors == []
        assert all(img["natural_width"] > 0 for img in page.images)
        assert page.run("return document.querySelectorAll('#worst-queries .query').length") == 4
        assert page.run("return document.querySelectorAll('#worst-queries .hit').length") == 20


def test_features_show_and_extract_show(tmp_path):
    from lxmert_pl.features.__main__ import main as features_main

    assert features_main(["show", str(VAL_TSV), "--images", str(SAMPLE / "images" / "val"), "--first", "2",
                          "--out", str(tmp_path / "show")]) == 0
    pngs = sorted((tmp_path / "show").glob("*.png"))
    assert [p.stem for p in pngs] == ["sample_val_000000", "sample_val_000001"]
    picture = Image.open(pngs[0])
    assert max(picture.size) == 512 and picture.mode == "RGB"
    assert features_main(["show", str(VAL_TSV), "--ids", "nope", "--out", str(tmp_path / "x")]) == 2

    images = tmp_path / "images"
    images.mkdir()
    for name in ("sample_val_000000.png", "sample_val_000001.png"):
        shutil.copy(SAMPLE / "images" / "val" / name, images)
    out = tmp_path / "demo.tsv"
    assert extract_script.main(["--images", str(images), "--out", str(out), "--detector", "demo-frcnn",
                                "--given-boxes", str(SAMPLE / "boxes.json"), "--show", "1"]) == 0
    assert [p.name for p in (tmp_path / "demo.tsv.show").iterdir()] == ["sample_val_000000.png"]


def test_a_failing_report_keeps_the_results(tmp_path, monkeypatch, capsys):
    import lxmert_pl.runs.evaluate as evaluate

    def broken(*args, **kwargs):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(evaluate, "write_eval_report", broken)
    pairs, _ = _pairs(tmp_path, count=4)
    out = tmp_path / "out"
    assert eval_script.main(["--pairs", str(pairs), "--features", str(VAL_TSV), "--out", str(out)]) == 0
    assert (out / "predictions.json").exists() and (out / "metrics.json").exists()
    assert not (out / "report.html").exists()
    assert "report.html was not written (RuntimeError: drawing failed)" in capsys.readouterr().out
