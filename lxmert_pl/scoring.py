"""Score sentence–image pairs with LXMERT from plain Python (no Lightning needed).

    from lxmert_pl.scoring import Scorer
    scorer = Scorer.from_checkpoint("checkpoints/model_LXRT.pth")
    result = scorer.score(["a dog on a couch"], features, boxes)   # features [B, N, 2048], boxes normalised [B, N, 4]
    result.match_prob   # P(matched) = softmax(match_logits)[:, 1]   (logit index 1 means "matched")
    result.cosine       # max over boxes of cos(vision output, pooled output): the seed's "cos" score

Two ways to run the model over a batch of pairs:

* pairwise (`forward_pairs`): every pair through the whole model;
* factorized (`forward_factorized`): the language layers once per unique sentence, the object-relationship layers
  once per unique image, and only the cross-modality layers and heads per pair. Same outputs (up to float
  rounding); used automatically when a batch repeats sentences or images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from lxmert_pl.errors import UserInputError
from lxmert_pl.model.heads import LxmertMatchingModel, MatchingOutput
from lxmert_pl.model.loading import LxrtLoadReport, load_lxmert
from lxmert_pl.model.lxrt import EncodedImage, EncodedText
from lxmert_pl.tokenizer import LxmertTokenizer

SCORE_MODES = ("itm", "cosine")
# Inference precisions: the model's weights are cast to this dtype once; scores always come back in float32.
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def precision_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a precision name ("fp32" | "bf16")."""
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise UserInputError(f"unknown precision {precision!r}; valid: {sorted(PRECISIONS)}") from None


@dataclass
class ScoreResult:
    match_logits: np.ndarray | None  # [B, 2]; index 1 = matched; None without a matching head
    match_prob: np.ndarray | None  # [B] softmax(match_logits)[:, 1]
    cosine: np.ndarray  # [B]

    def scores(self, mode: str) -> np.ndarray:
        if mode == "itm":
            if self.match_prob is None:
                raise RuntimeError("no matching head: use mode 'cosine'")
            return self.match_prob
        if mode == "cosine":
            return self.cosine
        raise UserInputError(f"unknown score mode {mode!r}; valid: {SCORE_MODES}")


def _first_positions(keys: Sequence) -> list[int]:
    seen: dict = {}
    for i, key in enumerate(keys):
        seen.setdefault(key, i)
    return list(seen.values())


def _kept_columns(mask: torch.Tensor | None) -> int | None:
    """1 + the last column of a [B, L] mask that is real (1) in some row; None when no column can go."""
    if mask is None or mask.shape[1] <= 1:
        return None
    real = mask.bool().any(dim=0).nonzero()
    keep = int(real.max()) + 1 if len(real) else 1
    return keep if keep < mask.shape[1] else None


def trim_padding(batch: dict) -> dict:
    """The batch without the token columns and box slots that are padding in EVERY row (tokenizers pad every
    sentence to max_seq_length; batches pad to the largest box count). Exact: a masked key gets a -10000 bias,
    whose softmax weight exp(-10000 - max) is 0.0 in float32, so real positions see the same sums; only
    `lang_output` / `visn_output` lose their all-padding positions."""
    out = dict(batch)
    tokens = _kept_columns(batch.get("attention_mask"))
    if tokens is not None:
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            if out.get(key) is not None:
                out[key] = out[key][:, :tokens]
    boxes = _kept_columns(batch.get("box_mask"))
    if boxes is not None:
        for key in ("features", "boxes", "box_mask"):
            out[key] = out[key][:, :boxes]
    return out


def forward_pairs(model: LxmertMatchingModel, batch: dict, scores: tuple[str, ...] | None = None) -> MatchingOutput:
    """Whole model per pair. `batch` holds input_ids, attention_mask, token_type_ids, features, boxes, box_mask.
    All-padding columns are trimmed first (`trim_padding`); `scores`: see `LxmertMatchingModel.forward`."""
    batch = trim_padding(batch)
    return model(batch["input_ids"], batch["attention_mask"], batch["features"], batch["boxes"],
                 batch.get("box_mask"), batch.get("token_type_ids"), scores=scores)


def forward_factorized(
    model: LxmertMatchingModel, batch: dict, text_keys: Sequence, image_keys: Sequence,
    scores: tuple[str, ...] | None = None,
) -> MatchingOutput:
    """Single-modality encoders once per distinct text / image key, cross layers per pair.

    `text_keys[i]` / `image_keys[i]` identify pair i's sentence and image (e.g. token-id tuples and img_ids);
    rows with equal keys must carry equal inputs. All-padding columns are trimmed first (`trim_padding`).
    """
    batch = trim_padding(batch)
    text_rows = _first_positions(text_keys)
    image_rows = _first_positions(image_keys)
    text_index = _inverse(text_keys)
    image_index = _inverse(image_keys)
    bert = model.bert
    text = bert.encode_text(batch["input_ids"][text_rows], batch["attention_mask"][text_rows],
                            None if batch.get("token_type_ids") is None else batch["token_type_ids"][text_rows])
    box_mask = batch.get("box_mask")
    image = bert.encode_image(batch["features"][image_rows], batch["boxes"][image_rows],
                              None if box_mask is None else box_mask[image_rows])
    pair_text = EncodedText(text.hidden[text_index], None if text.bias is None else text.bias[text_index])
    pair_image = EncodedImage(
        image.hidden[image_index],
        None if image.bias is None else image.bias[image_index],
        None if image.mask is None else image.mask[image_index],
    )
    return model.score_cross(pair_text, pair_image, scores)


def _inverse(keys: Sequence) -> torch.Tensor:
    first: dict = {}
    return torch.tensor([first.setdefault(k, len(first)) for k in keys], dtype=torch.long)


def batch_keys(batch: dict) -> tuple[list, list]:
    """Text keys (token ids) and image keys (img_id when given, else the row) of a collated batch."""
    ids = batch["input_ids"].tolist()
    mask = batch["attention_mask"].tolist()
    text_keys = [tuple(i for i, m in zip(row, mrow) if m) for row, mrow in zip(ids, mask)]
    image_keys = list(batch["img_id"]) if "img_id" in batch else list(range(len(ids)))
    return text_keys, image_keys


def forward_batch(model: LxmertMatchingModel, batch: dict, factorize: str = "auto",
                  scores: tuple[str, ...] | None = None) -> MatchingOutput:
    """Pairwise or factorized forward. `factorize`: "auto" (when a sentence or image repeats), "always", "never";
    `scores`: see `LxmertMatchingModel.forward`."""
    if factorize not in ("auto", "always", "never"):
        raise UserInputError(f"factorize must be auto|always|never, got {factorize!r}")
    check_feature_width(model, batch["features"], batch["img_id"][0] if batch.get("img_id") else "?")
    if factorize == "never":
        return forward_pairs(model, batch, scores)
    text_keys, image_keys = batch_keys(batch)
    repeats = len(set(text_keys)) < len(text_keys) or len(set(image_keys)) < len(image_keys)
    if factorize == "always" or repeats:
        return forward_factorized(model, batch, text_keys, image_keys, scores)
    return forward_pairs(model, batch, scores)


def check_feature_width(model: LxmertMatchingModel, features: torch.Tensor | np.ndarray, img_id: str = "?") -> None:
    """UserInputError when region features (..., D) are not as wide as the model's visual input; `img_id`: an
    image they come from, for the message."""
    expected, got = model.config.visual_feat_dim, int(np.shape(features)[-1])
    if got != expected:
        raise UserInputError(f"the features are {got} wide (img_id {img_id!r}), the model expects "
                             f"visual_feat_dim={expected}: features from another detector, or another model config?")


def pad_boxes(
    features: Sequence[np.ndarray | torch.Tensor], boxes: Sequence[np.ndarray | torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack per-pair arrays with different box counts: (features [B,N,D], boxes [B,N,4], box_mask [B,N])."""
    counts = [len(b) for b in boxes]
    n, dim = max(counts), int(np.shape(features[0])[-1])
    out_f = torch.zeros(len(counts), n, dim)
    out_b = torch.zeros(len(counts), n, 4)
    mask = torch.zeros(len(counts), n, dtype=torch.long)
    for i, (f, b, c) in enumerate(zip(features, boxes, counts)):
        out_f[i, :c] = torch.tensor(np.asarray(f), dtype=torch.float32)
        out_b[i, :c] = torch.tensor(np.asarray(b), dtype=torch.float32)
        mask[i, :c] = 1
    return out_f, out_b, mask


def _pair_inputs(sentences: Sequence[str], features, boxes, box_mask) -> tuple:
    """`Scorer.score`'s inputs as float32 tensors (features, boxes) and a mask (or None): lists of per-pair arrays
    are padded and masked; the three lengths must agree."""
    if len(sentences) != len(features) or len(features) != len(boxes):
        raise ValueError(f"got {len(sentences)} sentences, {len(features)} feature sets, {len(boxes)} box sets")
    if isinstance(features, (list, tuple)):
        features, boxes, box_mask = pad_boxes(features, boxes)
    features = torch.as_tensor(np.asarray(features) if not torch.is_tensor(features) else features, dtype=torch.float32)
    boxes = torch.as_tensor(np.asarray(boxes) if not torch.is_tensor(boxes) else boxes, dtype=torch.float32)
    if box_mask is not None:
        box_mask = torch.as_tensor(np.asarray(box_mask) if not torch.is_tensor(box_mask) else box_mask)
    return features, boxes, box_mask


class Scorer:
    """Scores pairs with a loaded model; batches internally; never needs Lightning.

    `precision`: "fp32" or "bf16" casts the model IN PLACE, once, here (`model.to(device, dtype)`); None keeps its
    dtype. Inputs are cast at the model's boundary (`LxrtModel.encode_image`, the embeddings) and probabilities /
    cosines come back in float32.
    """

    def __init__(
        self,
        model: LxmertMatchingModel,
        tokenizer: LxmertTokenizer | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 32,
        report: LxrtLoadReport | None = None,
        precision: str | None = None,
    ):
        self.model = model.eval().to(device=device, dtype=None if precision is None else precision_dtype(precision))
        self.tokenizer = tokenizer or LxmertTokenizer()
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.report = report

    @classmethod
    def from_checkpoint(cls, path: str, model_config: str | None = None, require_matching: bool = False, **kwargs):
        model, report = load_lxmert(path, model_config=model_config, require=("matching",) if require_matching else ())
        return cls(model, report=report, **kwargs)

    @torch.no_grad()
    def score(
        self,
        sentences: Sequence[str],
        features: np.ndarray | torch.Tensor | Sequence,
        boxes: np.ndarray | torch.Tensor | Sequence,
        box_mask: np.ndarray | torch.Tensor | None = None,
    ) -> ScoreResult:
        """Score pair i = (sentences[i], features[i], boxes[i]).

        `features`/`boxes`: arrays [B, N, D] / [B, N, 4] (boxes normalised to [0, 1]) with an optional `box_mask`
        [B, N] (1 = real box), or lists of per-pair arrays with different box counts (padded and masked here).
        """
        features, boxes, box_mask = _pair_inputs(sentences, features, boxes, box_mask)
        tokens = self.tokenizer(list(sentences))
        logits, probs, cosines = [], [], []
        for start in range(0, len(sentences), self.batch_size):
            part = slice(start, start + self.batch_size)
            batch = {k: v[part].to(self.device) for k, v in tokens.items()}
            batch.update(features=features[part].to(self.device), boxes=boxes[part].to(self.device))
            batch["box_mask"] = None if box_mask is None else box_mask[part].to(self.device)
            out = forward_pairs(self.model, batch, scores=SCORE_MODES)
            cosines.append(out.cosine.float().cpu())
            if out.match_logits is not None:
                logits.append(out.match_logits.float().cpu())
                probs.append(out.match_prob.float().cpu())
        return ScoreResult(
            match_logits=torch.cat(logits).numpy() if logits else None,
            match_prob=torch.cat(probs).numpy() if probs else None,
            cosine=torch.cat(cosines).numpy(),
        )

    @torch.no_grad()
    def explain(
        self,
        sentences: Sequence[str],
        features: np.ndarray | torch.Tensor | Sequence,
        boxes: np.ndarray | torch.Tensor | Sequence,
        box_mask: np.ndarray | torch.Tensor | None = None,
    ) -> list[np.ndarray]:
        """Per pair, the weight of each REAL box in the last cross layer's attention from the first token (mean over
        heads; sums to 1): see `lxmert_pl.explain`. Same inputs as `score`; a separate pass, for the few pairs shown.
        """
        from lxmert_pl.explain import explain_batch

        features, boxes, box_mask = _pair_inputs(sentences, features, boxes, box_mask)
        if box_mask is None:
            box_mask = torch.ones(features.shape[:2], dtype=torch.long)
        tokens = self.tokenizer(list(sentences))
        out: list[np.ndarray] = []
        for start in range(0, len(sentences), self.batch_size):
            part = slice(start, start + self.batch_size)
            batch = {k: v[part].to(self.device) for k, v in tokens.items()}
            batch.update(features=features[part].to(self.device), boxes=boxes[part].to(self.device),
                         box_mask=box_mask[part].to(self.device))
            weights = explain_batch(self.model, batch).float().cpu().numpy()
            real = box_mask[part].bool().numpy()
            out += [row[keep] for row, keep in zip(weights, real)]
        return out


__all__ = ["Scorer", "ScoreResult", "forward_batch", "forward_pairs", "forward_factorized", "pad_boxes",
           "SCORE_MODES", "PRECISIONS", "precision_dtype", "trim_padding"]
