"""What an evaluation leaves in its output folder.

- `predictions.json` / `predictions.csv`: one row per input pair, in input order: `question_id`, `img_id`, `sent`,
  `score` (P(matched) for `itm`, cosine for `cosine`), `answer` ("True"/"False" at the threshold), `ground` when the
  pair has a label, plus `image_id`/`sentence` (the research fork's dump names, so its scripts keep working);
- `metrics.json` when labels exist; `plots/` (ROC, PR, score histograms per label, confusion matrix, PNG);
- `config.yaml` (the resolved config of the run);
- `report.html` (unless `report=false`): the run's header, metrics, plots and galleries of pairs (lxmert_pl/report).
A run's results are one consistent set: `StagedResults` writes them into a hidden folder inside the output folder and
moves them into place only when all of them are written, replacing every result file of an earlier run there
(including ones this run does not produce, e.g. an old `metrics.json` beside unlabelled predictions). A crash or an
interrupt before that leaves the earlier set untouched.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from lxmert_pl.metrics import decisions
from lxmert_pl.pairs.io import Pair

# Everything an evaluation writes as its result (the CSV/wandb logs and the image-feature cache are not results).
RESULT_NAMES = ("predictions.json", "predictions.csv", "metrics.json", "plots", "config.yaml", "report.html")
PREDICTION_FIELDS = ["question_id", "img_id", "sent", "score", "answer", "ground", "image_id", "sentence"]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def prediction_rows(
    pairs: Sequence[Pair], index: torch.Tensor, scores: torch.Tensor, threshold: float, skipped: Sequence[Pair] = ()
) -> list[dict]:
    """Join scores (ordered by pair index, each pair once) with the pair records, in input order.

    Every pair not in `skipped` must have exactly one score."""
    skipped_index = {p.index for p in skipped}
    expected = [p.index for p in pairs if p.index not in skipped_index]
    got = index.tolist()
    if got != expected:
        missing = sorted(set(expected) - set(got))
        raise RuntimeError(f"scores do not cover every pair exactly once ({len(missing)} missing, e.g. {missing[:5]}; "
                           f"{len(got)} scores for {len(expected)} pairs)")
    by_index = {p.index: p for p in pairs}
    answers = decisions(scores.double(), threshold).tolist()
    rows = []
    for i, score, answer in zip(got, scores.tolist(), answers):
        pair = by_index[i]
        row: dict[str, Any] = {
            "question_id": pair.question_id,
            "img_id": pair.img_id,
            "sent": pair.sent,
            "score": float(score),
            "answer": "True" if answer else "False",
        }
        if pair.label is not None:
            row["ground"] = "True" if pair.label == 1 else "False"
        row["image_id"], row["sentence"] = pair.img_id, pair.sent
        rows.append(row)
    return rows


def write_predictions(out_dir: Path, rows: list[dict]) -> None:
    _atomic_write(out_dir / "predictions.json", json.dumps(rows, indent=1, ensure_ascii=False, allow_nan=False) + "\n")
    tmp = out_dir / "predictions.csv.tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[k for k in PREDICTION_FIELDS if any(k in r for r in rows[:1])])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out_dir / "predictions.csv")


def write_metrics(out_dir: Path, metrics: dict[str, float], extra: dict[str, Any]) -> None:
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}
    _atomic_write(out_dir / "metrics.json", json.dumps({**extra, "metrics": clean}, indent=2) + "\n")


def write_plots(out_dir: Path, scores: torch.Tensor, labels: torch.Tensor, threshold: float, mode: str) -> list[Path]:
    """ROC and PR curves, score histograms per label, confusion matrix. Returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchmetrics.functional.classification import binary_precision_recall_curve, binary_roc

    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    scores, labels = scores.double(), labels.long()
    score_name = "P(matched)" if mode == "itm" else "cosine"
    written = []

    def save(fig, name: str) -> None:
        path = plots / name
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    both = 0 < int(labels.sum()) < len(labels)
    if both:
        fpr, tpr, _ = binary_roc(scores, labels)
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot(fpr.numpy(), tpr.numpy())
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
        save(fig, "roc.png")
        precision, recall, _ = binary_precision_recall_curve(scores, labels)
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot(recall.numpy(), precision.numpy())
        ax.set(xlabel="recall", ylabel="precision", title="precision-recall", ylim=(0, 1.02))
        save(fig, "pr.png")
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    low, high = float(scores.min()), float(scores.max())
    bins = torch.linspace(low, high if high > low else low + 1e-6, 31).numpy()  # shared bins: comparable bars
    for value, name in ((1, "matched (ground True)"), (0, "not matched (ground False)")):
        chosen = scores[labels == value]
        if len(chosen):
            ax.hist(chosen.numpy(), bins=bins, alpha=0.6, label=name)
    ax.axvline(threshold, c="k", ls="--", lw=0.8, label=f"threshold {threshold:g}")
    ax.set(xlabel=score_name, ylabel="pairs", title="score histogram per label")
    ax.legend(fontsize=8)
    save(fig, "score_hist.png")
    preds = decisions(scores, threshold)
    cm = torch.zeros(2, 2, dtype=torch.long)
    for t, p in zip(labels.tolist(), preds.tolist()):
        cm[t, p] += 1
    fig, ax = plt.subplots(figsize=(3.8, 3.4))
    ax.imshow(cm.numpy(), cmap="Blues")
    for (i, j), v in zip([(0, 0), (0, 1), (1, 0), (1, 1)], cm.flatten().tolist()):
        ax.text(j, i, str(v), ha="center", va="center", color="black")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["False", "True"], yticklabels=["False", "True"],
           xlabel="answer", ylabel="ground", title="confusion matrix")
    save(fig, "confusion_matrix.png")
    return written


def metrics_table(metrics: dict[str, float]) -> str:
    """A plain two-column table for the terminal."""
    lines = []
    for key, value in metrics.items():
        if isinstance(value, float) and value.is_integer() and (key.startswith("num_") or key.endswith("_groups") or key in ("tn", "fp", "fn", "tp")):
            text = f"{int(value)}"
        else:
            text = "n/a" if isinstance(value, float) and math.isnan(value) else f"{value:.4f}"
        lines.append(f"  {key:<20} {text}")
    return "\n".join(lines)


class StagedResults:
    """Result files written into `<out>/.results-XXXX/`, then moved over the previous run's set as one set.

        with StagedResults(out_dir) as stage:
            write_predictions(stage.path, rows)
            ...
        stage.replaced   # names of an earlier run's results that this run replaced or removed
    """

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.path = Path(tempfile.mkdtemp(prefix=".results-", dir=self.out_dir))
        self.replaced: list[str] = []

    def __enter__(self) -> "StagedResults":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        shutil.rmtree(self.path, ignore_errors=True)

    def commit(self) -> None:
        unknown = sorted(p.name for p in self.path.iterdir() if p.name not in RESULT_NAMES)
        if unknown:
            raise RuntimeError(f"staged results hold files outside RESULT_NAMES: {unknown}")
        for name in RESULT_NAMES:
            old = self.out_dir / name
            if old.exists():
                self.replaced.append(name)
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        for name in RESULT_NAMES:
            staged = self.path / name
            if staged.exists():
                os.replace(staged, self.out_dir / name)
