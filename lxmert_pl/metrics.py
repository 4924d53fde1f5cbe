"""Matching metrics over a whole pair set (computed once, on every pair exactly once).

Classification (torchmetrics, binary, "matched" = positive class): accuracy, precision, recall, F1 at the decision
threshold; ROC-AUC and average precision over the scores; the confusion matrix; and a threshold sweep giving the
best-F1 threshold. Retrieval (torchmetrics retrieval metrics) when pairs group several captions per image
(image -> text) or several images per caption (text -> image): R@1/5/10 and MRR over the groups that hold at least
one matched and one unmatched pair.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torchmetrics.functional.classification import (
    binary_accuracy,
    binary_auroc,
    binary_average_precision,
    binary_confusion_matrix,
    binary_f1_score,
    binary_precision,
    binary_precision_recall_curve,
    binary_recall,
)
from torchmetrics.functional.retrieval import retrieval_hit_rate, retrieval_reciprocal_rank

RECALL_AT = (1, 5, 10)


def decisions(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """1 ("True", matched) where score > threshold. For P(match) and 0.5 this is the argmax of the two logits."""
    return (scores > threshold).long()


def best_f1_threshold(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(threshold, F1) maximising F1 when "matched" means score >= threshold."""
    precision, recall, thresholds = binary_precision_recall_curve(scores, labels)
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    best = int(f1[:-1].argmax()) if len(thresholds) else 0
    return float(thresholds[best]) if len(thresholds) else float("nan"), float(f1[best])


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor, threshold: float) -> dict[str, float]:
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


def retrieval_metrics(scores: torch.Tensor, labels: torch.Tensor, group_keys: Sequence, prefix: str) -> dict[str, float]:
    """R@K and MRR over groups (e.g. all pairs of one image) that hold a matched AND an unmatched pair."""
    group_ids, num_groups = _groups(group_keys)
    hits = {k: [] for k in RECALL_AT}
    reciprocal = []
    for g in range(num_groups):
        member = group_ids == g
        target = labels[member].bool()
        if target.all() or not target.any():
            continue
        s = scores[member].double()
        for k in RECALL_AT:
            hits[k].append(float(retrieval_hit_rate(s, target, top_k=k)))
        reciprocal.append(float(retrieval_reciprocal_rank(s, target)))
    if not reciprocal:
        return {}
    out = {f"{prefix}_groups": float(len(reciprocal))}
    out.update({f"{prefix}_R@{k}": sum(v) / len(v) for k, v in hits.items()})
    out[f"{prefix}_MRR"] = sum(reciprocal) / len(reciprocal)
    return out


def matching_metrics(
    scores: torch.Tensor, labels: torch.Tensor, img_ids: Sequence[str], sentences: Sequence[str], threshold: float
) -> dict[str, float]:
    """Everything above for labelled pairs; retrieval keys appear only where such groups exist."""
    out = classification_metrics(scores, labels, threshold)
    out.update(retrieval_metrics(scores, labels, img_ids, "i2t"))
    out.update(retrieval_metrics(scores, labels, sentences, "t2i"))
    return out
