"""Uncased WordPiece tokenizer producing the ids of the original LXMERT `BertTokenizer`.

Built on the `tokenizers` library with the bert-base-uncased vocabulary shipped in
`lxmert_pl/resources/`. The original pipeline (`convert_sents_to_features`) is reproduced:
strip, WordPiece-tokenise, keep the first `max_seq_length - 2` pieces, add `[CLS]`/`[SEP]`,
pad with 0 to `max_seq_length`.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Sequence

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordPiece
from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer

from lxmert_pl.errors import UserInputError

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
DEFAULT_MAX_SEQ_LENGTH = 20


def default_vocab_path() -> Path:
    return Path(str(resources.files("lxmert_pl") / "resources" / "bert-base-uncased-vocab.txt"))


def _read_vocab(path: Path) -> dict[str, int]:
    with open(path, encoding="utf-8") as f:
        return {line.rstrip("\n"): i for i, line in enumerate(f)}


class LxmertTokenizer:
    """Sentences -> `input_ids`, `attention_mask`, `token_type_ids` (LongTensors, shape [B, max_seq_length]).

    An empty or whitespace-only sentence is a ValueError naming its position.
    """

    def __init__(self, vocab_path: str | Path | None = None, max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH):
        if max_seq_length < 3:
            raise UserInputError(f"max_seq_length must be >= 3 (room for [CLS], one token, [SEP]), got {max_seq_length}")
        self.vocab_path = Path(vocab_path) if vocab_path else default_vocab_path()
        self.vocab = _read_vocab(self.vocab_path)
        self.max_seq_length = max_seq_length
        tok = Tokenizer(WordPiece(self.vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        tok.normalizer = BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=True, lowercase=True)
        tok.pre_tokenizer = BertPreTokenizer()
        # Upper-case special tokens written literally in a sentence stay single tokens, as in the original.
        tok.add_special_tokens(SPECIAL_TOKENS)
        self._tok = tok
        self.pad_id = self.vocab["[PAD]"]
        self.cls_id = self.vocab["[CLS]"]
        self.sep_id = self.vocab["[SEP]"]

    def tokenize(self, sentence: str) -> list[str]:
        """WordPiece tokens of one sentence (no [CLS]/[SEP], no truncation)."""
        return self._tok.encode(sentence.strip(), add_special_tokens=False).tokens

    def encode_ids(self, sentences: Sequence[str]) -> list[list[int]]:
        """Token ids with [CLS]/[SEP], truncated, unpadded."""
        for i, s in enumerate(sentences):
            if not isinstance(s, str) or not s.strip():
                raise UserInputError(f"sentence #{i} is empty or whitespace-only: {s!r}")
        encs = self._tok.encode_batch([s.strip() for s in sentences], add_special_tokens=False)
        keep = self.max_seq_length - 2
        return [[self.cls_id] + e.ids[:keep] + [self.sep_id] for e in encs]

    def __call__(self, sentences: Sequence[str]) -> dict[str, torch.Tensor]:
        if isinstance(sentences, str):
            sentences = [sentences]
        ids = self.encode_ids(sentences)
        n, length = len(ids), self.max_seq_length
        input_ids = torch.full((n, length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((n, length), dtype=torch.long)
        for i, row in enumerate(ids):
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, : len(row)] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": torch.zeros_like(input_ids),
        }
