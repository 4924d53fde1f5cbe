"""Load sentence-image pair files as `Pair` records.

Formats, recognised by content (first non-blank character) and extension:

* JSON list of pairs, the research fork's `matching_val.json`/`matching_test.json`:
  `{"question_id", "img_id", "sent", "ground": "True"|"False", "label": {answer: score}, ...}`. The matching label
  comes from `ground`; the VQA `label` dict and every other field are kept in `Pair.extra`.
* JSON Lines (`.jsonl`/`.ndjson`, or any file whose first character is `{`): one such object per line.
* CSV with a header row (`.csv`, or any other content): columns `img_id`, `sent`, optional `label`,
  `question_id`; other columns go to `Pair.extra`.
* LXMERT caption files (`mscoco_minival.json` style): a JSON list of `{"img_id", "sentf": {source: [sentences]}}`;
  every sentence of `caption_source` (default "mscoco") becomes a positive pair (label 1).

A label is 1 (matched) or 0 (not matched): 1/0, true/false, "1"/"0", "true"/"false" in any case; a missing or
empty label is None (unknown). `question_id` is taken from the file, else it is the pair's index.

Retrieval sets (`read_captions`: images, their captions, which caption describes which image) come from the same
files and from Karpathy split files (`dataset_coco.json`, `dataset_flickr30k.json`:
`{"images": [{"filename", "split", "sentences": [{"raw"}]}]}`, img_id = the file name without extension); see
`read_captions`.

Errors (`PairFileError`) name the file and the line or pair index: non-UTF-8 bytes, invalid JSON, a missing
`img_id`/`sent`, an empty or whitespace-only sentence, a label that is not one of the above.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lxmert_pl.errors import UserInputError

_JSON_LINES_SUFFIXES = {".jsonl", ".ndjson"}
_TRUE_LABELS = {"1", "true"}
_FALSE_LABELS = {"0", "false"}


class PairFileError(UserInputError):
    """A pair file is malformed; the message names the file and the line or pair index."""


@dataclass
class Pair:
    """One sentence-image pair."""

    index: int  # position in the file's pair list (0-based)
    question_id: int | str  # from the file, else = index
    img_id: str
    sent: str
    label: int | None  # 1 = matched ("True"), 0 = not matched, None = unknown
    extra: dict = field(default_factory=dict)  # other fields carried over (answer_type, ...)


def load_pairs(path: str | Path, *, caption_source: str = "mscoco") -> list[Pair]:
    """Read a pair file in any of the formats in this module's docstring (at least one pair)."""
    path = Path(path)
    pairs = _read_pairs(path, caption_source)
    if not pairs:
        raise PairFileError(f"{path}: the file holds no pairs")
    return pairs


def _read_pairs(path: Path, caption_source: str) -> list[Pair]:
    text = _read_utf8(path)
    first_char = text.lstrip()[:1]
    if not first_char:
        raise PairFileError(f"{path}: the pair file is empty")
    if first_char == "[":
        entries = _parse_json_list(path, text)
        if entries and isinstance(entries[0], dict) and "sentf" in entries[0]:
            return _caption_pairs(path, entries, caption_source)
        return [_pair_from_record(path, entry, index, None) for index, entry in enumerate(entries)]
    if first_char == "{" and _is_one_json_object(text):
        raise PairFileError(f"{path}: a single JSON object spread over several lines; expected a JSON list of pairs "
                            "[{...}, ...] or JSON Lines (one pair object per line)")
    if first_char == "{" or path.suffix.lower() in _JSON_LINES_SUFFIXES:
        return _pairs_from_records(path, _iter_json_lines(path, text))
    return _pairs_from_records(path, _iter_csv_records(path, text))


def _is_one_json_object(text: str) -> bool:
    """True when the whole text is one JSON object written over several lines (valid JSON, not JSON Lines)."""
    if text.strip().count("\n") == 0:
        return False
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _read_utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line_no = data.count(b"\n", 0, err.start) + 1
        raise PairFileError(
            f"{path}:{line_no}: not valid UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start}); "
            "pair files must be UTF-8"
        ) from None


def _parse_json_list(path: Path, text: str) -> list:
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as err:
        raise PairFileError(f"{path}:{err.lineno}:{err.colno}: invalid JSON ({err.msg})") from None
    if not isinstance(entries, list):
        raise PairFileError(f"{path}: expected a JSON list of pairs, found {type(entries).__name__}")
    return entries


def _iter_json_lines(path: Path, text: str) -> Iterable[tuple[int, Any]]:
    for line_no, line in enumerate(text.split("\n"), start=1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            yield line_no, json.loads(line)
        except json.JSONDecodeError as err:
            raise PairFileError(
                f"{path}:{line_no}:{err.colno}: invalid JSON ({err.msg}); JSON Lines need one object per line"
            ) from None


def _iter_csv_records(path: Path, text: str) -> Iterable[tuple[int, Any]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = reader.fieldnames or []
    missing = [name for name in ("img_id", "sent") if name not in columns]
    if missing:
        raise PairFileError(f"{path}:1: CSV header {columns} lacks column(s) {missing}")
    for record in reader:
        if None in record or None in record.values():
            raise PairFileError(f"{path}:{reader.line_num}: expected {len(columns)} columns ({', '.join(columns)})")
        yield reader.line_num, record


def _pairs_from_records(path: Path, records: Iterable[tuple[int, Any]]) -> list[Pair]:
    return [_pair_from_record(path, record, index, line_no) for index, (line_no, record) in enumerate(records)]


def _pair_from_record(path: Path, record: Any, index: int, line_no: int | None) -> Pair:
    where = f"{path}:{line_no}: pair #{index}" if line_no is not None else f"{path}: pair #{index}"
    if not isinstance(record, dict):
        raise PairFileError(f"{where}: expected an object with img_id and sent, found {type(record).__name__}")
    for name in ("img_id", "sent"):
        if name not in record:
            raise PairFileError(f"{where}: no {name!r} field (fields: {sorted(record)})")
    label, label_field = _matching_label(record, where)
    consumed = {"question_id", "img_id", "sent", "ground", label_field}
    extra = {key: value for key, value in record.items() if key not in consumed}
    return Pair(
        index=index,
        question_id=_question_id(record.get("question_id"), index),
        img_id=_img_id(record["img_id"], where),
        sent=_sentence(record["sent"], where),
        label=label,
        extra=extra,
    )


def _matching_label(record: dict, where: str) -> tuple[int | None, str | None]:
    """The matching label and the field it came from: `ground` if present, else a scalar `label`."""
    if "ground" in record:
        return _parse_label(record["ground"], "ground", where), "ground"
    if "label" in record and not isinstance(record["label"], (dict, list)):
        return _parse_label(record["label"], "label", where), "label"
    return None, None


def _parse_label(value: Any, name: str, where: str) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return int(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE_LABELS | _FALSE_LABELS:
        return 1 if value.strip().lower() in _TRUE_LABELS else 0
    raise PairFileError(f'{where}: {name} {value!r} is not a matching label (1/0, true/false, "True"/"False")')


def _question_id(value: Any, index: int) -> int | str:
    if value is None or value == "":
        return index
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return value


def _img_id(value: Any, where: str) -> str:
    img_id = str(value).strip() if value is not None else ""
    if not img_id:
        raise PairFileError(f"{where}: empty img_id")
    return img_id


def _sentence(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PairFileError(f"{where}: empty or whitespace-only sentence {value!r}")
    return value


def _caption_text(value: Any, where: str, skip_blank: bool) -> str | None:
    """A caption's text; a blank one is an error naming `where`, or None (a skip the caller counts) with
    `skip_blank`."""
    if isinstance(value, str) and value.strip():
        return value
    if skip_blank and (value is None or isinstance(value, str)):
        return None
    raise PairFileError(f"{where}: empty or whitespace-only caption {value!r}"
                        + ("" if skip_blank else " (retrieval.skip_blank=true skips such captions and counts them)"))


def _iter_lxmert_captions(path: Path, entries: list, caption_source: str):
    """(img_id, sentence_index, raw sentence, where) for every `caption_source` sentence of an LXMERT caption file,
    checking each entry's shape; images without that source are left out; none at all is an error."""
    sources_seen: set[str] = set()
    found = False
    for entry_index, entry in enumerate(entries):
        where = f"{path}: entry #{entry_index}"
        if not isinstance(entry, dict) or not isinstance(entry.get("sentf"), dict) or "img_id" not in entry:
            raise PairFileError(f"{where}: expected {{'img_id': ..., 'sentf': {{source: [sentences]}}}}")
        sources_seen.update(entry["sentf"])
        img_id = _img_id(entry["img_id"], where)
        for sentence_index, sentence in enumerate(entry["sentf"].get(caption_source) or []):
            found = True
            yield img_id, sentence_index, sentence, f"{where} ({img_id}), {caption_source} sentence #{sentence_index}"
    if entries and not found:
        raise PairFileError(
            f"{path}: no sentences of source {caption_source!r}; sources in this file: {sorted(sources_seen)}"
        )


def _caption_pairs(path: Path, entries: list, caption_source: str) -> list[Pair]:
    """One positive pair per sentence of `caption_source` (see `_iter_lxmert_captions`)."""
    pairs: list[Pair] = []
    for img_id, sentence_index, sentence, where in _iter_lxmert_captions(path, entries, caption_source):
        index = len(pairs)
        pairs.append(Pair(index=index, question_id=index, img_id=img_id,
                          sent=_sentence(sentence, f"{where} (pair #{index})"), label=1,
                          extra={"source": caption_source, "sentence_index": sentence_index}))
    return pairs


@dataclass
class CaptionSet:
    """A retrieval set: images, captions, and the image each caption describes.

    `caption_image[j]` is the index (into `img_ids`) of caption j's image; an image may have no caption (it is then
    a candidate for text -> image retrieval but not a query). `skipped_blank` counts the blank captions left out
    when the caller asked to skip them; `source` says where the set came from (file, format, split).
    """

    img_ids: list[str]
    sentences: list[str]
    caption_image: list[int]
    source: str = ""
    skipped_blank: int = 0

    @property
    def num_images(self) -> int:
        return len(self.img_ids)

    @property
    def num_captions(self) -> int:
        return len(self.sentences)

    def captions_of(self) -> dict[int, set[int]]:
        """Image index -> indices of its captions (images without captions left out)."""
        gt: dict[int, set[int]] = {}
        for caption, image in enumerate(self.caption_image):
            gt.setdefault(image, set()).add(caption)
        return gt

    def without_images(self, drop: set[str]) -> "CaptionSet":
        """The set without the images `drop` names and their captions (indices renumbered, order kept)."""
        keep = [i for i, img_id in enumerate(self.img_ids) if img_id not in drop]
        new_index = {old: new for new, old in enumerate(keep)}
        kept = [(s, new_index[i]) for s, i in zip(self.sentences, self.caption_image) if i in new_index]
        return CaptionSet([self.img_ids[i] for i in keep], [s for s, _ in kept], [i for _, i in kept], self.source,
                          self.skipped_blank)


class _CaptionBuilder:
    """Accumulates images (in first-seen order) and their captions."""

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.sentences: list[str] = []
        self.caption_image: list[int] = []
        self.skipped_blank = 0

    def image(self, img_id: str) -> int:
        return self.index.setdefault(img_id, len(self.index))

    def caption(self, image: int, text: str | None) -> None:
        if text is None:
            self.skipped_blank += 1
            return
        self.sentences.append(text)
        self.caption_image.append(image)

    def build(self, path: Path, source: str) -> CaptionSet:
        if not self.sentences:
            raise PairFileError(f"{path}: no captions ({source})")
        return CaptionSet(list(self.index), self.sentences, self.caption_image, source, self.skipped_blank)


def read_captions(
    path: str | Path, *, split: str | None = None, caption_source: str = "mscoco", skip_blank: bool = False
) -> CaptionSet:
    """The retrieval set of a caption file, recognised by content:

    * Karpathy split file (a JSON object with `images`): the images of `split` (e.g. "test"; None = all) with their
      `sentences[].raw`; img_id = `filename` without its extension (COCO_val2014_000000391895, 1000092795);
    * LXMERT caption file (a JSON list of `{"img_id", "sentf": {source: [captions]}}`): the `caption_source`
      captions; images without them are left out;
    * pair file (any `load_pairs` format): every image named by a pair; the captions are the sentences of the pairs
      labelled 1 (matched), or of every pair when the file has no labels.

    A blank caption is a `PairFileError` naming the file and the entry, unless `skip_blank` (then it is counted in
    `skipped_blank`). `split` is only meaningful for Karpathy files.
    """
    path = Path(path)
    text = _read_utf8(path)
    first_char = text.lstrip()[:1]
    builder = _CaptionBuilder()
    if first_char == "{" and path.suffix.lower() not in _JSON_LINES_SUFFIXES:
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # JSON Lines under another suffix (or broken JSON): the pair reader below names the line
        if isinstance(data, dict) and "images" in data:
            return _karpathy_captions(path, data, split, skip_blank, builder)
    if split is not None:
        raise PairFileError(f"{path}: --split {split!r} applies to Karpathy split files (dataset_coco.json, "
                            "dataset_flickr30k.json) only; this file is not one")
    if first_char == "[":
        entries = _parse_json_list(path, text)
        if entries and isinstance(entries[0], dict) and "sentf" in entries[0]:
            return _lxmert_captions(path, entries, caption_source, skip_blank, builder)
    pairs = load_pairs(path, caption_source=caption_source)
    labelled = any(p.label is not None for p in pairs)
    for pair in pairs:
        image = builder.image(pair.img_id)
        if pair.label == 1 or not labelled:
            builder.caption(image, pair.sent)
    return builder.build(path, f"pair file {path}" + (", matched pairs" if labelled else ""))


def _karpathy_captions(path: Path, data: dict, split: str | None, skip_blank: bool,
                       builder: _CaptionBuilder) -> CaptionSet:
    images = data["images"]
    if not isinstance(images, list):
        raise PairFileError(f"{path}: 'images' must be a list of {{'filename', 'split', 'sentences'}}")
    splits: dict[str, int] = {}
    first_entry: dict[str, int] = {}  # img_id -> its first images[] entry
    duplicates: list[str] = []
    for number, entry in enumerate(images):
        where = f"{path}: images[{number}]"
        if not isinstance(entry, dict) or "filename" not in entry or not isinstance(entry.get("sentences"), list):
            raise PairFileError(f"{where}: expected {{'filename', 'split', 'sentences': [{{'raw'}}]}}")
        entry_split = str(entry.get("split", ""))
        splits[entry_split] = splits.get(entry_split, 0) + 1
        if split is not None and entry_split != split:
            continue
        img_id = _img_id(Path(str(entry["filename"])).stem, where)
        if img_id in first_entry:
            duplicates.append(f"{img_id} (images[{first_entry[img_id]}] and images[{number}])")
        first_entry.setdefault(img_id, number)
        where = f"{where} ({entry['filename']})"
        image = builder.image(img_id)
        for number_s, sentence in enumerate(entry["sentences"]):
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            builder.caption(image, _caption_text(raw, f"{where}, sentences[{number_s}].raw", skip_blank))
    if duplicates:  # merging them silently would change what recall counts as the query's image
        shown = "; ".join(duplicates[:5]) + (f" and {len(duplicates) - 5} more" if len(duplicates) > 5 else "")
        raise PairFileError(f"{path}: {len(duplicates)} images appear in more than one entry: {shown}. A Karpathy "
                            "file lists each image once with all its sentences: fix the file")
    if not builder.index:
        raise PairFileError(f"{path}: no image of split {split!r}; splits in this file: "
                            + ", ".join(f"{name} ({count})" for name, count in sorted(splits.items())))
    return builder.build(path, f"Karpathy file {path}, split {split or 'all'}")


def _lxmert_captions(path: Path, entries: list, caption_source: str, skip_blank: bool,
                     builder: _CaptionBuilder) -> CaptionSet:
    for img_id, _, sentence, where in _iter_lxmert_captions(path, entries, caption_source):
        builder.caption(builder.image(img_id), _caption_text(sentence, where, skip_blank))
    return builder.build(path, f"LXMERT caption file {path}, source {caption_source}")
