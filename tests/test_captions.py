"""read_captions: the one caption parser of retrieval (Karpathy split files, LXMERT caption files, pair files)."""

from __future__ import annotations

import json

import pytest

from lxmert_pl.pairs.io import PairFileError, read_captions


def _karpathy(path, images):
    path.write_text(json.dumps({"dataset": "flickr30k", "images": images}), encoding="utf-8")
    return path


def _image(filename, split, *captions):
    return {"filename": filename, "split": split, "imgid": 0, "sentences": [{"raw": c, "tokens": c.split()}
                                                                            for c in captions]}


def test_karpathy_split_several_captions_per_image(tmp_path):
    path = _karpathy(tmp_path / "dataset_flickr30k.json", [
        _image("1000092795.jpg", "train", "two men", "a yard"),
        _image("10002456.jpg", "test", "a dog runs", "a brown dog", "dog on grass"),
        _image("1000268201.jpg", "val", "a child"),
        _image("1000344755.jpg", "test", "a man on a ladder", "window cleaning"),
    ])
    test = read_captions(path, split="test")
    assert test.img_ids == ["10002456", "1000344755"]  # file name without extension = the features' img_id
    assert test.sentences == ["a dog runs", "a brown dog", "dog on grass", "a man on a ladder", "window cleaning"]
    assert test.caption_image == [0, 0, 0, 1, 1]
    assert test.captions_of() == {0: {0, 1, 2}, 1: {3, 4}}
    assert "split test" in test.source
    everything = read_captions(path)
    assert everything.num_images == 4 and everything.num_captions == 8
    with pytest.raises(PairFileError, match=r"no image of split 'tset'.*test \(2\).*train \(1\).*val \(1\)"):
        read_captions(path, split="tset")


def test_karpathy_coco_file_names_are_lxmert_img_ids(tmp_path):
    path = _karpathy(tmp_path / "dataset_coco.json", [
        {"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "split": "test",
         "sentences": [{"raw": "A man riding a bike."}]}])
    assert read_captions(path, split="test").img_ids == ["COCO_val2014_000000391895"]


def test_blank_caption_names_file_and_entry_or_is_counted_when_skipped(tmp_path):
    path = _karpathy(tmp_path / "k.json", [_image("1.jpg", "test", "fine"), _image("2.jpg", "test", "ok", "  ")])
    with pytest.raises(PairFileError, match=r"k\.json: images\[1\] \(2\.jpg\), sentences\[1\]\.raw: empty"):
        read_captions(path, split="test")
    skipped = read_captions(path, split="test", skip_blank=True)
    assert skipped.sentences == ["fine", "ok"] and skipped.skipped_blank == 1


def test_lxmert_caption_file_blank_caption_is_an_error_not_a_silent_drop(tmp_path):
    """retrieval.py's own reader used to drop blank captions silently while pairs/io.py raised."""
    path = tmp_path / "captions.json"
    path.write_text(json.dumps([{"img_id": "a", "sentf": {"mscoco": ["one", "two"]}},
                                {"img_id": "b", "sentf": {"mscoco": ["three", ""]}},
                                {"img_id": "c", "sentf": {"vqa": ["what?"]}}]), encoding="utf-8")
    with pytest.raises(PairFileError, match=r"captions\.json: entry #1 \(b\), mscoco sentence #1: empty"):
        read_captions(path)
    got = read_captions(path, skip_blank=True)
    assert got.img_ids == ["a", "b"] and got.sentences == ["one", "two", "three"] and got.caption_image == [0, 0, 1]
    assert got.skipped_blank == 1
    with pytest.raises(PairFileError, match="Karpathy"):
        read_captions(path, split="test")


def test_pair_file_matched_pairs_are_the_captions(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([{"img_id": "a", "sent": "a cat", "ground": "True"},
                                {"img_id": "b", "sent": "a cat", "ground": "False"},
                                {"img_id": "b", "sent": "a bus", "ground": "True"},
                                {"img_id": "c", "sent": "a car", "ground": "False"}]), encoding="utf-8")
    got = read_captions(path)
    assert got.img_ids == ["a", "b", "c"]  # c has no caption: a candidate for text -> image, not a query
    assert got.sentences == ["a cat", "a bus"] and got.caption_image == [0, 1]
    dropped = got.without_images({"a"})
    assert dropped.img_ids == ["b", "c"] and dropped.sentences == ["a bus"] and dropped.caption_image == [0]


def test_json_lines_pair_file_under_a_json_suffix(tmp_path):
    """Any file `load_pairs` reads is a caption set: JSON Lines named .json too (it is not one JSON document)."""
    rows = [{"img_id": "a", "sent": "a cat", "ground": "True"}, {"img_id": "b", "sent": "a bus", "ground": "True"}]
    path = tmp_path / "pairs.json"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    got = read_captions(path)
    assert got.img_ids == ["a", "b"] and got.sentences == ["a cat", "a bus"]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(rows[0]) + "\n" + '{"img_id": "b", "sent": \n', encoding="utf-8")
    with pytest.raises(PairFileError, match=rf"{broken}:2:\d+: invalid JSON"):
        read_captions(broken)
