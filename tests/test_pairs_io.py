"""Pair files: the fork's JSON, JSON Lines, CSV, LXMERT caption files, and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lxmert_pl.pairs.io import Pair, PairFileError, load_pairs

SEED_PAIRS = [
    {
        "question_id": 262144003, "img_id": "COCO_test2015_000000262144",
        "sent": "The ball is flying towards the batter.", "ground": "True", "answer_type": "yes/no",
        "question_type": "is this a",
        "original_sent": "Is the ball flying towards the batter?", "label": {"yes": 1},
    },
    {"question_id": 262144004, "img_id": "COCO_test2015_000000262144", "sent": "The man is asleep.", "ground": "False",
     "label": {"no": 1}},
]  # fmt: skip


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def test_seed_json_takes_the_label_from_ground(tmp_path):
    pairs = load_pairs(write(tmp_path / "matching_val.json", json.dumps(SEED_PAIRS)))
    assert pairs[0] == Pair(
        index=0,
        question_id=262144003,
        img_id="COCO_test2015_000000262144",
        sent="The ball is flying towards the batter.",
        label=1,
        extra={"answer_type": "yes/no", "question_type": "is this a",
               "original_sent": "Is the ball flying towards the batter?", "label": {"yes": 1}},
    )  # fmt: skip
    assert (pairs[1].index, pairs[1].label, pairs[1].extra) == (1, 0, {"label": {"no": 1}})


def test_json_without_ground_has_unknown_labels(tmp_path):
    entries = [{key: value for key, value in entry.items() if key != "ground"} for entry in SEED_PAIRS]
    pairs = load_pairs(write(tmp_path / "matching_test.json", json.dumps(entries)))
    assert [p.label for p in pairs] == [None, None]
    assert pairs[1].extra["label"] == {"no": 1}


def test_jsonl_label_spellings_and_question_id_fallback(tmp_path):
    labels = [1, 0, True, False, "True", "False", "true", "0", None]
    lines = [
        json.dumps({"img_id": f"img{i}", "sent": f"sentence {i}", "label": label}) for i, label in enumerate(labels)
    ]
    lines.insert(3, "")
    pairs = load_pairs(write(tmp_path / "pairs.jsonl", "\n".join(lines) + "\n"))
    assert [p.label for p in pairs] == [1, 0, 1, 0, 1, 0, 1, 0, None]
    assert [p.question_id for p in pairs] == list(range(9)) == [p.index for p in pairs]
    assert pairs[4].img_id == "img4" and pairs[4].extra == {}


def test_jsonl_keeps_unicode_line_separators_inside_strings(tmp_path):
    text = json.dumps({"img_id": "a", "sent": "one\u2028two"}, ensure_ascii=False) + "\r\n"
    pairs = load_pairs(write(tmp_path / "pairs.jsonl", text))
    assert [p.sent for p in pairs] == ["one\u2028two"]


def test_csv_with_optional_label_and_extra_columns(tmp_path):
    text = (
        'img_id,sent,label,question_id,note\nimgA,"A dog, running.",1,17,x\nimgB,A cat.,,,y\nimgC,Two cats.,False,q3,\n'
    )
    pairs = load_pairs(write(tmp_path / "pairs.csv", text))
    assert [(p.img_id, p.sent, p.label, p.question_id) for p in pairs] == [
        ("imgA", "A dog, running.", 1, 17), ("imgB", "A cat.", None, 1), ("imgC", "Two cats.", 0, "q3"),
    ]  # fmt: skip
    assert pairs[0].extra == {"note": "x"}


def test_csv_without_label_column(tmp_path):
    pairs = load_pairs(write(tmp_path / "pairs.csv", "img_id,sent\nimgA,A dog.\n"))
    assert pairs == [Pair(index=0, question_id=0, img_id="imgA", sent="A dog.", label=None, extra={})]


def test_caption_file_gives_positive_pairs_of_the_chosen_source(tmp_path):
    entries = [
        {"img_id": "COCO_val2014_000000000042", "sentf": {"mscoco": ["A dog.", "A brown dog."], "vqa": ["Is it?"]},
         "labelf": {"vqa": [{"yes": 1}]}},
        {"img_id": "COCO_val2014_000000000073", "sentf": {"vqa": ["What color?"]}},
        {"img_id": "COCO_val2014_000000000074", "sentf": {"mscoco": ["A bike."]}},
    ]  # fmt: skip
    path = write(tmp_path / "mscoco_minival.json", json.dumps(entries))
    pairs = load_pairs(path)
    assert [(p.index, p.img_id[-2:], p.sent, p.label) for p in pairs] == [
        (0, "42", "A dog.", 1), (1, "42", "A brown dog.", 1), (2, "74", "A bike.", 1),
    ]  # fmt: skip
    assert pairs[1].extra == {"source": "mscoco", "sentence_index": 1}
    assert [p.sent for p in load_pairs(path, caption_source="vqa")] == ["Is it?", "What color?"]
    with pytest.raises(PairFileError, match=r"no sentences of source 'gqa'; sources in this file: \['mscoco', 'vqa'\]"):
        load_pairs(path, caption_source="gqa")


@pytest.mark.parametrize("sentence", ["", "   \t"])
def test_empty_sentence_names_file_line_and_pair_index(tmp_path, sentence):
    lines = [{"img_id": "a", "sent": "ok"}, {"img_id": "b", "sent": "fine"}, {"img_id": "c", "sent": sentence}]
    path = write(tmp_path / "p.jsonl", "\n".join(map(json.dumps, lines)))
    with pytest.raises(PairFileError, match=rf"{path}:3: pair #2: empty or whitespace-only sentence"):
        load_pairs(path)
    path = write(tmp_path / "p.json", json.dumps(lines))
    with pytest.raises(PairFileError, match=rf"{path}: pair #2: empty or whitespace-only sentence"):
        load_pairs(path)


def test_empty_caption_names_the_entry_and_pair(tmp_path):
    path = write(tmp_path / "caps.json", json.dumps([{"img_id": "x", "sentf": {"mscoco": ["Fine.", " "]}}]))
    with pytest.raises(PairFileError, match=r"entry #0 \(x\), mscoco sentence #1 \(pair #1\): empty or whitespace-only"):
        load_pairs(path)


def test_non_utf8_file_names_the_line(tmp_path):
    path = write(tmp_path / "p.csv", b"img_id,sent\nimgA,A dog.\nimgB,caf\xe9 terrace\n")
    with pytest.raises(PairFileError, match=rf"{path}:3: not valid UTF-8 \(byte 0xe9"):
        load_pairs(path)


def test_utf8_bom_is_accepted(tmp_path):
    path = write(tmp_path / "p.csv", "\ufeffimg_id,sent\nimgA,Café.\n".encode())
    assert load_pairs(path)[0].sent == "Café."


def test_invalid_json_names_line_and_column(tmp_path):
    path = write(tmp_path / "p.json", '[\n  {"img_id": "a", "sent": "x"},\n  {"img_id": "b" "sent": "y"}\n]')
    with pytest.raises(PairFileError, match=rf"{path}:3:\d+: invalid JSON"):
        load_pairs(path)
    path = write(tmp_path / "p.jsonl", '{"img_id": "a", "sent": "x"}\n{"img_id": "b",\n')
    with pytest.raises(PairFileError, match=rf"{path}:2:\d+: invalid JSON .*one object per line"):
        load_pairs(path)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"sent": "x"}, r"pair #0: no 'img_id' field"),
        ({"img_id": "a"}, r"pair #0: no 'sent' field"),
        ({"img_id": "", "sent": "x"}, r"pair #0: empty img_id"),
        ({"img_id": "a", "sent": "x", "ground": "maybe"}, r"pair #0: ground 'maybe' is not a matching label"),
        ({"img_id": "a", "sent": "x", "label": 2}, r"pair #0: label 2 is not a matching label"),
    ],
)
def test_bad_records(tmp_path, record, message):
    path = write(tmp_path / "p.jsonl", json.dumps(record) + "\n")
    with pytest.raises(PairFileError, match=rf"{path}:1: {message}"):
        load_pairs(path)


def test_bad_csv_shapes(tmp_path):
    path = write(tmp_path / "p.csv", "image,sentence\na,b\n")
    with pytest.raises(
        PairFileError, match=r"p\.csv:1: CSV header \['image', 'sentence'\] lacks column\(s\) \['img_id', 'sent'\]"
    ):
        load_pairs(path)
    path = write(tmp_path / "p.csv", "img_id,sent\na,b\nc,d,e\n")
    with pytest.raises(PairFileError, match=r"p\.csv:3: expected 2 columns"):
        load_pairs(path)
    with pytest.raises(PairFileError, match=r"p\.json: the pair file is empty"):
        load_pairs(write(tmp_path / "p.json", "  \n"))
