"""Matching metrics over a whole pair set (computed once, on every pair exactly once).

Classification (torchmetrics, binary, "matched" = positive class): accuracy, precision, recall, F1 at the decision
threshold; ROC-AUC and average precision over the scores; the confusion matrix; and a threshold sweep giving the
best-F1 threshold. Retrieval when pairs group several captions per image (image -> text, `i2t_*`, the field's TR) or several images per
caption (text -> image, `t2i_*`, IR): R@1/5/10, median and mean rank, MRR over the groups that hold at least one
matched and one unmatched pair.

One definition of retrieval quality serves both this grouped evaluation and the image x caption grid of
`lxmert_pl.retrieval` (`rank_metrics` over `best_relevant_rank`):

* rank of a query = the 0-based position of its BEST relevant candidate when candidates are sorted by score,
  descending, ties kept in candidate index order (a stable sort); a relevant candidate scoring -inf (pruned by a
  first stage) is never retrieved (rank inf);
* R@K = the fraction of queries whose rank < K, i.e. "any relevant item in the top K" (the field's R@K, which is
  torchmetrics' `retrieval_hit_rate`, NOT its `RetrievalRecall`, the fraction of the relevant items found): a
  fraction in [0, 1];
* median rank = floor(median of the 0-based ranks) + 1 and mean rank = mean of the 0-based ranks + 1 (1 = first,
  the VSE++/LAVIS convention); inf when too many queries were never retrieved;
* RSUM = the sum of the six R@K fractions (i2t and t2i at K = 1, 5, 10), in [0, 6]; the papers' RSUM is 100x this.
"""

from __future__ import annotations

from typing import Sequence

import torch

# torchmetrics is imported where it is used: importing it imports all of its metrics (torchvision, transformers,
# scipy: ~4 s), which the matcher, the retrieval metrics and `python -m lxmert_pl.match` do not need.

RECALL_AT = (1, 5, 10)
DIRECTIONS = ("i2t", "t2i")  # image -> text (TR), text -> image (IR)


def decisions(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """1 ("True", matched) where score > threshold. For P(match) and 0.5 this is the argmax of the two logits."""
    return (scores > threshold).long()


def best_f1_threshold(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(threshold, F1) maximising F1 when "matched" means score >= threshold."""
    from torchmetrics.functional.classification import binary_precision_recall_curve

    precision, recall, thresholds = binary_precision_recall_curve(scores, labels)
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    best = int(f1[:-1].argmax()) if len(thresholds) else 0
    return float(thresholds[best]) if len(thresholds) else float("nan"), float(f1[best])


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor, threshold: float) -> dict[str, float]:
    from torchmetrics.functional.classification import (
        binary_accuracy,
        binary_auroc,
        binary_average_precision,
        binary_confusion_matrix,
        binary_f1_score,
        binary_precision,
        binary_recall,
    )

    scores, labels = scores.double(), labels.long()
    preds = decisions(scores, threshold)
    out = {
        "num_pairs": float(len(labels)),
        "num_matched": float(labels.sum()),
        "threshold": float(threshold),
        "accuracy": float(binary_accuracy(preds, labels, threshold=0.5)),
        "precision": float(binary_precision(preds, labels, threshold=0.5)),
        "recall": float(binary_recall(preds, labels, threshold=0.5)),
        "f1": float(binary_f1_score(preds, labels, threshold=0.5)),
    }
    both_classes = 0 < int(labels.sum()) < len(labels)
    out["roc_auc"] = float(binary_auroc(scores, labels)) if both_classes else float("nan")
    out["average_precision"] = float(binary_average_precision(scores, labels)) if both_classes else float("nan")
    tn_fp_fn_tp = binary_confusion_matrix(preds, labels, threshold=0.5).flatten().tolist()
    out.update({name: float(v) for name, v in zip(("tn", "fp", "fn", "tp"), tn_fp_fn_tp)})
    if both_classes:
        out["best_f1_threshold"], out["best_f1"] = best_f1_threshold(scores, labels)
    return out


def _groups(keys: Sequence) -> tuple[torch.Tensor, int]:
    ids: dict = {}
    return torch.tensor([ids.setdefault(k, len(ids)) for k in keys], dtype=torch.long), len(ids)


def best_relevant_rank(scores: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """0-based rank [Q] of each query's best relevant candidate (rows = queries, columns = candidates).

    Ties keep the candidates' index order (a stable sort, like LAVIS with a stable argsort); a relevant candidate
    scoring -inf (pruned by a first stage) never counts as retrieved (rank = inf), nor does a query without one.
    """
    order = scores.argsort(dim=1, descending=True, stable=True)
    position = torch.empty_like(order)
    position.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    retrievable = relevant & (scores > float("-inf"))
    return position.double().masked_fill(~retrievable, float("inf")).min(dim=1).values


def rank_metrics(ranks: torch.Tensor, prefix: str) -> dict[str, float]:
    """R@1/5/10 (fractions), median and mean rank (1-based), and the query count, from 0-based ranks (see above)."""
    ranks = ranks.double()
    if not len(ranks):
        raise ValueError(f"{prefix}: no queries to rank")
    out = {f"{prefix}_R@{k}": float((ranks < k).double().mean()) for k in RECALL_AT}
    out[f"{prefix}_median_rank"] = _floor_median(ranks) + 1.0
    out[f"{prefix}_mean_rank"] = float(ranks.mean()) + 1.0
    out[f"{prefix}_queries"] = float(len(ranks))
    return out


def _floor_median(ranks: torch.Tensor) -> float:
    """floor(median) of ranks that may hold inf (numpy's median: the mean of the two middle values)."""
    ordered = ranks.sort().values
    n = len(ordered)
    middle = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return float(torch.floor(middle))


def grid_retrieval_metrics(
    i2t_scores: torch.Tensor, relevant: torch.Tensor, t2i_scores: torch.Tensor | None = None
) -> dict[str, float]:
    """i2t_* and t2i_* rank metrics and RSUM of a score matrix [num_images, num_captions].

    `relevant` (bool, same shape): True where the caption describes the image. `t2i_scores` ranks the images per
    caption when it differs from `i2t_scores` (a two-stage run keeps different candidates per direction). Images
    without a relevant caption (and captions without an image) are not queries.
    """
    t2i_scores = i2t_scores if t2i_scores is None else t2i_scores
    if t2i_scores.shape != i2t_scores.shape or relevant.shape != i2t_scores.shape:
        raise ValueError(f"i2t scores {tuple(i2t_scores.shape)}, t2i scores {tuple(t2i_scores.shape)} and relevance "
                         f"{tuple(relevant.shape)} must have the same shape")
    out: dict[str, float] = {}
    for prefix, scores, rel in (("i2t", i2t_scores, relevant), ("t2i", t2i_scores.T, relevant.T)):
        queries = rel.any(dim=1)
        if not queries.any():
            raise ValueError(f"{prefix}: no query has a relevant candidate")
        out.update(rank_metrics(best_relevant_rank(scores[queries].float(), rel[queries]), prefix))
    out["RSUM"] = rsum(out)
    return out


def rsum(metrics: dict[str, float]) -> float:
    """Sum of the i2t and t2i R@1/5/10 fractions, in [0, 6] (the papers' RSUM, in percent, is 100x this)."""
    return sum(metrics[f"{d}_R@{k}"] for d in DIRECTIONS for k in RECALL_AT)


def retrieval_metrics(scores: torch.Tensor, labels: torch.Tensor, group_keys: Sequence, prefix: str) -> dict[str, float]:
    """Rank metrics (above) and MRR over groups (e.g. all pairs of one image) that hold a matched AND an unmatched
    pair: each group is one query, its pairs the candidates."""
    group_ids, num_groups = _groups(group_keys)
    ranks = []
    for g in range(num_groups):
        member = group_ids == g
        target = labels[member].bool()
        if target.all() or not target.any():
            continue
        ranks.append(best_relevant_rank(scores[member].double()[None], target[None])[0])
    if not ranks:
        return {}
    ranks_t = torch.stack(ranks)
    out = {f"{prefix}_groups": float(len(ranks))}
    out.update({k: v for k, v in rank_metrics(ranks_t, prefix).items() if k != f"{prefix}_queries"})
    out[f"{prefix}_MRR"] = float((1.0 / (ranks_t + 1.0)).mean())
    return out


def matching_metrics(
    scores: torch.Tensor, labels: torch.Tensor, img_ids: Sequence[str], sentences: Sequence[str], threshold: float
) -> dict[str, float]:
    """Everything above for labelled pairs; retrieval keys appear only where such groups exist."""
    out = classification_metrics(scores, labels, threshold)
    out.update(retrieval_metrics(scores, labels, img_ids, "i2t"))
    out.update(retrieval_metrics(scores, labels, sentences, "t2i"))
    return out
