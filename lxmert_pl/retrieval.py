"""Image–text retrieval over N images × M captions with factorized LXMERT scoring.

Only LXRT's cross-modality layers depend on the pairing, so every caption goes through the language layers once
and every image through the object-relationship layers once (`encode_set`); the cross layers and heads then run
per (image, caption) pair, in chunks of `batch_size` pairs.

    from lxmert_pl.retrieval import retrieve
    result = retrieve(model, tokenizer, sentences, features, boxes, gt, k=128)
    result.metrics   # i2t_R@1/5/10, t2i_R@1/5/10 (percent), RSUM

Two ways to rank:

* full grid (`k=None`): the matching head scores every image against every caption;
* two stages (`k` given, the LAVIS protocol): a cheap first-stage score (`first_stage_scores`, no cross layers)
  keeps the top-k captions per image and the top-k images per caption; only those pairs are re-ranked by the
  matching head and every pruned candidate scores -inf. When k covers all candidates this is the full grid,
  bit for bit.

Command line (LXMERT caption file + detector features):

    python -m lxmert_pl.retrieval --ckpt model_LXRT.pth --captions captions_val.json \\
        --features val2014_obj36.tsv --k 128 --out runs/retrieval
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lxmert_pl.model.heads import LxmertMatchingModel, MatchingOutput
from lxmert_pl.model.lxrt import EncodedImage, EncodedText
from lxmert_pl.scoring import PRECISIONS, SCORE_MODES, pad_boxes, precision_dtype
from lxmert_pl.tokenizer import LxmertTokenizer

RECALL_AT = (1, 5, 10)
DEFAULT_BATCH_SIZE = 64


@dataclass
class EncodedSet:
    """Every caption and every image of a retrieval set after the pairing-independent stages.

    `text`: [M, L, H] after the language layers; `image`: [N, B, H] after the object-relationship layers, all
    images padded to the largest box count B (`image.mask` 1 = real box).
    """

    text: EncodedText
    image: EncodedImage

    @property
    def num_images(self) -> int:
        return int(self.image.hidden.shape[0])

    @property
    def num_captions(self) -> int:
        return int(self.text.hidden.shape[0])


@dataclass
class RetrievalResult:
    """Score matrices [num_images, num_captions] and the recalls they give.

    `i2t_scores[i]` ranks the captions for image i, `t2i_scores[:, j]` the images for caption j; both are the same
    full grid without a first stage. Pruned candidates score -inf. `first_stage` is None without a first stage.
    """

    i2t_scores: torch.Tensor
    t2i_scores: torch.Tensor
    first_stage: torch.Tensor | None
    num_pairs_scored: int
    metrics: dict[str, float]


def _prepare(model: LxmertMatchingModel, device: str | torch.device, dtype: torch.dtype | None) -> None:
    """Eval mode on `device`; with `dtype`, the weights are cast IN PLACE (a no-op when they already are)."""
    model.eval().to(device=device, dtype=dtype)


def _check_inputs(sentences: Sequence[str], features: Sequence[np.ndarray], boxes: Sequence[np.ndarray]) -> None:
    if len(features) != len(boxes):
        raise ValueError(f"got {len(features)} feature arrays but {len(boxes)} box arrays")
    if not sentences or not features:
        raise ValueError(f"retrieval needs at least one caption and one image, got {len(sentences)} and "
                         f"{len(features)}")


def _pad_boxes_to(tensor: torch.Tensor, num_boxes: int) -> torch.Tensor:
    """Zero-pad dim 1 (boxes) of [B, n, ...] to `num_boxes`."""
    missing = num_boxes - tensor.shape[1]
    return F.pad(tensor, (0, 0) * (tensor.dim() - 2) + (0, missing))


def _cat_optional(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if parts[0] is None else torch.cat(parts)


def encode_captions(
    model: LxmertMatchingModel, tokenizer: LxmertTokenizer, sentences: Sequence[str], batch_size: int
) -> EncodedText:
    """Language layers once per caption, `batch_size` captions at a time, on the model's device."""
    tokens = tokenizer(list(sentences))
    device = next(model.parameters()).device
    hidden, bias = [], []
    for start in range(0, len(sentences), batch_size):
        chunk = {name: value[start : start + batch_size].to(device) for name, value in tokens.items()}
        text = model.bert.encode_text(chunk["input_ids"], chunk["attention_mask"], chunk["token_type_ids"])
        hidden.append(text.hidden)
        bias.append(text.bias)
    return EncodedText(torch.cat(hidden), _cat_optional(bias))


def encode_images(
    model: LxmertMatchingModel, features: Sequence[np.ndarray], boxes: Sequence[np.ndarray], batch_size: int
) -> EncodedImage:
    """Object-relationship layers once per image; every image padded (and masked) to the largest box count."""
    device = next(model.parameters()).device
    num_boxes = max(len(b) for b in boxes)
    hidden, bias, mask = [], [], []
    for start in range(0, len(features), batch_size):
        part = slice(start, start + batch_size)
        feats, box, box_mask = (_pad_boxes_to(t, num_boxes).to(device) for t in pad_boxes(features[part], boxes[part]))
        image = model.bert.encode_image(feats, box, box_mask)
        hidden.append(image.hidden)
        bias.append(image.bias)
        mask.append(image.mask)
    return EncodedImage(torch.cat(hidden), _cat_optional(bias), _cat_optional(mask))


def encode_set(
    model: LxmertMatchingModel,
    tokenizer: LxmertTokenizer,
    sentences: Sequence[str],
    features: Sequence[np.ndarray],
    boxes: Sequence[np.ndarray],
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> EncodedSet:
    """Both single-modality encoders, once per caption and once per image. Memory: (M·L + N·B)·H values."""
    _check_inputs(sentences, features, boxes)
    return EncodedSet(encode_captions(model, tokenizer, sentences, batch_size),
                      encode_images(model, features, boxes, batch_size))


def _rows(tensor: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    return None if tensor is None else tensor[index]


def _check_mode(model: LxmertMatchingModel, mode: str) -> None:
    if mode not in SCORE_MODES:
        raise ValueError(f"unknown score mode {mode!r}; valid: {SCORE_MODES}")
    if mode == "itm" and not model.has_matching_head:
        raise RuntimeError("this model has no matching head (cls.seq_relationship): use mode 'cosine' or a "
                           "pretraining checkpoint")


def cross_outputs(
    model: LxmertMatchingModel,
    encoded: EncodedSet,
    image_index: torch.Tensor,
    caption_index: torch.Tensor,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> Iterator[MatchingOutput]:
    """Cross layers + heads for pairs (image_index[p], caption_index[p]), `batch_size` pairs per yielded output."""
    device = encoded.text.hidden.device
    for start in range(0, len(image_index), batch_size):
        images = image_index[start : start + batch_size].to(device)
        captions = caption_index[start : start + batch_size].to(device)
        text = EncodedText(encoded.text.hidden[captions], _rows(encoded.text.bias, captions))
        image = EncodedImage(encoded.image.hidden[images], _rows(encoded.image.bias, images),
                             _rows(encoded.image.mask, images))
        yield model.score_cross(text, image)


def cross_scores(
    model: LxmertMatchingModel,
    encoded: EncodedSet,
    image_index: torch.Tensor,
    caption_index: torch.Tensor,
    batch_size: int = DEFAULT_BATCH_SIZE,
    mode: str = "itm",
) -> torch.Tensor:
    """P(matched) ("itm") or the max-box cosine ("cosine") of pairs (image_index[p], caption_index[p]): [P] float32
    on the CPU."""
    _check_mode(model, mode)
    scores = [(out.match_prob if mode == "itm" else out.cosine).float().cpu()
              for out in cross_outputs(model, encoded, image_index, caption_index, batch_size)]
    return torch.cat(scores) if scores else torch.empty(0)


def grid_from_encoded(
    model: LxmertMatchingModel, encoded: EncodedSet, batch_size: int = DEFAULT_BATCH_SIZE, mode: str = "itm"
) -> torch.Tensor:
    """Every image against every caption, [N, M]; pairs run in row-major (image, caption) order."""
    keep = torch.ones(encoded.num_images, encoded.num_captions, dtype=torch.bool)
    return _scatter_scores(model, encoded, keep, batch_size, mode)


def _scatter_scores(
    model: LxmertMatchingModel, encoded: EncodedSet, keep: torch.Tensor, batch_size: int, mode: str
) -> torch.Tensor:
    """Scores of the pairs where `keep` [N, M] is True (row-major order), -inf elsewhere."""
    image_index, caption_index = keep.nonzero(as_tuple=True)
    scores = torch.full(keep.shape, float("-inf"))
    scores[image_index, caption_index] = cross_scores(model, encoded, image_index, caption_index, batch_size, mode)
    return scores


def first_stage_from_encoded(encoded: EncodedSet) -> torch.Tensor:
    """Cosine [N, M] between each image's masked mean vision state and each caption's [CLS] language state."""
    cls = encoded.text.hidden[:, 0].float()
    visn = encoded.image.hidden.float()
    mask = encoded.image.mask
    weights = torch.ones(visn.shape[:2], device=visn.device) if mask is None else mask.float()
    mean = (visn * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp_min(1.0)
    return (F.normalize(mean, dim=-1) @ F.normalize(cls, dim=-1).T).cpu()


@torch.inference_mode()
def score_pairs(
    model: LxmertMatchingModel,
    tokenizer: LxmertTokenizer,
    sentences: Sequence[str],
    features: Sequence[np.ndarray],
    boxes: Sequence[np.ndarray],
    image_index: Sequence[int] | torch.Tensor,
    caption_index: Sequence[int] | torch.Tensor,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    mode: str = "itm",
) -> torch.Tensor:
    """Scores [P] of an arbitrary pair set (image_index[p], caption_index[p]), factorized: each caption and image
    is encoded once, however many pairs use it. `features`/`boxes`: per-image arrays [n_i, D] / [n_i, 4]
    (normalised). `dtype` (e.g. torch.bfloat16) casts the model in place, once; None keeps its dtype."""
    _check_mode(model, mode)
    _prepare(model, device, dtype)
    encoded = encode_set(model, tokenizer, sentences, features, boxes, batch_size)
    return cross_scores(model, encoded, torch.as_tensor(image_index, dtype=torch.long),
                        torch.as_tensor(caption_index, dtype=torch.long), batch_size, mode)


@torch.inference_mode()
def score_grid(
    model: LxmertMatchingModel,
    tokenizer: LxmertTokenizer,
    sentences: Sequence[str],
    features: Sequence[np.ndarray],
    boxes: Sequence[np.ndarray],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    mode: str = "itm",
) -> torch.Tensor:
    """[num_images, num_captions] P(matched) ("itm") or max-box cosine ("cosine") of every image–caption pair,
    factorized (see `score_pairs` for the arguments)."""
    _check_mode(model, mode)
    _prepare(model, device, dtype)
    encoded = encode_set(model, tokenizer, sentences, features, boxes, batch_size)
    return grid_from_encoded(model, encoded, batch_size, mode)


@torch.inference_mode()
def first_stage_scores(
    model: LxmertMatchingModel,
    tokenizer: LxmertTokenizer,
    sentences: Sequence[str],
    features: Sequence[np.ndarray],
    boxes: Sequence[np.ndarray],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """A cheap pairing score [num_images, num_captions] that needs no cross layers.

    Cosine between the language stream's [CLS] state after the language layers and the masked mean of the vision
    stream after the object-relationship layers. LXMERT was never trained to align these two vectors: this is a
    heuristic for pruning candidates before the matching head re-ranks them, not a trained similarity — check
    on a validation set that its top-k keeps the ground truth before trusting a small k.
    """
    _prepare(model, device, dtype)
    return first_stage_from_encoded(encode_set(model, tokenizer, sentences, features, boxes, batch_size))


def topk_mask(scores: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Boolean mask of the top-k entries of `scores` along `dim` (all of them when k >= that size)."""
    k = min(k, scores.shape[dim])
    keep = torch.zeros_like(scores, dtype=torch.bool)
    return keep.scatter_(dim, scores.topk(k, dim=dim).indices, True)


def _check_k(k: int | None) -> None:
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1 (or None for the full grid), got {k}")


def rerank_from_encoded(
    model: LxmertMatchingModel,
    encoded: EncodedSet,
    k: int | None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    mode: str = "itm",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """(i2t_scores, t2i_scores, first_stage, pairs scored). Without `k` both matrices are the full grid; with `k`,
    the union of each image's top-k captions and each caption's top-k images by the first stage is scored once,
    and each matrix keeps only its own direction's candidates (the rest -inf)."""
    _check_k(k)
    if k is None:
        grid = grid_from_encoded(model, encoded, batch_size, mode)
        return grid, grid, None, grid.numel()
    first = first_stage_from_encoded(encoded)
    i2t_keep, t2i_keep = topk_mask(first, k, dim=1), topk_mask(first, k, dim=0)
    keep = i2t_keep | t2i_keep
    scores = _scatter_scores(model, encoded, keep, batch_size, mode)
    minus_inf = float("-inf")
    return scores.masked_fill(~i2t_keep, minus_inf), scores.masked_fill(~t2i_keep, minus_inf), first, int(keep.sum())


@torch.inference_mode()
def retrieve(
    model: LxmertMatchingModel,
    tokenizer: LxmertTokenizer,
    sentences: Sequence[str],
    features: Sequence[np.ndarray],
    boxes: Sequence[np.ndarray],
    gt: Mapping[int, set[int]],
    k: int | None = None,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    mode: str = "itm",
) -> RetrievalResult:
    """Image→text and text→image retrieval over all images × all captions, with recalls.

    `gt`: image index -> indices of its captions. `k`: None scores the full grid; an int keeps the first stage's
    top-k candidates per query and re-ranks only those (LAVIS protocol; exact when k covers all candidates).
    Other arguments as in `score_pairs`.
    """
    _check_k(k)
    _check_mode(model, mode)
    _prepare(model, device, dtype)
    encoded = encode_set(model, tokenizer, sentences, features, boxes, batch_size)
    i2t, t2i, first, scored = rerank_from_encoded(model, encoded, k, batch_size, mode)
    return RetrievalResult(i2t, t2i, first, scored, retrieval_recalls(i2t, gt, t2i))


def relevance_matrix(gt: Mapping[int, set[int]], num_images: int, num_captions: int) -> torch.Tensor:
    """Boolean [num_images, num_captions]: True where the caption belongs to the image."""
    relevant = torch.zeros(num_images, num_captions, dtype=torch.bool)
    for image, captions in gt.items():
        bad = [c for c in captions if not 0 <= c < num_captions]
        if not 0 <= image < num_images or bad:
            raise ValueError(f"ground truth {image} -> {sorted(captions)} is out of range for {num_images} images "
                             f"x {num_captions} captions")
        relevant[image, list(captions)] = True
    return relevant


def best_relevant_rank(scores: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """0-based rank [Q] of each query's best relevant candidate (rows = queries).

    Ties keep the candidates' index order (a stable sort, like LAVIS with a stable argsort); a relevant candidate
    scoring -inf (pruned by the first stage) never counts as retrieved (rank = inf).
    """
    order = scores.argsort(dim=1, descending=True, stable=True)
    position = torch.empty_like(order)
    position.scatter_(1, order, torch.arange(scores.shape[1]).expand_as(order))
    retrievable = relevant & (scores > float("-inf"))
    return position.float().masked_fill(~retrievable, float("inf")).min(dim=1).values


def _recalls(scores: torch.Tensor, relevant: torch.Tensor, prefix: str) -> dict[str, float]:
    """R@K in percent over the queries (rows) that have at least one relevant candidate."""
    queries = relevant.any(dim=1)
    if not queries.any():
        raise ValueError(f"{prefix}: no query has a ground-truth candidate")
    ranks = best_relevant_rank(scores[queries], relevant[queries])
    out = {f"{prefix}_R@{k}": 100.0 * float((ranks < k).float().mean()) for k in RECALL_AT}
    out[f"{prefix}_queries"] = float(queries.sum())
    return out


def retrieval_recalls(
    score_matrix: torch.Tensor, gt: Mapping[int, set[int]], t2i_scores: torch.Tensor | None = None
) -> dict[str, float]:
    """i2t_R@1/5/10, t2i_R@1/5/10 (percent), RSUM (their sum) and the number of queries of each direction.

    `score_matrix` [num_images, num_captions] ranks captions per image (and images per caption unless
    `t2i_scores`, same shape, is given: the two directions of a two-stage run keep different candidates).
    Images without captions in `gt` (and captions without an image) are not queries.
    """
    t2i_scores = score_matrix if t2i_scores is None else t2i_scores
    if t2i_scores.shape != score_matrix.shape:
        raise ValueError(f"i2t scores {tuple(score_matrix.shape)} and t2i scores {tuple(t2i_scores.shape)} differ")
    relevant = relevance_matrix(gt, *score_matrix.shape)
    out = _recalls(score_matrix.float(), relevant, "i2t")
    out.update(_recalls(t2i_scores.float().T, relevant.T, "t2i"))
    out["RSUM"] = sum(out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in RECALL_AT)
    return out


def read_caption_file(path: str | Path, caption_source: str = "mscoco") -> tuple[list[str], list[str], dict]:
    """(img_ids, sentences, gt) from an LXMERT caption file `[{"img_id", "sentf": {source: [captions]}}]`.

    Images without captions from `caption_source` are left out; gt maps image index -> caption indices.
    """
    with open(path, encoding="utf-8") as f:
        entries = json.load(f)
    img_ids: list[str] = []
    sentences: list[str] = []
    gt: dict[int, set[int]] = {}
    for entry in entries:
        captions = [c for c in entry.get("sentf", {}).get(caption_source, []) if c.strip()]
        if not captions:
            continue
        gt[len(img_ids)] = set(range(len(sentences), len(sentences) + len(captions)))
        img_ids.append(entry["img_id"])
        sentences.extend(captions)
    if not img_ids:
        raise ValueError(f"{path}: no image has {caption_source!r} captions")
    return img_ids, sentences, gt


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lxmert_pl.retrieval",
        description="Image-text retrieval (R@1/5/10, RSUM) of LXMERT's matching head over all images x captions.")
    parser.add_argument("--ckpt", required=True, help="LXMERT checkpoint (any format load_lxmert reads)")
    parser.add_argument("--captions", required=True, help='LXMERT caption file [{"img_id", "sentf": {...}}]')
    parser.add_argument("--features", required=True, nargs="+", help="feature TSV files / stores / globs")
    parser.add_argument("--out", required=True, help="output directory (metrics.json, scores.npz)")
    parser.add_argument("--k", type=int, default=None, help="first-stage candidates per query (default: full grid)")
    parser.add_argument("--mode", choices=SCORE_MODES, default="itm")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--caption-source", default="mscoco")
    parser.add_argument("--max-images", type=int, default=None, help="only the first N images of the caption file")
    return parser.parse_args(argv)


def _limit_images(img_ids: list[str], sentences: list[str], gt: dict, max_images: int | None):
    """The first `max_images` images with their captions (captions of one image are contiguous)."""
    if max_images is None or max_images >= len(img_ids):
        return img_ids, sentences, gt
    kept = {i: gt[i] for i in range(max_images)}
    num_captions = max(max(c) for c in kept.values()) + 1
    return img_ids[:max_images], sentences[:num_captions], kept


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    from lxmert_pl.features.sources import open_feature_source
    from lxmert_pl.model.loading import load_lxmert

    args = _parse_args(argv)
    img_ids, sentences, gt = _limit_images(*read_caption_file(args.captions, args.caption_source), args.max_images)
    source = open_feature_source(args.features)
    images = [source.get(img_id) for img_id in img_ids]
    model, _ = load_lxmert(args.ckpt, require=("matching",) if args.mode == "itm" else ())
    print(f"{len(img_ids)} images x {len(sentences)} captions, k={args.k}, {args.mode}, {args.precision}, "
          f"{args.device}", flush=True)
    start = time.perf_counter()
    result = retrieve(model, LxmertTokenizer(), sentences, [im.features for im in images],
                      [im.normalized_boxes() for im in images], gt, args.k, batch_size=args.batch_size,
                      device=args.device, dtype=precision_dtype(args.precision), mode=args.mode)
    seconds = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"metrics": result.metrics, "num_images": len(img_ids), "num_captions": len(sentences),
               "pairs_scored": result.num_pairs_scored, "k": args.k, "mode": args.mode,
               "precision": args.precision, "seconds": seconds, "ckpt": str(args.ckpt)}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    np.savez_compressed(out / "scores.npz", i2t=result.i2t_scores.numpy(), t2i=result.t2i_scores.numpy(),
                        img_ids=np.array(img_ids), sentences=np.array(sentences))
    print(" ".join(f"{name} {value:.2f}" for name, value in result.metrics.items()))
    print(f"{result.num_pairs_scored} pairs scored in {seconds:.1f} s; wrote {out}/metrics.json, scores.npz")
    return result.metrics


if __name__ == "__main__":
    main()
