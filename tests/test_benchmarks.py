"""lxmert_pl.benchmarks: the Winoground, VALSE and caption-vs-negative formats and metrics, checked against hand
computations (ties included), without a model."""

from __future__ import annotations

import json
import zipfile

import pytest

from conftest import REPO_ROOT, load_script
from lxmert_pl.benchmarks import BenchmarkFileError, PairKey, image_key, load_benchmark
from lxmert_pl.benchmarks import hub as bench_hub
from lxmert_pl.benchmarks.common import split_available
from lxmert_pl.benchmarks.negatives import evaluate_negatives, load_negatives
from lxmert_pl.benchmarks.valse import load_valse
from lxmert_pl.benchmarks.winoground import evaluate_winoground, load_winoground
from lxmert_pl.hub import placement_hint


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _wino_row(i, tag="Noun", secondary="", preds=1, collapsed="Object"):
    return {"id": i, "caption_0": f"cap {i} zero", "caption_1": f"zero cap {i}", "image_0": f"ex_{i}_img_0",
            "image_1": f"ex_{i}_img_1", "tag": tag, "secondary_tag": secondary, "num_main_preds": preds,
            "collapsed_tag": collapsed}


def _score_from(table):
    """table: {example id: (c0_i0, c1_i0, c0_i1, c1_i1)} -> score(img_id, sent)."""
    scores = {}
    for i, (c0_i0, c1_i0, c0_i1, c1_i1) in table.items():
        scores.update({(f"ex_{i}_img_0", f"cap {i} zero"): c0_i0, (f"ex_{i}_img_0", f"zero cap {i}"): c1_i0,
                       (f"ex_{i}_img_1", f"cap {i} zero"): c0_i1, (f"ex_{i}_img_1", f"zero cap {i}"): c1_i1})
    return lambda img, sent: scores[(img, sent)]


def test_winoground_scores_by_hand_with_ties_and_tag_tables(tmp_path):
    path = _jsonl(tmp_path / "examples.jsonl", [
        _wino_row(0, "Noun", "Symbolic", 1, "Object"),
        _wino_row(1, "Verb", "", 2, "Relation"),
        _wino_row(2, "Noun", "Pragmatics, Symbolic", 1, "Object"),
        _wino_row(3, "Verb", "", 1, "Both"),
        _wino_row(4, "Noun", "", 2, "Object"),
    ])
    examples = load_winoground(path)
    assert [e.image_0 for e in examples][:2] == ["ex_0_img_0", "ex_1_img_0"]
    # (c0_i0, c1_i0, c0_i1, c1_i1)
    score = _score_from({
        0: (0.9, 0.1, 0.2, 0.8),  # text: .9>.1 and .8>.2; image: .9>.2 and .8>.1 -> all three
        1: (0.5, 0.1, 0.6, 0.9),  # text: .5>.1 and .9>.6 yes; image: .5>.6 no -> text only
        2: (0.5, 0.5, 0.1, 0.9),  # text: tie .5 = .5 -> wrong; image: .5>.1 and .9>.5 -> image only
        3: (0.2, 0.9, 0.1, 0.3),  # text: .2>.9 no; image: .2>.1 and .3>.9 no -> none
        4: (0.7, 0.6, 0.7, 0.8),  # text: .7>.6 and .8>.7 yes; image: .7>.7 tie -> wrong -> text only
    })
    result = evaluate_winoground(examples, score)
    m = result.metrics
    assert m["text_score"] == pytest.approx(3 / 5) and m["image_score"] == pytest.approx(2 / 5)
    assert m["group_score"] == pytest.approx(1 / 5)
    assert m["num_examples"] == 5 and m["num_examples_with_ties"] == 2
    tables = {t.key: {row[t.key]: row for row in t.rows} for t in result.tables}
    assert set(tables) == {"collapsed_tag", "tag", "secondary_tag", "num_main_preds"}
    obj = tables["collapsed_tag"]["Object"]  # examples 0, 2, 4
    assert (obj["num"], obj["text"], obj["image"], obj["group"]) == (3, pytest.approx(2 / 3), pytest.approx(2 / 3),
                                                                      pytest.approx(1 / 3))
    assert tables["collapsed_tag"]["Both"]["text"] == 0.0
    assert tables["tag"]["Verb"]["num"] == 2 and tables["tag"]["Verb"]["text"] == 0.5
    # "Pragmatics, Symbolic" counts under both; examples without a secondary tag are in no row
    assert {k: v["num"] for k, v in tables["secondary_tag"].items()} == {"Pragmatics": 1, "Symbolic": 2}
    assert tables["secondary_tag"]["Symbolic"]["image"] == 1.0 and tables["secondary_tag"]["Symbolic"]["text"] == 0.5
    assert tables["num_main_preds"]["2"]["num"] == 2 and tables["num_main_preds"]["2"]["text"] == 1.0
    assert "| Object | 3 | 0.6667 | 0.6667 | 0.3333 |" in result.markdown()
    assert [i["group"] for i in result.items] == [True, False, False, False, False]


def test_winoground_malformed_lines_name_file_line_and_example(tmp_path):
    bad = _wino_row(1)
    del bad["caption_1"]
    path = _jsonl(tmp_path / "examples.jsonl", [_wino_row(0), bad])
    with pytest.raises(BenchmarkFileError, match=r"examples.jsonl:2: missing field 'caption_1' \(example 1\)"):
        load_winoground(path)
    _jsonl(path, [_wino_row(0), _wino_row(1), _wino_row(0)])
    with pytest.raises(BenchmarkFileError, match=r"examples.jsonl:3 \(example 0\): duplicate id '0' \(first on line 1"):
        load_winoground(path)
    _jsonl(path, [{**_wino_row(0), "caption_0": "  "}])
    with pytest.raises(BenchmarkFileError, match="caption_0' must be a non-empty string"):
        load_winoground(path)
    path.write_text(json.dumps(_wino_row(0)) + "\n{not json\n")
    with pytest.raises(BenchmarkFileError, match=r"examples.jsonl:2: invalid JSON"):
        load_winoground(path)


def _valse_piece(path, items):
    path.write_text(json.dumps(items))
    return path


def test_valse_metrics_by_hand_per_piece_and_unweighted_average(tmp_path):
    folder = tmp_path / "valse"
    folder.mkdir()
    votes = {"caption": 3, "foil": 0, "other": 0}
    _valse_piece(folder / "existence.json", {
        "e0": {"image_file": "a.jpg", "caption": "c0", "foil": "f0", "mturk": votes, "dataset": "visual7w"},
        "e1": {"image_file": "b.jpg", "caption": ["c1", "unused second caption"], "foil": "f1", "mturk": votes},
        "e2": {"image_file": "c.jpg", "caption": "c2", "foil": "f2", "mturk": {"caption": 1}},  # not validated
    })
    _valse_piece(folder / "plurals.json", {
        "p0": {"image_file": "d.png", "caption": "c3", "foil": ["f3a", "f3b"], "mturk": votes},
    })
    bench = load_benchmark("valse", folder)
    assert bench.num_not_valid == 1 and [i.id for i in bench.items] == ["e0", "e1", "p0"]
    assert bench.items[0].img_id == "a" and bench.items[1].caption == "c1"
    assert bench.pairs()[:2] == [PairKey("a", "c0"), PairKey("a", "f0")]
    scores = {("a", "c0"): 0.9, ("a", "f0"): 0.5,  # ranked; caption fits; foil at the threshold: detected
              ("b", "c1"): 0.5, ("b", "f1"): 0.5,  # tie: not ranked; caption at the threshold does not fit
              ("d", "c3"): 0.6, ("d", "f3a"): 0.7, ("d", "f3b"): 0.2}
    result = bench.evaluate(lambda img, sent: scores[(img, sent)], 0.5)
    rows = {row["piece"]: row for row in result.tables[0].rows}
    ex = rows["existence"]
    assert (ex["num"], ex["acc_r"], ex["p_c"], ex["p_f"], ex["acc"], ex["min_pc_pf"]) == (2, 0.5, 0.5, 1.0, 0.75, 0.5)
    pl = rows["plurals"]  # one caption, two foils: .6 > .7 no, .6 > .2 yes; foils .7 fits, .2 detected
    assert (pl["acc_r"], pl["p_c"], pl["p_f"], pl["acc"], pl["min_pc_pf"]) == (0.5, 1.0, 0.5, pytest.approx(2 / 3), 0.5)
    m = result.metrics  # the unweighted mean over the two pieces
    assert m["acc_r"] == 0.5 and m["p_c"] == 0.75 and m["p_f"] == 0.75 and m["acc"] == pytest.approx((0.75 + 2 / 3) / 2)
    assert m["num_items"] == 3 and m["num_pieces"] == 2
    assert rows["avg (unweighted over pieces)"]["p_c"] == 0.75
    assert result.items[0]["dataset"] == "visual7w"
    # every item, validated or not
    items, not_valid = load_valse(folder, valid_only=False)
    assert len(items) == 4 and not_valid == 0


def test_valse_malformed(tmp_path):
    piece = tmp_path / "counting.json"
    piece.write_text('{"x": {"image_file": "a.jpg", "caption": "c", "foil": "f", "mturk": {"caption": 3}},\n'
                     ' "x": {"image_file": "b.jpg", "caption": "c", "foil": "f", "mturk": {"caption": 3}}}')
    with pytest.raises(BenchmarkFileError, match=r"counting.json: item id 'x' appears twice"):
        load_valse(piece)
    _valse_piece(piece, {"x": {"image_file": "a.jpg", "caption": "c", "mturk": {"caption": 3}}})
    with pytest.raises(BenchmarkFileError, match=r"counting.json \(item x\): missing field 'foil'"):
        load_valse(piece)
    _valse_piece(piece, {"x": {"image_file": "a.jpg", "caption": "c", "foil": "f"}})
    with pytest.raises(BenchmarkFileError, match=r"\(item x\): missing field 'mturk'.*valid_only=false"):
        load_valse(piece)
    assert load_valse(piece, valid_only=False)[0][0].foils == ("f",)


def test_negatives_json_jsonl_categories_and_ties(tmp_path):
    folder = tmp_path / "sugar"
    folder.mkdir()
    (folder / "swap_att.json").write_text(json.dumps({
        "0": {"filename": "000000544519.jpg", "caption": "a green shirt", "negative_caption": "a blue shirt"},
        "1": {"filename": "000000544519.jpg", "caption": "two towels", "negative_caption": "towels two"},
    }))
    _jsonl(folder / "mine.jsonl", [
        {"filename": "x.png", "caption": "p", "negative_caption": "n"},
        {"filename": "y.png", "caption": "p", "negative_caption": "n"},
        {"filename": "z.png", "caption": "p", "negative_caption": "n"},
    ])
    items = load_negatives(folder)
    assert [(i.category, i.id, i.img_id) for i in items] == [
        ("mine", "1", "x"), ("mine", "2", "y"), ("mine", "3", "z"),
        ("swap_att", "0", "000000544519"), ("swap_att", "1", "000000544519")]
    scores = {("x", "p"): 0.8, ("x", "n"): 0.2, ("y", "p"): 0.4, ("y", "n"): 0.4, ("z", "p"): 0.1, ("z", "n"): 0.3,
              ("000000544519", "a green shirt"): 0.7, ("000000544519", "a blue shirt"): 0.6,
              ("000000544519", "two towels"): 0.5, ("000000544519", "towels two"): 0.4}
    result = evaluate_negatives(items, lambda img, sent: scores[(img, sent)])
    assert result.metrics["accuracy"] == pytest.approx(3 / 5)
    assert result.metrics["mean_category_accuracy"] == pytest.approx((1 / 3 + 1) / 2)
    assert result.metrics["num_ties"] == 1
    assert {r["category"]: r["accuracy"] for r in result.tables[0].rows} == {"mine": pytest.approx(1 / 3),
                                                                            "swap_att": 1.0}
    # a JSON Lines file under a .json suffix is read as JSON Lines
    (folder / "mine.jsonl").rename(folder / "mine2.json")
    assert len(load_negatives(folder / "mine2.json")) == 3
    _jsonl(folder / "one.json", [{"filename": "x.png", "caption": "p", "negative_caption": "n"}])
    assert [(i.id, i.img_id) for i in load_negatives(folder / "one.json")] == [("1", "x")]


def test_negatives_malformed(tmp_path):
    path = _jsonl(tmp_path / "neg.jsonl", [{"id": "a", "filename": "x.png", "caption": "p", "negative_caption": "n"},
                                           {"id": "a", "filename": "y.png", "caption": "p", "negative_caption": "n"}])
    with pytest.raises(BenchmarkFileError, match=r"neg.jsonl:2 \(item a\): duplicate id 'a' \(first at .*neg.jsonl:1"):
        load_negatives(path)
    _jsonl(path, [{"filename": "x.png", "caption": "p"}])
    with pytest.raises(BenchmarkFileError, match=r"neg.jsonl:1 \(item 1\): missing field 'negative_caption'"):
        load_negatives(path)
    with pytest.raises(FileNotFoundError, match="benchmark data not found"):
        load_negatives(tmp_path / "nothing.json")


def test_image_names_and_missing_images():
    assert image_key("ex_0_img_0") == "ex_0_img_0"
    assert image_key("000000544519.jpg") == "000000544519" and image_key("sub/dir/a.PNG") == "a"
    assert image_key("frame.v2") == "frame.v2"  # not an image extension: the whole name
    items = load_benchmark("winoground", REPO_ROOT / "data" / "sample" / "winoground_demo.jsonl").items[:3]
    present = {items[0].image_0, items[0].image_1, items[2].image_0, items[2].image_1}
    with pytest.raises(BenchmarkFileError, match=r"winoground example 1: image 'sample_test_000020' not found in "
                                                 r"SOURCE; pass data.skip_missing=true"):
        split_available(items, lambda i: i.images, present.__contains__, lambda i: i.describe(), "SOURCE", False)
    kept, skipped = split_available(items, lambda i: i.images, present.__contains__, lambda i: i.describe(), "S", True)
    assert [i.id for i in kept] == ["0", "2"] and [i.id for i in skipped] == ["1"]


def test_pairs_are_distinct_and_grouped_by_item(tmp_path):
    path = _jsonl(tmp_path / "examples.jsonl", [
        {**_wino_row(0), "image_1": "shared"}, {**_wino_row(1), "image_0": "shared", "caption_0": "cap 0 zero"}])
    bench = load_benchmark("winoground", path)
    pairs = bench.pairs()
    assert len(pairs) == len(set(pairs)) == 7  # ("shared", "cap 0 zero") is needed twice, scored once
    assert pairs[:4] == [PairKey("ex_0_img_0", "cap 0 zero"), PairKey("ex_0_img_0", "zero cap 0"),
                         PairKey("shared", "cap 0 zero"), PairKey("shared", "zero cap 0")]


def test_bundled_demo_is_what_the_script_makes():
    script = load_script(REPO_ROOT / "scripts" / "make_benchmark_demo.py")
    scenes = json.loads((REPO_ROOT / "data" / "sample" / "scenes.json").read_text())
    examples = script.demo_examples(scenes)
    bundled = [json.loads(line) for line in (REPO_ROOT / "data" / "sample" / "winoground_demo.jsonl").open()]
    assert examples == bundled and len(bundled) == 32
    for ex in bundled:  # the same words in another order, and image_1 holds the swapped objects
        assert sorted(ex["caption_0"].split()) == sorted(ex["caption_1"].split()) and ex["caption_0"] != ex["caption_1"]
        objects = lambda img: {(o["color"], o["shape"]) for o in scenes[img]["objects"]}  # noqa: E731
        (c0, s0), (c1, s1) = [(o["color"], o["shape"]) for o in scenes[ex["image_0"]]["objects"]]
        assert objects(ex["image_1"]) == {(c1, s0), (c0, s1)}
        assert scenes[ex["image_0"]]["split"] in ("val", "test")


def test_winoground_from_the_hub_is_fetched_and_unpacked_once(tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "snapshots" / ("c" * 40)
    (snapshot / "data").mkdir(parents=True)
    _jsonl(snapshot / "data" / "examples.jsonl", [_wino_row(0)])
    with zipfile.ZipFile(snapshot / "data" / "images.zip", "w") as zf:
        zf.writestr("images/ex_0_img_0.png", b"png")
        zf.writestr("images/ex_0_img_1.png", b"png")
    asked = []

    def fake_fetch(ref, **_):
        asked.append(ref)
        return snapshot, snapshot.name

    monkeypatch.setattr(bench_hub, "fetch_hub_files", fake_fetch)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bench = load_benchmark("winoground", "hf://datasets/facebook/winoground@v1")
    ref = asked[0]
    assert (ref.repo_id, ref.revision, ref.repo_type, ref.files) == ("facebook/winoground", "v1", "dataset",
                                                                     ("data/examples.jsonl", "data/images.zip"))
    assert ref.uri() == "hf://datasets/facebook/winoground@v1"
    assert "hf download facebook/winoground data/examples.jsonl data/images.zip --repo-type dataset --revision v1" in \
        placement_hint(ref, ref.files)
    assert bench.image_folder == tmp_path / "cache" / "lxmert_pl" / "winoground" / ("c" * 40) / "images"
    assert sorted(p.name for p in bench.image_folder.iterdir()) == ["ex_0_img_0.png", "ex_0_img_1.png"]
    assert [e.id for e in bench.items] == ["0"]
    (snapshot / "data" / "images.zip").unlink()  # unpacked already: the archive is not opened again
    assert load_benchmark("winoground", "hf://datasets/facebook/winoground@v1").image_folder == bench.image_folder
    with pytest.raises(BenchmarkFileError, match="only winoground is read from the Hub"):
        load_benchmark("valse", "hf://datasets/org/valse")
