"""`lxmert_pl.Matcher` and `python -m lxmert_pl.match` on the bundled demo (demo-lxrt + demo-frcnn at the sample's
given boxes): eval.py's one-step scores, inputs of every kind, the detections cache, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from e2e_helpers import REPO_ROOT, run_in_process, save_tiny_snapshot, save_vqa_snapshot
from lxmert_pl.errors import CheckpointError, UserInputError
from lxmert_pl.detector.image_input import to_bgr
from lxmert_pl.detector.preprocess import ImageReadError

VAL_IMAGES = REPO_ROOT / "data" / "sample" / "images" / "val"
BOXES = REPO_ROOT / "data" / "sample" / "boxes.json"
VAL_PAIRS = REPO_ROOT / "data" / "sample" / "val_pairs.json"
VAL_TSV = REPO_ROOT / "data" / "sample" / "features" / "val_obj.tsv"
NUM_EVAL_PAIRS = 40  # the first val pairs (20 images): enough for parity, quick to extract twice

pytestmark = pytest.mark.skipif(not (REPO_ROOT / "checkpoints" / "demo" / "lxrt_demo.ckpt").exists(),
                                reason="bundled demo weights absent (checkpoints/demo/)")


@pytest.fixture(scope="module")
def matcher():
    from lxmert_pl import Matcher

    return Matcher.from_pretrained("demo-lxrt", detector="demo-frcnn", device="cpu")


def image_path(index: int) -> Path:
    return VAL_IMAGES / f"sample_val_{index:06d}.png"


def fresh(matcher, **kwargs):
    """Another Matcher on the same loaded weights, with its own (empty) caches."""
    from lxmert_pl import Matcher

    return Matcher(matcher.model, matcher.detector, device="cpu", detector_digests=matcher._detector_digests,
                   detector_name=matcher._detector_name, **kwargs)


def test_scores_equal_eval_one_step(matcher, tmp_path):
    pairs = json.loads(VAL_PAIRS.read_text())[:NUM_EVAL_PAIRS]
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    # eval.py in this process (`run_in_process`): the same thread count as the matcher's (the detector's features
    # differ in the last bits, and the scores by ~1e-6, between 1 and 2 threads).
    proc = run_in_process("eval.py", "--pairs", tmp_path / "pairs.json", "--images", VAL_IMAGES, "--given-boxes",
                          BOXES, "--out", tmp_path / "out", "report=false")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "out" / "predictions.json").read_text())
    expected = {row["question_id"]: row["score"] for row in rows}
    got = matcher.score([VAL_IMAGES / f"{p['img_id']}.png" for p in pairs], [p["sent"] for p in pairs],
                        given_boxes=BOXES)
    assert len(expected) == len(pairs)
    diff = max(abs(float(s) - expected[p["question_id"]]) for s, p in zip(got, pairs))
    assert diff <= 1e-6, diff
    assert "BUNDLED DEMO weights" in matcher.report and "Detector: demo-frcnn" in matcher.report


def test_path_pil_and_array_give_identical_scores(matcher):
    path = image_path(3)
    boxes = json.loads(BOXES.read_text())[path.stem]
    texts = ["a red circle", "a blue square", "a green triangle"]
    pil = Image.open(path)
    array = np.asarray(pil.convert("RGB"))
    scores = [fresh(matcher, memory_cache=0).score(image, texts, given_boxes=[boxes]) for image in (path, pil, array)]
    assert np.array_equal(scores[0], scores[1]) and np.array_equal(scores[0], scores[2])
    # another mode of the same picture (RGBA): converted, not refused
    assert fresh(matcher).score(pil.convert("RGBA"), texts, given_boxes=[boxes]).shape == (3,)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK"])
def test_pil_modes_read_as_opencv_reads_the_file(tmp_path, mode):
    rng = np.random.default_rng(0)
    if mode == "I;16":
        path = tmp_path / "wide.png"
        cv2.imwrite(str(path), rng.integers(0, 65536, (20, 30), dtype=np.uint16))
    else:
        path = tmp_path / ("picture.jpg" if mode == "CMYK" else "picture.png")
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).convert(mode).save(path, quality=95)
    image = Image.open(path)
    assert image.mode == mode
    tolerance = 1 if mode == "CMYK" else 0  # two JPEG decoders
    assert np.abs(to_bgr(image).astype(int) - cv2.imread(str(path), cv2.IMREAD_COLOR)).max() <= tolerance


def test_exif_orientation_is_applied(tmp_path):
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    exif = picture.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    picture.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    from_pil = to_bgr(Image.open(tmp_path / "rotated.jpg"))
    assert from_pil.shape == (30, 20, 3)
    assert np.array_equal(from_pil, to_bgr(tmp_path / "rotated.jpg"))


def test_rank_equals_elementwise_score_and_gives_metrics(matcher):
    paths = [image_path(i) for i in range(4)]
    pairs = json.loads(VAL_PAIRS.read_text())
    texts = [p["sent"] for p in pairs[:8]]
    result = matcher.rank(paths, texts, given_boxes=BOXES)
    flat = matcher.score([p for p in paths for _ in texts], texts * len(paths), given_boxes=BOXES)
    assert result.scores.shape == (4, 8)
    assert np.abs(result.scores - flat.reshape(4, 8)).max() <= 1e-6
    truth = [int(p["img_id"][-6:]) for p in pairs[:8]]  # the first 8 pairs describe images 0..3
    ranked = matcher.rank(paths, texts, text_image=truth, given_boxes=BOXES)
    assert {"i2t_R@1", "t2i_R@1", "RSUM"} <= set(ranked.metrics)
    broadcast = matcher.score(paths[1], texts, given_boxes=BOXES)
    assert np.abs(broadcast - result.scores[1]).max() <= 1e-6
    assert np.abs(matcher.score(paths, texts[2], given_boxes=BOXES) - result.scores[:, 2]).max() <= 1e-6


def test_precomputed_detections_and_feature_file_ids(matcher):
    path = image_path(5)
    texts = ["a red circle", "a green triangle"]
    from_image = matcher.score(path, texts, given_boxes=BOXES)
    from_file = matcher.score(path.stem, texts, features=VAL_TSV)  # the same boxes, extracted beforehand
    assert np.abs(from_image - from_file).max() <= 1e-5
    record = matcher.detect(path, given_boxes=json.loads(BOXES.read_text())[path.stem]).features
    assert np.array_equal(matcher.score(record, texts), from_image)


def test_second_call_skips_the_detector_and_a_changed_file_is_detected_again(matcher, tmp_path):
    own = fresh(matcher)
    paths = [image_path(i) for i in (6, 7, 8)]
    own.score(paths, "a red circle", given_boxes=BOXES)
    calls = own.detector_calls
    assert own.images_detected == 3
    own.score(paths[::-1], "a blue star", given_boxes=BOXES)
    assert own.detector_calls == calls  # all three from the memory cache

    copy = tmp_path / "picture.png"
    Image.open(paths[0]).save(copy)
    own.detect(copy)
    own.detect(copy)
    assert own.images_detected == 4
    changed = np.asarray(Image.open(paths[0]).convert("RGB")).copy()
    changed[:10] = 255
    Image.fromarray(changed).save(copy)
    own.detect(copy)
    assert own.images_detected == 5


def test_disk_cache_is_reused_by_a_new_process(matcher, tmp_path):
    from lxmert_pl import Matcher

    cache = tmp_path / "cache"
    path = image_path(9)
    writer = Matcher.from_pretrained("demo-lxrt", detector="demo-frcnn", device="cpu", cache_dir=cache)
    expected = writer.score(path, ["a green triangle", "a red circle"], given_boxes=BOXES)
    entries = list(cache.glob("*/*/meta.json"))
    assert len(entries) == 1 and writer.images_detected == 1
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "lxmert_pl.match", str(path), "a green triangle", "a red circle",
                           "--cache-dir", str(cache), "--device", "cpu"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "from the disk cache" in proc.stdout
    table = {line[16:]: float(line[6:14]) for line in proc.stdout.splitlines() if line[:4].strip().isdigit()}
    assert table == pytest.approx({"a green triangle": expected[0], "a red circle": expected[1]}, abs=1e-4)

    # a damaged entry is detected again and rewritten, not an error
    (entries[0].parent / "boxes.npy").write_bytes(b"garbage")
    again = Matcher.from_pretrained("demo-lxrt", detector="demo-frcnn", device="cpu", cache_dir=cache)
    assert np.array_equal(again.score(path, ["a green triangle", "a red circle"], given_boxes=BOXES), expected)
    assert again.images_detected == 1 and again.cache.disk_hits == 0
    assert fresh(matcher, cache_dir=cache).detect(path, given_boxes=json.loads(BOXES.read_text())[path.stem])


def test_bad_input_is_one_clear_error(matcher, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.png"):
        matcher.score(tmp_path / "nothere.png", "a dog")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ImageReadError, match="notes.png"):
        matcher.score(tmp_path / "notes.png", "a dog")
    with pytest.raises(UserInputError, match="empty list"):
        matcher.score([], "a dog")
    with pytest.raises(UserInputError, match="empty list"):
        matcher.rank([image_path(0)], [])
    with pytest.raises(UserInputError, match="2 images and 3 texts"):
        matcher.score([image_path(0), image_path(1)], ["a", "b", "c"], given_boxes=BOXES)
    with pytest.raises(UserInputError, match="given_boxes has 1 entries for 2 images"):
        matcher.score([image_path(0), image_path(1)], "a dog", given_boxes=[[[0, 0, 5, 5]]])
    with pytest.raises(UserInputError, match="leaves the image"):
        matcher.score(image_path(0), "a dog", given_boxes=[[[0, 0, 5000, 5]]])
    with pytest.raises(UserInputError, match="uint8"):
        matcher.score(np.zeros((10, 10, 3), np.float32), "a dog")
    with pytest.raises(UserInputError, match="empty or whitespace"):
        matcher.score(image_path(0), ["a dog", "  "], given_boxes=BOXES)


def test_a_long_text_is_truncated_and_said_once(matcher):
    own = fresh(matcher)
    long = "a red circle " + " ".join(["and a blue square"] * 10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = own.score(image_path(0), [long, "a red circle"], given_boxes=BOXES)
        own.score(image_path(0), [long], given_boxes=BOXES)
    said = [w for w in caught if "truncated" in str(w.message)]
    assert len(said) == 1 and "20 tokens" in str(said[0].message)
    cut = own.tokenizer.tokenize(long)[:18]
    assert first[0] == pytest.approx(own.score(image_path(0), " ".join(cut).replace(" ##", ""),
                                               given_boxes=BOXES)[0], abs=1e-6)


def test_a_checkpoint_without_matching_head_needs_cosine(tmp_path):
    from lxmert_pl import Matcher
    from lxmert_pl.features.record import ImageFeatures

    save_vqa_snapshot(tmp_path / "vqa.pth", save_tiny_snapshot(tmp_path / "pre.pth"))
    with pytest.raises(CheckpointError, match="no matching head"):
        Matcher.from_pretrained(tmp_path / "vqa.pth", detector=None, mode="itm", device="cpu")
    cosine = Matcher.from_pretrained(tmp_path / "vqa.pth", detector=None, mode="cosine", device="cpu")
    rng = np.random.default_rng(0)
    record = ImageFeatures("x", 100, 100, np.zeros(3, np.int64), np.ones(3, np.float32), np.zeros(3, np.int64),
                           np.ones(3, np.float32), np.array([[0, 0, 50, 50], [10, 10, 90, 90], [0, 0, 100, 100]],
                                                            np.float32), rng.random((3, 2048), np.float32))
    scores = cosine.score(record, ["a dog", "a cat"])
    assert scores.shape == (2,) and np.all(np.abs(scores) <= 1)
    with pytest.raises(UserInputError, match="no detector"):
        cosine.score(image_path(0), "a dog")


def test_cli_prints_sentences_sorted_by_score(capsys):
    from lxmert_pl.match.__main__ import main

    assert main([str(image_path(0)), "a red circle", "a green triangle", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line[:4].strip().isdigit()]
    assert [row[16:] for row in rows] == ["a green triangle", "a red circle"]  # image 0 holds a green triangle
    assert "at the given boxes of" in out and "BUNDLED DEMO" in out
    with pytest.raises(SystemExit) as exit_info:
        main([str(image_path(0)) + ".missing", "a dog"])
    assert exit_info.value.code == 2
    assert "image file not found" in capsys.readouterr().err


def test_detect_explain_and_draw(matcher):
    path = image_path(0)  # a small green triangle and a large orange diamond
    detections = matcher.detect(path, given_boxes=BOXES)
    assert len(detections) == 2 and len(detections.labels) == 2 and detections.size == (166, 157)
    assert all(label.split()[-1].replace(".", "").isdigit() for label in detections.labels)  # "... 0.93"
    why = matcher.explain(path, "a green triangle", given_boxes=BOXES)
    assert why.weights.shape == (2,) and why.weights.sum() == pytest.approx(1.0, abs=1e-5)
    assert why.score == pytest.approx(float(matcher.score(path, ["a green triangle"], given_boxes=BOXES)[0]), abs=1e-6)
    # the same weights as the report's "why" (Scorer.explain) on the same features
    from lxmert_pl.scoring import Scorer

    record = detections.features
    expected = Scorer(matcher.model, matcher.tokenizer).explain(["a green triangle"], [record.features],
                                                                [record.normalized_boxes()])[0]
    assert np.allclose(why.weights, expected, atol=1e-6)
    picture = why.draw(long_side=512)
    assert picture.mode == "RGB" and max(picture.size) == 512
    plain = np.asarray(detections.draw(long_side=512)).astype(int)
    assert np.abs(np.asarray(picture).astype(int) - plain).max() > 0  # the attended boxes are drawn differently
    canvas = matcher.draw(record, "a green triangle")  # precomputed detections: a blank canvas of the image's size
    assert canvas.size == (166, 157)


def test_cli_show_writes_the_picture(tmp_path, capsys):
    from lxmert_pl.match.__main__ import main

    out = tmp_path / "shown.png"
    assert main([str(image_path(0)), "a red circle", "a green triangle", "--device", "cpu", "--show", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Top sentence 'a green triangle' attends to:" in text and f"Picture: {out}" in text
    picture = Image.open(out)
    assert picture.mode == "RGB" and max(picture.size) == 512


def test_rank_bench_runs_and_checks_agreement(capsys):
    from conftest import load_script

    bench = load_script(REPO_ROOT / "bench" / "matcher_rank.py", "matcher_rank_bench")
    assert bench.main(["--images", "2", "--texts", "3", "--rounds", "1", "--width", "32"]) == 0
    out = capsys.readouterr().out
    assert "rank is" in out and "max |score - rank|" in out and "FAIL" not in out


def test_an_entry_another_process_is_writing_is_left_to_it(matcher, tmp_path):
    """Two processes sharing a cache_dir: the one that finds an entry's lock held does not write that entry."""
    own = fresh(matcher, cache_dir=tmp_path / "cache", memory_cache=0)
    path = image_path(10)
    boxes = np.asarray(json.loads(BOXES.read_text())[path.stem], np.float32)
    entry = own.cache.entry_path(own._key_of(path, path.stem, boxes, None))
    entry.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom lxmert_pl.features.locking import "
                               "WriteLock\nlock = WriteLock(sys.argv[1])\nprint('held', flush=True)\ntime.sleep(60)",
                               str(entry)], env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        scores = own.score(path, ["a red circle", "a blue star"], given_boxes=BOXES)
        assert not entry.exists()  # left to the holder
    finally:
        holder.kill()
        holder.wait()
    own.score(path, ["a red circle", "a blue star"], given_boxes=BOXES)
    assert (entry / "meta.json").is_file()  # written once the lock is free
    assert np.array_equal(fresh(matcher, cache_dir=tmp_path / "cache").score(path, ["a red circle", "a blue star"],
                                                                              given_boxes=BOXES), scores)
