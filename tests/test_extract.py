"""extract.py and the extraction engine (resume after a real kill, skips, shards, given boxes) and
ImageFolderFeatureSource, on a tiny random detector and small synthetic images."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from e2e_helpers import run_in_process
from helpers_features import lock_held_by_another_process

from lxmert_pl.detector import (
    ADAPTIVE_10_100,
    OBJ36,
    BoxSelection,
    ExtractionFailedError,
    ImageFolderFeatureSource,
    load_detector,
    save_tiny_detector,
)
from lxmert_pl.detector.extraction import (
    detector_file_digests,
    extraction_settings,
    list_images,
    load_given_boxes,
    shard_path,
    skipped_path,
)
from lxmert_pl.detector.random_weights import synthetic_image
from lxmert_pl.detector.sharded import run_extraction
from lxmert_pl.features.sources import FeatureSource
from lxmert_pl.features import (
    ExtractionSettings,
    FeatureFileLockedError,
    MissingImageError,
    NotAFeatureTsvError,
    ProvenanceMismatchError,
    TsvWriter,
    iter_tsv_features,
    read_img_ids,
    read_settings,
    sidecar_path,
)
from lxmert_pl.features.provenance import sha256_of_file

from conftest import load_script

REPO_ROOT = Path(__file__).resolve().parents[1]
NAMES = [f"img_{k}" for k in range(6)]

extract = load_script(REPO_ROOT / "extract.py")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory):
    return save_tiny_detector(tmp_path_factory.mktemp("detector") / "tiny", seed=0, min_size_test=96, max_size_test=160)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """Six small images of different sizes, one corrupt file and one non-image file."""
    directory = tmp_path_factory.mktemp("images")
    for k, name in enumerate(NAMES):
        cv2.imwrite(str(directory / f"{name}.png"), synthetic_image(seed=k, height=60 + 10 * k, width=80 + 5 * k))
    (directory / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    (directory / "notes.txt").write_text("ignored: not an image extension")
    return directory


def _rows(path: Path) -> dict:
    rows = list(iter_tsv_features(path))
    ids = [row.img_id for row in rows]
    assert len(ids) == len(set(ids)), f"duplicate rows in {path}: {ids}"
    return {row.img_id: row for row in rows}


def test_cli_extracts_every_readable_image_and_lists_the_skipped(detector_dir, image_dir, tmp_path, capsys):
    out = tmp_path / "feats.tsv"
    code = extract.main(
        ["--images", str(image_dir), "--out", str(out), "--detector", str(detector_dir), "--batch-size", "4"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert str(detector_dir / "model.safetensors") in printed and "missing 0" in printed  # weights named at the start
    rows = _rows(out)
    assert sorted(rows) == NAMES
    assert all(row.num_boxes == 36 and row.features.shape == (36, 128) for row in rows.values())
    assert (rows["img_2"].img_h, rows["img_2"].img_w) == (80, 90)
    skipped = skipped_path(out).read_text().splitlines()
    assert len(skipped) == 1 and skipped[0].startswith(str(image_dir / "broken.jpg") + "\t")
    assert "cannot decode image" in skipped[0]

    # Batched extraction gives what one image at a time gives.
    model, _ = load_detector(detector_dir)
    alone = model.extract([image_dir / "img_5.png"])[0]
    np.testing.assert_array_equal(rows["img_5"].objects_id, alone.objects_id)
    np.testing.assert_allclose(rows["img_5"].features, alone.features, atol=1e-4, rtol=0)


def test_detector_alias_is_resolved_through_the_registry(tmp_path, capsys):
    """`--detector demo-frcnn` (an alias, as the README's commands use) extracts with the bundled demo detector."""
    sample = REPO_ROOT / "data" / "sample"
    if not (REPO_ROOT / "checkpoints" / "demo" / "frcnn" / "config.yaml").exists():
        pytest.skip("bundled demo detector absent (checkpoints/demo/frcnn): make it with scripts/make_demo.py")
    images = tmp_path / "images"
    images.mkdir()
    for name in ("sample_val_000000.png", "sample_val_000001.png"):
        (images / name).write_bytes((sample / "images" / "val" / name).read_bytes())
    out = tmp_path / "demo.tsv"
    code = extract.main(["--images", str(images), "--out", str(out), "--detector", "demo-frcnn",
                         "--given-boxes", str(sample / "boxes.json")])
    assert code == 0
    assert "demo-frcnn = the BUNDLED DEMO weights" in capsys.readouterr().out
    bundled = {row.img_id: row for row in iter_tsv_features(sample / "features" / "val_obj.tsv")}
    for row in iter_tsv_features(out):
        np.testing.assert_allclose(row.features, bundled[row.img_id].features, atol=1e-4, rtol=0)


def test_unknown_detector_alias_is_one_clear_error(image_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        extract.main(["--images", str(image_dir), "--out", str(tmp_path / "x.tsv"), "--detector", "frcnn-vg"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("extract.py: error: 'frcnn-vg' is neither") and "frcnn-vg-finetuned" in error


def test_adaptive_selection_flags():
    from lxmert_pl.errors import ConfigError
    from lxmert_pl.runs.extraction import box_selection

    def selection(*flags: str) -> BoxSelection:
        return box_selection(extract.COMMAND.compose(["--images", "d", "--out", "o", "--detector", "x", *flags]).detector)

    assert selection("--min-boxes", "10", "--max-boxes", "100") == ADAPTIVE_10_100
    assert selection() == OBJ36
    assert selection("--boxes", "20") == BoxSelection(20, 20)
    with pytest.raises(ConfigError):
        selection("--boxes", "36", "--min-boxes", "10")


def test_resume_after_kill_gives_exactly_one_row_per_image(tmp_path, image_dir):
    """A real SIGKILL in the middle of a run, a torn last line, then a restart of the same command."""
    slow = save_tiny_detector(tmp_path / "slow", seed=0, min_size_test=320, max_size_test=640)  # ~0.2 s per image
    out = tmp_path / "feats.tsv"
    command = [sys.executable, "extract.py", "--images", str(image_dir), "--out", str(out), "--detector", str(slow)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see the one_torch_thread fixture (conftest)
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if out.exists() and read_img_ids(out):
            break
        time.sleep(0.02)
    assert process.poll() is None, (
        f"extract.py ended before it could be killed: {process.stderr.read().decode()[-2000:]}"
    )
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    process.stderr.close()
    done_before = read_img_ids(out)
    assert 1 <= len(done_before) < len(NAMES)
    with open(out, "ab") as handle:  # what a kill during a write leaves: a partial last line
        handle.write(b"img_9\t100\t100\tAAAA")

    finished = run_in_process(*command[1:])  # the same command again, in this process (no start-up paid)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert f"{len(done_before)} already in" in finished.stdout
    assert "removed a truncated last line" in finished.stdout
    rows = _rows(out)  # decodes every line: complete rows only, each id once
    assert sorted(rows) == NAMES
    assert out.read_bytes().endswith(b"\n")


@pytest.mark.slow
def test_devices_shard_and_merge_in_input_order(detector_dir, image_dir, tmp_path):
    """--devices 2: two processes of Lightning's DDP (its own launcher), one shard each, merged in input order."""
    out = tmp_path / "feats.tsv"
    command = [sys.executable, "extract.py", "--images", str(image_dir), "--out", str(out), "--detector",
               str(detector_dir), "--batch-size", "2", "--accelerator", "cpu", "--devices", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    finished = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "2 process(es)" in finished.stdout and "wrote 6 rows" in finished.stdout
    assert read_img_ids(out) == NAMES  # input order (sorted names; broken.jpg skipped)
    assert len(skipped_path(out).read_text().splitlines()) == 1
    assert not list(tmp_path.glob("feats.tsv.shard*")) and not (tmp_path / "feats.tsv.shards.json").exists()


def test_leftover_shards_of_a_killed_sharded_run_are_merged(detector_dir, image_dir, tmp_path):
    out = tmp_path / "feats.tsv"
    model, report = load_detector(detector_dir)
    settings = extraction_settings(model, str(detector_dir), detector_file_digests(report), OBJ36, None, None)
    first, second = model.extract([image_dir / "img_0.png", image_dir / "img_3.png"])

    with TsvWriter(out, settings=settings) as writer:  # what the killed run had written, with its settings
        writer.write(first)
    with TsvWriter(shard_path(out, 1)) as writer:
        writer.write(first)  # already in the output: must not be duplicated
        writer.write(second)
    with open(shard_path(out, 1), "ab") as handle:
        handle.write(b"img_4\t1\t")  # torn line
    result = run_extraction(list_images(image_dir), out, detector_dir, OBJ36, log=lambda _: None)
    assert result.already_done == 2 and result.written == 4
    assert sorted(_rows(out)) == NAMES and not shard_path(out, 1).exists()


def test_given_boxes(detector_dir, image_dir, tmp_path):
    boxes = {"img_1": [[0, 0, 40, 30], [10, 5, 79, 69]], "img_4": [[3.5, 2.0, 20.0, 90.0]]}
    boxes_path = tmp_path / "boxes.json"
    boxes_path.write_text(json.dumps(boxes))
    out = tmp_path / "given.tsv"
    argv = [
        "--images",
        str(image_dir),
        "--out",
        str(out),
        "--detector",
        str(detector_dir),
        "--given-boxes",
        str(boxes_path),
    ]
    assert extract.main(argv) == 0
    rows = _rows(out)
    assert sorted(rows) == ["img_1", "img_4"]
    np.testing.assert_array_equal(rows["img_1"].boxes, np.asarray(boxes["img_1"], dtype=np.float32))
    assert rows["img_4"].num_boxes == 1 and rows["img_4"].features.shape == (1, 128)
    reasons = skipped_path(out).read_text()
    assert "no boxes for img_id 'img_0'" in reasons and "broken.jpg" in reasons

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"img_1": [[10, 10, 5, 20]]}))
    with pytest.raises(ValueError, match="img_1"):
        load_given_boxes(bad)


def test_list_file_and_duplicate_ids(image_dir, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two images\n{image_dir / 'img_1.png'}\n\n{image_dir / 'img_0.png'}\n")
    assert [p.name for p in list_images(listing)] == ["img_1.png", "img_0.png"]
    with pytest.raises(ValueError, match="img_0"):
        list_images([image_dir / "img_0.png", tmp_path / "img_0.jpg"])


def test_image_folder_feature_source_extracts_once_and_caches(detector_dir, image_dir, tmp_path):
    cache = tmp_path / "cache.tsv"
    source = ImageFolderFeatureSource(image_dir, detector_dir, selection=ADAPTIVE_10_100, cache_path=cache)
    assert isinstance(source, FeatureSource)
    assert "img_3" in source and "nothing" not in source and "broken" in source
    assert sorted(source.img_ids) == sorted([*NAMES, "broken"])
    source.prefetch(["img_0", "img_2", "img_0"], batch_size=2)
    assert read_img_ids(cache) == ["img_0", "img_2"]
    row = source.get("img_2")
    assert 10 <= row.num_boxes <= 100 and row.img_id == "img_2"
    on_demand = source.get("img_5")  # extracted now, appended to the cache
    assert read_img_ids(cache) == ["img_0", "img_2", "img_5"]
    assert "cache" in source.describe() and "10-100" in source.describe()
    with pytest.raises(MissingImageError):
        source.get("nothing")
    with pytest.raises(ExtractionFailedError, match="broken.jpg"):
        source.prefetch(["broken"])

    # A new source on the same cache reads instead of extracting.
    reopened = ImageFolderFeatureSource(image_dir, source.detector, selection=ADAPTIVE_10_100, cache_path=cache)
    reopened.detector.extract = None  # any extraction would fail now
    np.testing.assert_array_equal(reopened.get("img_5").features, on_demand.features)
    reopened.prefetch(["img_0", "img_2", "img_5"])
    # Other settings (or other detector weights): the stale cache is discarded, not read back.
    stale = ImageFolderFeatureSource(image_dir, source.detector, selection=OBJ36, cache_path=cache)
    assert not cache.exists() and "0 cached" in stale.describe()


def test_image_folder_feature_source_in_memory_with_given_boxes(detector_dir, image_dir):
    given = {"img_1": np.array([[0, 0, 40, 30]], dtype=np.float32)}
    source = ImageFolderFeatureSource(
        [image_dir / "img_1.png", image_dir / "img_2.png"], detector_dir, given_boxes=given
    )
    assert source.img_ids == ["img_1"] and "img_2" not in source
    source.prefetch(source.img_ids)
    row = source.get("img_1")
    np.testing.assert_array_equal(row.boxes, given["img_1"])
    assert source.get("img_1") is row  # kept in memory, not re-extracted


# ------------------------------------------------------------------------------------------ reliability (issue 13/14)


def _quiet(_message: str) -> None:
    pass


def test_output_is_never_a_file_we_cannot_prove_is_ours(detector_dir, image_dir, tmp_path):
    """--out holding a JSON file, a checkpoint or a TSV without provenance is refused before anything is written."""
    paths = [image_dir / "img_0.png"]
    json_file = tmp_path / "config.json"
    json_file.write_text('{"lr": 0.001}')  # no final newline: the old "repair" emptied it
    checkpoint = tmp_path / "last.ckpt"
    checkpoint.write_bytes(b"PK\x03\x04" + np.random.default_rng(0).bytes(2000) + b"\n" + b"\x00\x01" * 2710)
    for path in (json_file, checkpoint):
        before = path.read_bytes()
        with pytest.raises(NotAFeatureTsvError, match=rf"{path} is not a feature TSV, so it was not modified"):
            run_extraction(paths, path, detector_dir, OBJ36, log=_quiet)
        assert path.read_bytes() == before and not sidecar_path(path).exists()

    legacy = tmp_path / "released.tsv"
    model, _ = load_detector(detector_dir)
    with TsvWriter(legacy) as writer:  # rows without a sidecar, as in the released TSVs
        writer.write(model.extract([image_dir / "img_1.png"])[0])
    before = legacy.read_bytes()
    with pytest.raises(ProvenanceMismatchError, match=r"has no released.tsv.meta.json .* Write to a new file"):
        run_extraction(paths, legacy, detector_dir, OBJ36, log=_quiet)
    assert legacy.read_bytes() == before


def test_provenance_sidecar_and_refusal_to_mix_settings(detector_dir, image_dir, tmp_path):
    out = tmp_path / "feats.tsv"
    paths = [image_dir / "img_0.png", image_dir / "img_1.png"]
    run_extraction(paths[:1], out, detector_dir, OBJ36, log=_quiet)
    recorded = read_settings(out)
    assert (recorded.geometry, recorded.precision, recorded.min_boxes, recorded.max_boxes) == ("port", "fp32", 36, 36)
    assert (recorded.test_min_size, recorded.test_max_size) == (96, 160) and not recorded.given_boxes
    assert set(recorded.detector_sha256) == {"config.yaml", "model.safetensors"}
    assert recorded.detector_sha256["model.safetensors"] == sha256_of_file(detector_dir / "model.safetensors")
    assert ExtractionSettings.from_json(recorded.to_json()) == recorded

    before = out.read_bytes()
    with pytest.raises(ProvenanceMismatchError, match=r"min_boxes: 36 != 10; max_boxes: 36 != 100"):
        run_extraction(paths, out, detector_dir, ADAPTIVE_10_100, log=_quiet)
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"img_1": [[0, 0, 20, 20]]}))
    with pytest.raises(ProvenanceMismatchError, match=r"given_boxes: False != True"):
        run_extraction(paths, out, detector_dir, OBJ36, given_boxes=load_given_boxes(boxes), log=_quiet)
    # Mixing two proposal geometries or two precisions in one file would be silent corruption.
    with pytest.raises(ProvenanceMismatchError, match=r"geometry: 'port' != 'caffe'"):
        run_extraction(paths, out, detector_dir, OBJ36, geometry="caffe", log=_quiet)
    with pytest.raises(ProvenanceMismatchError, match=r"precision: 'fp32' != 'bf16'"):
        run_extraction(paths, out, detector_dir, OBJ36, precision="bf16", log=_quiet)
    assert out.read_bytes() == before
    result = run_extraction(paths, out, detector_dir, OBJ36, log=_quiet)  # same settings: resumes
    assert (result.already_done, result.written) == (1, 1) and read_img_ids(out) == ["img_0", "img_1"]


def test_a_second_extraction_into_the_same_output_is_refused(detector_dir, image_dir, tmp_path):
    out = tmp_path / "feats.tsv"
    with lock_held_by_another_process(out):
        with pytest.raises(FeatureFileLockedError, match=rf"{out} is being written by another process"):
            run_extraction([image_dir / "img_0.png"], out, detector_dir, OBJ36, log=_quiet)
    assert not out.exists()
    assert run_extraction([image_dir / "img_0.png"], out, detector_dir, OBJ36, log=_quiet).written == 1


def test_odd_file_names_and_given_boxes_outside_the_image_are_skipped_and_listed(detector_dir, image_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("plain.png", "tab\there.png", "wide.png"):
        (images / name).write_bytes((image_dir / "img_0.png").read_bytes())  # 80 x 60
    out = tmp_path / "feats.tsv"
    for _ in range(2):  # the rerun too
        result = run_extraction(list_images(images), out, detector_dir, OBJ36, log=_quiet)
        assert result.skipped == [(str(images / "tab\there.png"), "the file name cannot be a TSV img_id: an img_id "
                                   "cannot contain tabs or line breaks")]
    assert read_img_ids(out) == ["plain", "wide"]
    assert skipped_path(out).read_text() == f"{str(images)}/tab\\there.png\t{result.skipped[0][1]}\n"

    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"plain": [[0, 0, 80, 60]], "wide": [[0, 0, 81, 20]]}))
    result = run_extraction(list_images(images), tmp_path / "given.tsv", detector_dir, OBJ36,
                            given_boxes=load_given_boxes(boxes), log=_quiet)
    assert read_img_ids(tmp_path / "given.tsv") == ["plain"]
    assert any("given boxes of img_id 'wide': box 0 [0.0, 0.0, 81.0, 20.0] leaves the image" in reason
               for _, reason in result.skipped)


def test_bad_inputs_are_one_clear_error(detector_dir, image_dir, tmp_path, capsys):
    def error_of(*argv: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            extract.main(["--detector", str(detector_dir), *argv])
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    out = str(tmp_path / "o.tsv")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"no images in {empty}" in error_of("--images", str(empty), "--out", out)
    image = image_dir / "img_0.png"
    assert f"{image} is not an image folder or a list file" in error_of("--images", str(image), "--out", out)
    text = tmp_path / "notes.txt"
    text.write_text("hello\nworld\n")
    assert "none of the 2 paths it lists exists" in error_of("--images", str(text), "--out", out)
    not_json = tmp_path / "boxes.json"
    not_json.write_text("img_0: [[0, 0, 5, 5]]")
    assert f"given-boxes file {not_json} is not valid JSON" in error_of(
        "--images", str(image_dir), "--out", out, "--given-boxes", str(not_json))
    assert f"--out {tmp_path} is a directory" in error_of("--images", str(image_dir), "--out", str(tmp_path))
    assert f"{not_json} is a file" in error_of("--images", str(image_dir), "--out", str(not_json / "o.tsv"))
    assert not Path(out).exists()


def test_one_step_cache_answers_only_for_the_same_inputs(detector_dir, image_dir, tmp_path):
    """Another folder with the same file names, or other given boxes, into the same cache: extracted anew."""
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, sources in ((first, ("img_0", "img_1")), (second, ("img_2", "img_1"))):
        folder.mkdir()
        for name, source in zip(("a", "b"), sources):
            (folder / f"{name}.png").write_bytes((image_dir / f"{source}.png").read_bytes())
    cache = tmp_path / "out" / "image_features.tsv"
    model, _ = load_detector(detector_dir)
    ImageFolderFeatureSource(first, model, cache_path=cache).prefetch(["a", "b"])
    reopened = ImageFolderFeatureSource(second, model, cache_path=cache)
    expected = model.extract([second / "a.png"])[0]
    np.testing.assert_array_equal(reopened.get("a").features, expected.features)  # not first/a's row
    assert reopened.get("a").img_h == expected.img_h
    assert sorted(read_img_ids(cache)) == ["a", "b"]  # the stale row was dropped, not duplicated
    calls = []
    model_extract = model.extract
    model.extract = lambda *args, **kwargs: calls.append(args) or model_extract(*args, **kwargs)
    ImageFolderFeatureSource(second, model, cache_path=cache).prefetch(["a", "b"])
    assert calls == []  # b's content is the same in both folders, a was cached by the previous source

    one = {"a": np.array([[0, 0, 30, 30]], dtype=np.float32)}
    other = {"a": np.array([[5, 5, 40, 40]], dtype=np.float32)}
    with_boxes = tmp_path / "boxes_cache.tsv"
    ImageFolderFeatureSource(second, model, given_boxes=one, cache_path=with_boxes).prefetch(["a"])
    row = ImageFolderFeatureSource(second, model, given_boxes=other, cache_path=with_boxes).get("a")
    np.testing.assert_array_equal(row.boxes, other["a"])
    model.extract = model_extract
