"""The demo page (`python -m lxmert_pl.demo`, lxmert_pl/demo/): its input checks, its answers through gradio_client
against `Matcher.score`, the detector cache across queries, the page itself in headless Chromium, and the command.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from lxmert_pl.demo.engine import DemoEngine, parse_sentences
from lxmert_pl.demo.samples import SAMPLE_DIR, SampleBoxes, load_examples
from lxmert_pl.errors import UserInputError

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
VAL_IMAGE = SAMPLE_DIR / "images" / "val" / "sample_val_000000.png"


def size_of(path) -> tuple[int, int]:
    with Image.open(path) as picture:
        return picture.size


# ------------------------------------------------------------------------------------------- input checks


def test_sentences_one_a_line_blank_lines_dropped_none_refused():
    assert parse_sentences("a red circle\n\n  a blue star  \n") == ["a red circle", "a blue star"]
    with pytest.raises(UserInputError, match="at least one sentence"):
        parse_sentences(" \n\n")
    with pytest.raises(UserInputError, match="at most 3"):
        parse_sentences("a\nb\nc\nd", limit=3)


def test_open_image_refuses_a_non_image_and_a_too_large_image_naming_the_limit(tmp_path):
    engine = DemoEngine(matcher=None, samples=None, max_pixels=10_000)
    text = tmp_path / "notes.txt"
    text.write_text("not a picture")
    with pytest.raises(UserInputError, match="notes.txt is not an image"):
        engine.open_image(str(text))
    big = tmp_path / "big.png"
    Image.new("RGB", (200, 100)).save(big)
    with pytest.raises(UserInputError, match=r"200 x 100 = 0.02 megapixels; the limit is 0.01 megapixels"):
        engine.open_image(str(big), "big.png")
    with pytest.raises(UserInputError, match="drop an image first"):
        engine.open_image(None)


def test_a_sample_scene_is_recognised_by_its_pixels_under_any_name(tmp_path):
    samples = SampleBoxes()
    renamed = tmp_path / "upload.png"
    shutil.copy(VAL_IMAGE, renamed)
    engine = DemoEngine(matcher=None, samples=samples)
    query = engine.open_image(str(renamed))
    assert query.sample_id == "sample_val_000000"
    assert query.given_boxes == samples.boxes("sample_val_000000")
    with Image.open(VAL_IMAGE) as picture:
        changed = np.asarray(picture.convert("RGB")).copy()
    changed[0, 0] ^= 1  # one pixel differs: not the sample scene any more
    Image.fromarray(changed).save(tmp_path / "changed.png")
    assert engine.open_image(str(tmp_path / "changed.png")).given_boxes is None


def test_examples_hold_the_true_caption_first_and_two_false_sentences():
    examples = load_examples()
    assert len(examples) >= 3
    for example in examples:
        assert example.path.is_file() and len(example.sentences) == 3
        assert len(set(example.sentences)) == 3


# ------------------------------------------------------------------------------------------- the served page

gradio_client = pytest.importorskip("gradio_client", reason="the demo extra (pip install -e '.[test]') is missing")
SMALL_LIMIT = 1_000_000  # pixels: the served test page refuses larger images (the sample scenes are ~0.03 MP)


@pytest.fixture(scope="module")
def served(one_torch_thread):
    """The page on the bundled demo weights, served in this process on a free local port."""
    from lxmert_pl import Matcher
    from lxmert_pl.demo.app import launch_app, load_demo

    matcher = Matcher.from_pretrained("demo-lxrt", detector="demo-frcnn", device="cpu")
    run = matcher.detector.extract
    matcher.detector.runs = 0  # counted here, on the detector itself: whichever Matcher object the page asks

    def counted(*args, **kwargs):
        matcher.detector.runs += 1
        return run(*args, **kwargs)

    matcher.detector.extract = counted
    app, summary = load_demo("demo-lxrt", "demo-frcnn", matcher=matcher, max_pixels=SMALL_LIMIT)
    url = launch_app(app, port=0)
    assert url.startswith("http://127.0.0.1:")
    yield matcher, url, summary
    app.close()


@pytest.fixture(scope="module")
def client(served):
    return gradio_client.Client(served[1], verbose=False)


def test_the_page_ranks_with_matcher_scores_and_reuses_the_detections(served, client, tmp_path):
    matcher, _, _ = served
    example = load_examples()[0]
    upload = tmp_path / "my photo.png"  # another name: the page finds the scene's boxes by its pixels
    shutil.copy(example.path, upload)
    before = matcher.detector.runs
    table, drawn, chosen, note = client.predict(gradio_client.handle_file(str(upload)), example.text, "itm",
                                          api_name="/match")
    sentences, scores = [row[1] for row in table["data"]], [row[2] for row in table["data"]]
    assert sentences[0] == example.sentences[0], table  # the true caption ranks first
    assert sorted(sentences) == sorted(example.sentences) and scores == sorted(scores, reverse=True)
    boxes = SampleBoxes().boxes(example.img_id)
    expected = matcher.score(str(example.path), sentences, given_boxes=[boxes])
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)
    assert matcher.detector.runs == before + 1  # one detection for the upload; Matcher.score above: cached
    assert chosen["value"] == sentences[0]
    assert "sample_val_000000: a bundled sample scene" in note
    assert size_of(drawn)[0] >= 2 * size_of(upload)[0]  # drawn larger, for legible labels

    table, _, _, _ = client.predict(gradio_client.handle_file(str(upload)), "a red circle\na small green triangle\n"
                                 "an orange diamond", "cosine", api_name="/match")
    assert matcher.detector.runs == before + 1  # same image, new sentences: no detector
    cosine = [row[2] for row in table["data"]]
    assert all(-1.0 <= c <= 1.0 for c in cosine) and cosine == sorted(cosine, reverse=True)
    why = client.predict("a red circle", api_name="/why")  # the image of the last Match (this client's session)
    assert size_of(why) == size_of(drawn)
    assert matcher.detector.runs == before + 1


def test_the_page_says_what_is_wrong_instead_of_a_traceback(served, client, tmp_path):
    from gradio_client.exceptions import AppError

    notes = tmp_path / "notes.png"
    notes.write_text("these are my notes")
    big = tmp_path / "big.png"
    Image.new("RGB", (1200, 1000), (40, 40, 40)).save(big)
    sample = str(load_examples()[0].path)
    cases = [(str(notes), "a red circle", "notes.png is not an image"),
             (sample, "  \n ", "type at least one sentence"),
             (str(big), "a red circle", "1200 x 1000 = 1.2 megapixels; the limit is 1 megapixels")]
    for path, text, message in cases:
        with pytest.raises(AppError, match=message):
            client.predict(gradio_client.handle_file(path), text, "itm", api_name="/match")


def test_the_page_in_a_browser_runs_an_example(served, tmp_path):
    from browser import open_page

    _, url, _ = served
    example = load_examples()[0]
    with open_page(url, None, wait_for="#examples tr.tr-body") as page:
        assert "Bundled demo weights" in page.run("return document.body.innerText")
        page.click("#examples tr.tr-body")  # the first sample scene fills the image and the sentences ...
        page.wait_for("#image img")
        page.click("#match")  # ... and the page's own button runs it
        page.wait_for("#results [role=grid]", text=example.sentences[0], timeout=60)
        page.wait_for("#drawn img", timeout=30)
        rows = page.run("return Array.from(document.querySelectorAll('#results [role=row]'))"
                        ".filter(r => r.querySelector('[role=gridcell]')).map(r => r.innerText)")
        assert len(rows) == 3 and example.sentences[0] in rows[0], rows  # the true caption on top
        drawn = page.run("const i = document.querySelector('#drawn img'); return [i.complete, i.naturalWidth]")
        assert drawn[0] and drawn[1] > 300
        page.run("window.scrollTo(0, 0)")
        shot = page.take_screenshot(tmp_path / "demo_page.png")
        assert page.new_console_errors() == [] and page.console_errors == []
    assert shot.stat().st_size > 10_000


# ------------------------------------------------------------------------------------------- the command


def test_the_command_serves_the_demo_on_this_machine_only_and_says_where(capsys):
    import subprocess
    import sys
    import urllib.request

    from lxmert_pl.demo.__main__ import parse_args, serve

    app = serve(parse_args(["--port", "0"]))  # what `python -m lxmert_pl.demo` does before it waits for Ctrl-C
    try:
        out = capsys.readouterr().out
        url = out.split("Demo page: ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:") and app.share_url is None, out
        assert "BUNDLED DEMO" in out  # which weights: the Matcher's report
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.status == 200
        port = url.rstrip("/").rsplit(":", 1)[1]
        with pytest.raises(UserInputError, match=f"cannot serve on 127.0.0.1:{port}: the port is taken"):
            serve(parse_args(["--port", port]))
    finally:
        app.close()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    bad = subprocess.run([sys.executable, "-m", "lxmert_pl.demo", "--port", "70000"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "python -m lxmert_pl.demo: error: --port 70000: expected 0..65535"]
