"""eval.py --task benchmark end to end on small files in each format (made here from the bundled sample's val scenes
and features) with the bundled demo matcher: every pair scored once, metrics equal to the pure functions applied to
the predictions, the scores equal the scoring API's, DDP on 2 processes equals one, missing images."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
from conftest import REPO_ROOT, load_script
from e2e_helpers import run_script

from lxmert_pl.benchmarks import load_benchmark

SAMPLE = REPO_ROOT / "data" / "sample"
FEATURES = SAMPLE / "features" / "val_obj.tsv"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A Winoground file, two VALSE pieces and a SugarCrepe-style file over the first val scenes."""
    tmp = tmp_path_factory.mktemp("bench")
    captions = {e["img_id"]: e["sentf"]["mscoco"] for e in json.loads((SAMPLE / "captions_val.json").read_text())}
    ids = sorted(captions)[:12]
    wino = [{"id": k, "caption_0": captions[ids[2 * k]][0], "caption_1": captions[ids[2 * k + 1]][0],
             "image_0": ids[2 * k], "image_1": ids[2 * k + 1], "tag": "Noun" if k % 2 else "Verb",
             "secondary_tag": "Symbolic" if k < 2 else "", "num_main_preds": 1 + k % 2,
             "collapsed_tag": "Object" if k < 4 else "Both"} for k in range(6)]
    (tmp / "examples.jsonl").write_text("".join(json.dumps(row) + "\n" for row in wino))
    valse = tmp / "valse"
    valse.mkdir()
    for piece, chosen in (("existence", ids[:4]), ("plurals", ids[4:7])):
        items = {f"{piece}_{i}": {"image_file": f"{img}.png", "caption": captions[img][0],
                                  "foil": [captions[ids[(ids.index(img) + 5) % 12]][0]], "mturk": {"caption": 3},
                                  "linguistic_phenomena": piece} for i, img in enumerate(chosen)}
        (valse / f"{piece}.json").write_text(json.dumps(items))
    negatives = {str(i): {"filename": f"{img}.png", "caption": captions[img][1],
                          "negative_caption": captions[ids[(i + 3) % 12]][1]} for i, img in enumerate(ids[:8])}
    (tmp / "swap_att.json").write_text(json.dumps(negatives))
    return {"winoground": tmp / "examples.jsonl", "valse": valse, "negatives": tmp / "swap_att.json", "tmp": tmp}


def _args(name, data, out, *extra):
    return ["--task", "benchmark", "--benchmark", name, "--data", data, "--features", FEATURES, "--out", out,
            "--accelerator", "cpu", "data.batch_size=5", *extra]


@pytest.fixture(scope="module")
def eval_main():
    return load_script(REPO_ROOT / "eval.py", "eval_benchmark_script").main


@pytest.fixture(scope="module")
def wino_run(files, eval_main):
    """One process, in this one (the DDP test runs eval.py as a user does)."""
    out = files["tmp"] / "wino_one"
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert eval_main([str(a) for a in _args("winoground", files["winoground"], out)]) == 0
    return out, stdout.getvalue()


def _score_lookup(out):
    return {(p["img_id"], p["sent"]): p["score"] for p in json.loads((out / "predictions.json").read_text())}


def test_winoground_run_scores_each_pair_once_and_metrics_follow_from_them(files, wino_run):
    out, stdout = wino_run
    bench = load_benchmark("winoground", files["winoground"])
    preds = json.loads((out / "predictions.json").read_text())
    assert [(p["img_id"], p["sent"]) for p in preds] == [(k.img_id, k.sent) for k in bench.pairs()]
    assert len(preds) == 24
    # the scores are the scoring API's (the same demo model on the same features)
    from lxmert_pl.features import TsvReader
    from lxmert_pl.model.loading import load_lxmert
    from lxmert_pl.registry import resolve_checkpoint
    from lxmert_pl.scoring import Scorer

    model, _ = load_lxmert(resolve_checkpoint("demo-lxrt").path)
    reader = TsvReader(FEATURES)
    rows = [reader.get(p["img_id"]) for p in preds]
    expected = Scorer(model.eval()).score([p["sent"] for p in preds], [r.features for r in rows],
                                          [r.normalized_boxes() for r in rows]).scores("itm")
    np.testing.assert_allclose([p["score"] for p in preds], expected, atol=1e-5)

    scores = _score_lookup(out)
    result = bench.evaluate(lambda img, sent: scores[(img, sent)], 0.5)
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["metrics"] == result.metrics and summary["num_items"] == 6 and summary["num_pairs"] == 24
    assert summary["tables"] == [t.to_dict() for t in result.tables]
    assert [t["key"] for t in summary["tables"]] == ["collapsed_tag", "tag", "secondary_tag", "num_main_preds"]
    assert (out / "tables.md").read_text().count("### by ") == 4
    assert len(json.loads((out / "items.json").read_text())) == 6
    assert "text_score" in stdout and "a tie counts as wrong" in stdout and "bundled demo" in stdout


@pytest.mark.slow
def test_ddp_two_processes_equal_one(files, wino_run):
    out_one, _ = wino_run
    out_two = files["tmp"] / "wino_two"
    proc = run_script("eval.py", *_args("winoground", files["winoground"], out_two, "--devices", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (json.loads((o / "predictions.json").read_text()) for o in (out_one, out_two))
    assert [(p["img_id"], p["sent"]) for p in two] == [(p["img_id"], p["sent"]) for p in one]
    np.testing.assert_allclose([p["score"] for p in two], [p["score"] for p in one], atol=1e-5)  # other batches
    m1, m2 = (json.loads((o / "metrics.json").read_text()) for o in (out_one, out_two))
    assert m1["metrics"] == m2["metrics"] and m1["tables"] == m2["tables"]


def test_valse_and_negatives_runs(files, eval_main, capsys):
    for name, metric in (("valse", "acc_r"), ("negatives", "accuracy")):
        out = files["tmp"] / f"{name}_run"
        assert eval_main([str(a) for a in _args(name, files[name], out, "--mode", "cosine")]) == 0
        bench = load_benchmark(name, files[name])
        scores = _score_lookup(out)
        assert len(scores) == len(bench.pairs())
        summary = json.loads((out / "metrics.json").read_text())
        assert summary["mode"] == "cosine" and summary["threshold"] == 0.0
        assert summary["metrics"] == bench.evaluate(lambda img, sent: scores[(img, sent)], 0.0).metrics
        assert metric in capsys.readouterr().out
    assert [r["piece"] for r in summary_valse_rows(files)] == ["existence", "plurals", "avg (unweighted over pieces)"]


def summary_valse_rows(files):
    return json.loads((files["tmp"] / "valse_run" / "metrics.json").read_text())["tables"][0]["rows"]


def test_missing_image_is_one_error_naming_the_item_or_a_counted_skip(files, eval_main, capsys):
    path = files["tmp"] / "missing.jsonl"
    rows = [json.loads(line) for line in files["winoground"].read_text().splitlines()[:2]]
    rows[1]["image_1"] = "no_such_image"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = files["tmp"] / "missing_run"
    with pytest.raises(SystemExit) as exc:
        eval_main([str(a) for a in _args("winoground", path, out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "winoground example 1: image 'no_such_image' not found in" in err[0]
    assert "skip_missing=true" in err[0]
    assert eval_main([str(a) for a in _args("winoground", path, out, "data.skip_missing=true")]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["num_items"] == 1 and summary["num_skipped_missing"] == 1 and summary["num_items_total"] == 2
    assert "Skipped 1 items whose images the feature source lacks" in capsys.readouterr().out
