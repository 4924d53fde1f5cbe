"""Tokenizer: ids equal to the original BertTokenizer (HF's slow BertTokenizer is the same algorithm)."""

from __future__ import annotations

import pytest

from lxmert_pl.tokenizer import LxmertTokenizer, default_vocab_path

EDGE_CASES = [
    "A man riding a double-decker bus.",
    "Café owners' DOGS, sitting!",
    "Naïve résumé   with\ttabs\nand newlines",
    "a [MASK] token and [SEP] [CLS] [UNK] [PAD] literals",
    "中文字符 and 日本語 mixed",
    "x" * 150 + " long word",
    "  leading and trailing spaces  ",
    "numbers 12,345.67 and emoji \U0001F600 and control\x07char",
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen "
    "eighteen nineteen twenty",
]


@pytest.fixture(scope="module")
def tok():
    return LxmertTokenizer()


def test_matches_reference_bert_tokenizer(tok):
    transformers = pytest.importorskip("transformers")
    ref = transformers.BertTokenizer(str(default_vocab_path()), do_lower_case=True)
    for sentence in EDGE_CASES:
        assert tok.tokenize(sentence) == ref.tokenize(sentence.strip()), sentence


def test_truncation_and_padding(tok):
    out = tok(EDGE_CASES)
    assert out["input_ids"].shape == (len(EDGE_CASES), 20)
    assert (out["input_ids"][:, 0] == tok.cls_id).all()
    long_row = out["input_ids"][-1]
    assert long_row[-1] == tok.sep_id and out["attention_mask"][-1].sum() == 20
    short = tok(["a dog"])
    assert short["input_ids"][0, :4].tolist() == [101, 1037, 3899, 102]
    assert short["attention_mask"][0].tolist() == [1] * 4 + [0] * 16
    assert (short["token_type_ids"] == 0).all()


@pytest.mark.parametrize("bad", ["", "   ", "\t\n"])
def test_empty_sentence_is_an_error(tok, bad):
    with pytest.raises(ValueError, match="sentence #1 is empty"):
        tok(["fine", bad])


def test_max_seq_length_option():
    assert LxmertTokenizer(max_seq_length=8)(["a b c d e f g h i j"])["input_ids"].shape == (1, 8)
    with pytest.raises(ValueError):
        LxmertTokenizer(max_seq_length=2)
