"""Model cards (`README.md`) for LXMERT matchers: what the weights are, how they were made, what they expect.

A card is rendered from a `ModelCard`; the data travels inside the card as a JSON comment at its end, so a later
step can rebuild it (the export reads the card `train.py` wrote next to `best.ckpt`). Evaluations live in their own
region (`<!-- lxmert_pl:evaluation ... -->` ... `<!-- /lxmert_pl:evaluation -->`) that `add_evaluation` updates in
place, one entry per evaluation name: in our cards and in any other README (the region is appended there), leaving
the rest of the file as it is.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from lxmert_pl import MATCHED_INDEX
from lxmert_pl.errors import UserInputError
from lxmert_pl.fileio import write_atomically
from lxmert_pl.model.heads import LxmertMatchingModel
from lxmert_pl.model.loading import HF_WEIGHT_FILES
from lxmert_pl.registry import ResolvedCheckpoint, sha256_file
from lxmert_pl.tokenizer import DEFAULT_MAX_SEQ_LENGTH

CARD_FILE = "README.md"
_DATA_RE = re.compile(r"\n?<!-- lxmert_pl:card-data\n(.*?)\n-->\n?", re.S)
_EVAL_RE = re.compile(r"<!-- lxmert_pl:evaluation\n(.*?)\n-->.*?<!-- /lxmert_pl:evaluation -->", re.S)
# What the released LXMERT was trained on; the default of a card's feature description.
STANDARD_DETECTOR = ("bottom-up-attention Faster R-CNN, ResNet-101, Visual Genome 1600 objects / 400 attributes "
                     "(original caffe model; `frcnn-vg-finetuned` is its Hugging Face port)")


class ModelCardError(UserInputError):
    """A card file that cannot be read or updated (names the file)."""


@dataclass
class FeatureSpec:
    """The visual features the model expects: which detector, its proposal geometry, how many boxes per image."""

    detector: str = STANDARD_DETECTOR
    geometry: str = "caffe (the original extraction); the HF port's geometry gives slightly different boxes"
    boxes: str = "36 per image (obj36); adaptive 10-100 per image also works"
    feature_dim: int = 2048
    note: str | None = None  # e.g. that the run did not record which detector made its feature files


@dataclass
class TrainingSummary:
    """What a `train.py` run fine-tuned on and reached."""

    base_checkpoint: str  # the starting weights (alias / hf:// reference / path)
    train_pairs: str
    val_pairs: str | None = None
    feature_files: list[str] = field(default_factory=list)
    epochs: int | None = None  # epochs run
    steps: int | None = None  # optimizer steps run
    metrics: dict[str, float] = field(default_factory=dict)  # validation metrics of the best checkpoint's run
    settings: dict[str, Any] = field(default_factory=dict)  # lr, batch size, finetune mode, negatives ...


@dataclass
class EvaluationResult:
    """One evaluation: its name (the run name), the pairs, the protocol (mode, threshold) and the metrics."""

    name: str
    pairs: str
    protocol: str
    metrics: dict[str, float]
    command: str | None = None


@dataclass
class ModelCard:
    """Everything a card says. `source` is the checkpoint the weights were read from, `source_sha256` its digest."""

    title: str
    source: str
    source_sha256: str | None
    heads: list[str]
    config: dict[str, Any]
    max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH
    features: FeatureSpec = field(default_factory=FeatureSpec)
    training: TrainingSummary | None = None
    command: str | None = None  # the command that made these files
    files: list[str] = field(default_factory=list)  # the files the card describes (empty: a checkpoint folder)
    base_model: str | None = None  # a Hub repo id the weights derive from, for the card's metadata

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelCard":
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        values["features"] = FeatureSpec(**data.get("features", {}))
        values["training"] = TrainingSummary(**data["training"]) if data.get("training") else None
        return cls(**values)


# ----------------------------------------------------------------------------------------------- building


def checkpoint_digest(path: str | Path) -> tuple[str, str]:
    """(the file that holds a checkpoint's weights, its sha256): the file itself, or an HF folder's weights file."""
    path = Path(path)
    if path.is_dir():
        path = next((path / name for name in HF_WEIGHT_FILES if (path / name).is_file()), path)
    return str(path), sha256_file(path)


def describe_checkpoint(resolved: ResolvedCheckpoint) -> str:
    """How a card names a checkpoint: its Hub reference, else alias and file, else the file."""
    if resolved.source:
        return resolved.source
    return f"{resolved.alias} ({resolved.path})" if resolved.alias else str(resolved.path)


def card_for_checkpoint(model: LxmertMatchingModel, checkpoint: ResolvedCheckpoint, *, title: str | None = None,
                        max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH, features: FeatureSpec | None = None,
                        training: TrainingSummary | None = None, command: str | None = None) -> ModelCard:
    """A card for `model`, loaded from `checkpoint` (whose weights file is hashed)."""
    weights_file, digest = checkpoint_digest(checkpoint.path)
    hub_repo = checkpoint.source[len("hf://"):].partition("@")[0] if checkpoint.source else None
    base = training.base_checkpoint if training else None
    if base and base.startswith("hf://"):
        hub_repo = base[len("hf://"):].partition("@")[0]
    source = describe_checkpoint(checkpoint)
    if weights_file != str(checkpoint.path):
        source += f" (weights: {Path(weights_file).name})"
    return ModelCard(title=title or f"LXMERT matcher from {Path(checkpoint.path).name}", source=source,
                     source_sha256=digest, heads=list(model.heads), config=model.config.to_dict(),
                     max_seq_length=max_seq_length, features=features or FeatureSpec(), training=training,
                     command=command, base_model=hub_repo)


# ----------------------------------------------------------------------------------------------- rendering


def _json_number(value: Any) -> float:
    """numpy / torch scalars in metrics -> float for JSON."""
    return float(value)


def _number(value: Any) -> str:
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else (f"{int(value)}" if value.is_integer() and abs(value) >= 1 else
                                                f"{value:.4f}")
    return str(value)


def _metrics_table(metrics: dict[str, Any]) -> list[str]:
    return ["| metric | value |", "|---|---|", *(f"| {key} | {_number(value)} |" for key, value in metrics.items())]


def render_card(card: ModelCard, evaluations: list[EvaluationResult] = ()) -> str:
    """The whole README.md: metadata header, sections, the evaluation region, and the card data."""
    meta = ["---", "library_name: transformers", "tags:", "- lxmert", "- image-text-matching", "- lxmert_pl"]
    if card.base_model:
        meta.append(f"base_model: {card.base_model}")
    meta.append("---")
    cfg = card.config
    lines = [*meta, "", f"# {card.title}", "",
             "LXMERT image-text matcher (`transformers.LxmertForPreTraining` layout), made with "
             "lxmert_pl. "
             f"The matching head (`cross_relationship_score`, `cls.seq_relationship`) gives two logits: **index "
             f"{MATCHED_INDEX} = matched**, P(matched) = softmax(logits)[:, {MATCHED_INDEX}].", "",
             "## Source", "",
             f"- checkpoint: `{card.source}`",
             f"- sha256: `{card.source_sha256 or 'not computed'}`",
             f"- heads: {', '.join(card.heads) or 'none'}"
             + ("" if "matching" in card.heads else " (**no matching head**: `cross_relationship_score` is "
                                                    "untrained; score with cosine similarity only)"),
             *([f"- transformers builds the {' and '.join(absent)} head(s) anyway: random there, do not use"]
               if (absent := [h for h in ("matching", "lm") if h not in card.heads]) else []),
             f"- architecture: {cfg.get('l_layers')} language / {cfg.get('x_layers')} cross / "
             f"{cfg.get('r_layers')} vision layers, hidden size {cfg.get('hidden_size')}",
             ""]
    if card.files:
        lines += ["Files: " + ", ".join(f"`{name}`" for name in card.files), ""]
    lines += _training_section(card.training)
    spec = card.features
    lines += ["## Inputs", "",
              f"- text: uncased WordPiece (bert-base-uncased vocabulary), `[CLS] tokens [SEP]`, **max sequence "
              f"length {card.max_seq_length}** (longer captions are cut to their first {card.max_seq_length - 2} "
              f"pieces), padding 0, token type ids 0",
              f"- visual features: {spec.feature_dim}-d region features from {spec.detector}",
              f"- detector geometry: {spec.geometry}",
              f"- boxes: {spec.boxes}; positions normalised (x1, y1, x2, y2) by image width and height",
              *([f"- note: {spec.note}"] if spec.note else []), ""]
    lines += [_evaluation_region(list(evaluations)), ""]
    if card.command:
        lines += ["## How this was made", "", "```", card.command, "```", ""]
    lines += ["## Use", "", "```python",
              "from transformers import AutoTokenizer, LxmertForPreTraining",
              "model = LxmertForPreTraining.from_pretrained(DIR).eval()",
              "tokenizer = AutoTokenizer.from_pretrained(DIR)",
              f"text = tokenizer(captions, padding='max_length', truncation=True, max_length={card.max_seq_length},"
              " return_tensors='pt')",
              "out = model(**text, visual_feats=feats, visual_pos=boxes)",
              f"p_matched = out.cross_relationship_score.softmax(-1)[:, {MATCHED_INDEX}]",
              "```", "", "or with lxmert_pl: `python eval.py --ckpt DIR --pairs PAIRS --features FEATURES`.", ""]
    data = json.dumps(card.to_dict(), indent=1, sort_keys=True, default=_json_number)
    return "\n".join(lines) + f"\n<!-- lxmert_pl:card-data\n{data}\n-->\n"


def _training_section(training: TrainingSummary | None) -> list[str]:
    if training is None:
        return ["## Training", "", "Not fine-tuned by lxmert_pl (the weights are the source checkpoint's).", ""]
    lines = ["## Training", "",
             f"Fine-tuned with lxmert_pl's `train.py` from `{training.base_checkpoint}`.", "",
             f"- training pairs: `{training.train_pairs}`",
             f"- validation pairs: `{training.val_pairs}`" if training.val_pairs else "- no validation pairs",
             f"- feature files: {', '.join(f'`{p}`' for p in training.feature_files) or 'not recorded'}",
             f"- epochs: {training.epochs if training.epochs is not None else 'not recorded'}, "
             f"optimizer steps: {training.steps if training.steps is not None else 'not recorded'}"]
    lines += [f"- {key}: {value}" for key, value in training.settings.items()]
    lines.append("")
    if training.metrics:
        lines += ["Validation metrics (last validation of the run):", "", *_metrics_table(training.metrics), ""]
    return lines


def _evaluation_region(evaluations: list[EvaluationResult]) -> str:
    data = json.dumps([asdict(e) for e in evaluations], indent=1, default=_json_number)
    body = ["## Evaluation", ""]
    if not evaluations:
        body += ["No evaluation recorded yet (`python eval.py --ckpt ... --card THIS_README` adds one).", ""]
    for result in evaluations:
        body += [f"### {result.name}", "", f"- pairs: `{result.pairs}`", f"- protocol: {result.protocol}"]
        if result.command:
            body.append(f"- command: `{result.command}`")
        body += ["", *_metrics_table(result.metrics), ""]
    return f"<!-- lxmert_pl:evaluation\n{data}\n-->\n" + "\n".join(body) + "\n<!-- /lxmert_pl:evaluation -->"


# ----------------------------------------------------------------------------------------------- files


def card_path(dir_or_readme: str | Path) -> Path:
    """`DIR` -> `DIR/README.md`; a file path is taken as is."""
    path = Path(dir_or_readme)
    return path / CARD_FILE if path.is_dir() or not path.suffix else path


def check_card(dir_or_readme: str | Path) -> Path:
    """Before a run whose metrics go into a card: the card's path, or a one-line error when it could not be updated
    afterwards (not UTF-8 text, damaged evaluation data, a read-only file or folder, a missing folder)."""
    path = card_path(dir_or_readme)
    if path.is_dir():
        raise UserInputError(f"--card {path}: a folder, expected a README.md or its folder")
    if path.exists():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise UserInputError(f"--card {path}: not UTF-8 text (byte {err.start}: {err.reason}; a Latin-1 file?): "
                                 "convert it to UTF-8 (e.g. `iconv -f latin1 -t utf-8`), then rerun") from None
        try:
            _read_evaluations(text)
        except (json.JSONDecodeError, TypeError) as err:
            raise ModelCardError(f"{path}: the evaluation data in this card is damaged ({err})") from None
        if not os.access(path, os.W_OK):
            raise PermissionError(13, "--card: the model card is not writable", str(path))
    folder = path.parent
    if not folder.is_dir():
        raise FileNotFoundError(2, "--card: the model card's folder does not exist", str(folder))
    if not os.access(folder, os.W_OK | os.X_OK):  # the card is replaced by a rename inside its folder
        raise PermissionError(13, "--card: the model card's folder is not writable", str(folder))
    return path


def write_model_card(dest: str | Path, card: ModelCard, evaluations: list[EvaluationResult] = ()) -> Path:
    """Write `card` as `dest/README.md` (or to `dest` when it names a file); return the path written."""
    path = card_path(dest)
    write_atomically(path, render_card(card, evaluations))
    return path


def read_model_card(dir_or_readme: str | Path) -> tuple[ModelCard | None, list[EvaluationResult]]:
    """The card data and evaluations of a card lxmert_pl wrote; (None, []) when there is no such card."""
    path = card_path(dir_or_readme)
    if not path.is_file():
        return None, []
    text = path.read_text(encoding="utf-8")
    try:
        match = _DATA_RE.search(text)
        card = ModelCard.from_dict(json.loads(match.group(1))) if match else None
        return card, _read_evaluations(text)
    except (json.JSONDecodeError, TypeError, KeyError) as err:
        raise ModelCardError(f"{path}: the lxmert_pl data in this card is damaged ({err})") from None


def _read_evaluations(text: str) -> list[EvaluationResult]:
    match = _EVAL_RE.search(text)
    return [EvaluationResult(**item) for item in json.loads(match.group(1))] if match else []


def add_evaluation(dir_or_readme: str | Path, result: EvaluationResult) -> Path:
    """Add `result` to a card's Evaluation section, replacing an earlier one of the same name; return the path.

    Works on any README: the evaluation region is appended when the file has none (the file is created when
    missing); the rest of the file is kept as it is.
    """
    path = card_path(dir_or_readme)
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    try:
        evaluations = [e for e in _read_evaluations(text) if e.name != result.name] + [result]
    except (json.JSONDecodeError, TypeError) as err:
        raise ModelCardError(f"{path}: the evaluation data in this card is damaged ({err})") from None
    region = _evaluation_region(evaluations)
    if _EVAL_RE.search(text):
        text = _EVAL_RE.sub(lambda _: region, text, count=1)
    else:
        data = _DATA_RE.search(text)
        at = data.start() if data else len(text)
        text = text[:at].rstrip("\n") + ("\n\n" if text.strip() else "") + region + "\n" + text[at:]
    write_atomically(path, text)  # the user's README: replaced whole, or (disk full, size limit) left as it was
    return path
