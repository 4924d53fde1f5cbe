"""The report's pieces on synthetic rows: which rows the galleries show, the cards (pictures, notes, why), the page
(escaping, no galleries with report.cards=0), opened in headless Chromium."""

from __future__ import annotations

import re

import numpy as np
import pytest
from browser import open_page
from PIL import Image

from lxmert_pl.features.record import ImageFeatures
from lxmert_pl.report import ImageLookup, ReportPage, make_cards, render, select_galleries, shown_rows
from lxmert_pl.vocab import Vocabulary

VOCAB = Vocabulary(["circle", "square", "star"], ["red", "blue"], "test")


def _rows():
    # (score, ground): 2 false positives, 2 false negatives, correct ones in between
    spec = [(0.9, "False"), (0.7, "False"), (0.2, "True"), (0.45, "True"), (0.95, "True"), (0.1, "False"),
            (0.8, "True"), (0.3, "False"), (0.52, "True")]
    return [{"question_id": k, "img_id": f"img{k % 3}", "sent": f"a red circle {k}", "score": s,
             "answer": "True" if s > 0.5 else "False", "ground": g} for k, (s, g) in enumerate(spec)]


def _record(img_id: str, n: int = 4) -> ImageFeatures:
    boxes = np.array([[5 + 10 * i, 5, 30 + 10 * i, 40] for i in range(n)], np.float32)
    return ImageFeatures(img_id, 60, 100, np.arange(n, dtype=np.int64) % 3, np.linspace(0.9, 0.3, n).astype(np.float32),
                         np.arange(n, dtype=np.int64) % 2, np.ones(n, np.float32), boxes,
                         np.ones((n, 8), np.float32))


def test_galleries_pick_the_errors_in_order_and_a_seeded_sample():
    rows = _rows()
    galleries = {g.key: g for g in select_galleries(rows, 0.5, cards=3, seed=0)}
    assert list(galleries) == ["false-positives", "false-negatives", "uncertain", "correct"]
    assert galleries["false-positives"].rows == [0, 1] and galleries["false-positives"].total == 2
    assert galleries["false-negatives"].rows == [2, 3]
    assert galleries["uncertain"].rows == [8, 3, 1]  # |0.52-0.5| < |0.45-0.5| < |0.7-0.5|
    assert len(galleries["correct"].rows) == 3 and all(rows[i]["answer"] == rows[i]["ground"]
                                                         for i in galleries["correct"].rows)
    assert select_galleries(rows, 0.5, 3, seed=0)[3].rows == galleries["correct"].rows
    assert select_galleries(rows, 0.5, cards=0) == []
    unlabelled = [{k: v for k, v in r.items() if k != "ground"} for r in rows]
    keys = [(g.key, g.rows) for g in select_galleries(unlabelled, 0.5, cards=2)]
    assert keys == [("highest", [4, 0]), ("lowest", [5, 2]), ("uncertain", [8, 3])]
    assert shown_rows(select_galleries(rows, 0.5, 3)) == list(dict.fromkeys([0, 1, 2, 3, 8, 3, 1,
                                                                               *galleries["correct"].rows]))


def test_cards_draw_pictures_and_say_what_is_missing(tmp_path):
    Image.new("RGB", (100, 60), (200, 200, 200)).save(tmp_path / "img0.png")
    (tmp_path / "img1.jpg").write_bytes(b"not a jpeg")  # img2: no file at all
    rows = _rows()[:3]
    seen = []

    def explain(sentences, records):
        seen.append(sentences)
        return [np.array([0.1, 0.6, 0.2, 0.1])[: len(r.boxes)] for r in records]

    cards = make_cards(rows, [0, 1, 2], lambda i: _record(i), VOCAB, ImageLookup(tmp_path), explain, boxes=2, why=1)
    assert seen == [[r["sent"] for r in rows]]  # one explain pass for all the cards
    assert all(c.picture_uri.startswith("data:image/jpeg;base64,") for c in cards.values())
    assert cards[0].note is None and cards[0].detections.image.size == (100, 60)
    assert "unreadable" in cards[1].note and "not found" in cards[2].note
    assert cards[2].detections.image.size == (100, 60)  # a canvas of the recorded size
    assert cards[0].why == [("blue square", pytest.approx(0.6))]  # box 1: objects_id 1, attrs_id 1
    assert cards[0].detections.labels[0] == "red circle 0.90"
    no_features = make_cards(rows, [0], lambda i: (_ for _ in ()).throw(KeyError(i)), VOCAB)
    assert no_features[0].picture_uri is None and "no features" in no_features[0].note


def test_page_escapes_captions_and_opens_cleanly(tmp_path):
    rows = _rows()
    rows[0]["sent"] = '<script>console.error("injected")</script> & "quotes"'
    rows[1]["img_id"] = "<img src=x onerror=alert(1)>"
    galleries = select_galleries(rows, 0.5, cards=4)
    cards = make_cards(rows, shown_rows(galleries), lambda i: _record("x"), VOCAB)
    page = ReportPage("t <b>", [("command", "eval.py --pairs '<x>'")], {"accuracy": 0.5, "num_pairs": 9.0},
                      galleries=galleries, cards=cards, threshold=0.5)
    text = render(page)
    assert "<script>" not in text and "&lt;script&gt;console.error" in text
    assert "<img src=x" not in text and "onerror=alert(1)&gt;" in text
    assert not re.search(r"<(script|link)\b|https?://", text)  # nothing from elsewhere
    path = tmp_path / "report.html"
    path.write_text(text, encoding="utf-8")
    with open_page(path, tmp_path / "shot.png") as view:
        assert view.console_errors == []
        assert view.images and all(img["natural_width"] > 0 for img in view.images)
        captions = view.run("return Array.from(document.querySelectorAll('#false-positives .cap'))"
                            ".map(e => e.textContent)")
        assert '<script>console.error("injected")</script> & "quotes"' in captions[0]
        assert view.run("return document.scripts.length") == 0
    empty = render(ReportPage("t", [], {"accuracy": 0.5}, galleries=select_galleries(rows, 0.5, cards=0)))
    assert 'class="panel gallery"' not in empty and "Metrics" in empty
