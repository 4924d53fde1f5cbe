"""The run's side of `report.html`: what the header says, where pictures and label names come from, the "why" pass.

Called by the evaluation (`runs/evaluate.py`) and retrieval (`runs/retrieval.py`) runs on global rank 0, with the
result set they stage, so the page is replaced together with the predictions and metrics it shows.
"""

from __future__ import annotations

import datetime
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from lxmert_pl import __version__
from lxmert_pl.features.provenance import read_settings
from lxmert_pl.features.record import ImageFeatures
from lxmert_pl.fileio import write_atomically
from lxmert_pl.runs.config import REPO_ROOT
from lxmert_pl.registry import ResolvedCheckpoint, RegistryError, resolve_checkpoint, sha256_file
from lxmert_pl.report import Card, ImageLookup, ReportPage, make_cards, render, select_galleries, shown_rows
from lxmert_pl.scoring import Scorer
from lxmert_pl.tokenizer import LxmertTokenizer
from lxmert_pl.vocab import Vocabulary, load_vocabulary

REPORT_NAME = "report.html"


def shown_path(path: object) -> str:
    """A path as the header shows it: relative to the repository when inside it (shorter, and the same on every
    machine), else as given."""
    text = str(path)
    try:
        return str(Path(text).resolve().relative_to(REPO_ROOT))
    except (ValueError, OSError):
        return text


def report_enabled(cfg: DictConfig) -> bool:
    report = cfg.get("report")
    return bool(report is not None and report.get("enabled", True))


def weights_digest(path: Path) -> str:
    """The first 12 hex digits of the weights' sha256 (the `<file>.sha256` a download recorded, else computed); for
    a folder, of its largest file."""
    path = Path(path)
    if path.is_dir():
        files = [p for p in path.iterdir() if p.is_file() and not p.name.endswith(".sha256")]
        if not files:
            return "?"
        path = max(files, key=lambda p: p.stat().st_size)
    recorded = path.with_name(path.name + ".sha256")
    if recorded.is_file():
        return recorded.read_text(encoding="utf-8").split()[0][:12]
    return sha256_file(path)[:12]


def feature_paths(cfg: DictConfig) -> list[str]:
    from lxmert_pl.features.sources import expand_feature_paths

    try:
        return [str(p) for p in expand_feature_paths(list(cfg.data.features or []))]
    except (OSError, ValueError):
        return [str(p) for p in cfg.data.features or []]


def uses_images(cfg: DictConfig, source: Any) -> bool:
    """True for a one-step run (the features come from the detector on raw images)."""
    return hasattr(source, "prefetch")


def run_vocabulary(cfg: DictConfig, source: Any) -> Vocabulary:
    """The names of the detector that made the features: the run's detector (one step), else the detector the
    features' provenance sidecar names, else Visual Genome's (the released features) or fallback labels."""
    detector = None
    if uses_images(cfg, source):
        detector = str(cfg.detector.ckpt)
    else:
        for path in feature_paths(cfg):
            settings = read_settings(path) if Path(path).is_file() else None
            if settings is not None:
                detector = settings.detector
                break
    if detector:
        try:
            return load_vocabulary(resolve_checkpoint(detector, download=False, progress=False).path)
        except (RegistryError, OSError):
            pass
    return load_vocabulary()


def header_lines(cfg: DictConfig, resolved: ResolvedCheckpoint, source: Any, vocabulary: Vocabulary,
                 threshold: float | None, extra: Sequence[tuple[str, str]] = ()) -> list[tuple[str, str]]:
    """The run header: weights, features (detector or files + provenance), pairs, mode, command, date, version."""
    lines = [("checkpoint", f"{cfg.ckpt} -> {shown_path(resolved.path)} (sha256 {weights_digest(resolved.path)}...)")]
    if resolved.is_bundled_demo:
        lines.append(("weights", "the BUNDLED DEMO weights: scores mean something only on the bundled sample"))
    if uses_images(cfg, source):
        det = cfg.detector
        boxes = f"given boxes {shown_path(cfg.data.given_boxes)}" if cfg.data.given_boxes else \
            f"{det.get('min_boxes', '?')}-{det.get('max_boxes', '?')} detected boxes"
        geometry = getattr(getattr(source, "detector", None), "geometry", None) or det.get("geometry") or "default"
        lines += [("images", shown_path(cfg.data.images)),
                  ("detector", f"{det.ckpt} (geometry {geometry}, {boxes}, precision {det.get('precision', 'fp32')})")]
    else:
        for path in feature_paths(cfg):
            settings = read_settings(path) if Path(path).is_file() else None
            made = settings.describe() if settings else "no provenance sidecar (made elsewhere)"
            lines.append(("features", f"{shown_path(path)}: {made}"))
        if cfg.data.get("images"):
            lines.append(("images (display only)", shown_path(cfg.data.images)))
    lines += [
        *extra,
        ("mode", cfg.mode if threshold is None else f"{cfg.mode} (threshold {threshold:g})"),
        ("labels", f"{len(vocabulary.objects)} object / {len(vocabulary.attributes)} attribute names from "
                   f"{vocabulary.source.replace(str(REPO_ROOT) + '/', '')}"),
        ("command", shlex.join(["eval.py", *sys.argv[1:]])),
        ("date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")),
        ("lxmert_pl", __version__),
    ]
    return lines


def scorer_explainer(model: torch.nn.Module, max_seq_length: int, batch_size: int = 32):
    """`make_cards`' explainer: `Scorer.explain` on the cards' sentences and features (a second, small pass)."""
    def explain(sentences: list[str], records: list[ImageFeatures]) -> list[np.ndarray]:
        was_training, threads = model.training, torch.get_num_threads()
        device = next(model.parameters()).device
        # The model stays where it is (device and dtype); Scorer only switches it to eval mode, restored after.
        scorer = Scorer(model, LxmertTokenizer(max_seq_length=max_seq_length), device, batch_size)
        if device.type == "cpu" and getattr(model, "config", None) is not None and model.config.hidden_size < 256:
            # A small model's ops are too small to share between threads: on a busy 2-core machine the bundled
            # demo's why pass took 1.5-1.9 s with 2 threads and 0.5-0.6 s with one (the whole report).
            torch.set_num_threads(1)
        try:
            return scorer.explain(sentences, [r.features for r in records], [r.normalized_boxes() for r in records])
        finally:
            model.train(was_training)
            torch.set_num_threads(threads)

    return explain


def feature_lookup(source: Any):
    def lookup(img_id: str) -> ImageFeatures | None:
        return source.get(img_id)

    return lookup


def write_eval_report(out_dir: Path, cfg: DictConfig, *, rows: list[dict], metrics: dict, plots: Sequence[Path],
                      threshold: float, resolved: ResolvedCheckpoint, source: Any, model: torch.nn.Module,
                      name: str) -> dict[str, list[Card]]:
    """Write `<out_dir>/report.html` for an evaluation's prediction rows; returns the cards by gallery (for wandb)."""
    report = cfg.report
    vocabulary = run_vocabulary(cfg, source)
    galleries = select_galleries(rows, threshold, int(report.cards), int(report.seed))
    images = ImageLookup(cfg.data.images) if cfg.data.get("images") else None
    explain = scorer_explainer(model, int(cfg.data.max_seq_length)) if int(report.why) > 0 else None
    cards = make_cards(rows, shown_rows(galleries), feature_lookup(source), vocabulary, images, explain,
                       boxes=int(report.boxes), why=int(report.why), thumbnail=int(report.thumbnail))
    notes = []
    if images is None:
        notes.append("No images for this run: boxes are drawn on a blank canvas of each image's recorded size "
                     "(pass --images DIR to see the pictures; the features still come from the feature files).")
    if vocabulary.is_fallback:
        notes.append("No object/attribute names were found: labels read 'class N' / 'attr N' (see README, "
                     "'Looking at the results', for LXMERT_PL_VG_VOCAB).")
    page = ReportPage(
        title=f"{name}: {cfg.mode} evaluation of {cfg.ckpt}",
        header=header_lines(cfg, resolved, source, vocabulary, threshold, [("pairs", shown_path(cfg.data.pairs))]),
        metrics=metrics, plots=list(plots), galleries=galleries, cards=cards, notes=notes, threshold=threshold,
    )
    write_atomically(Path(out_dir) / REPORT_NAME, render(page))
    return {gallery.key: [cards[i] for i in gallery.rows] for gallery in galleries}


__all__ = ["write_eval_report", "report_enabled", "run_vocabulary", "header_lines", "REPORT_NAME"]


def write_retrieval_report(out_dir: Path, cfg: DictConfig, *, rows: list[dict], metrics: dict, img_ids: Sequence[str],
                           resolved: ResolvedCheckpoint, source: Any, name: str, top: int = 5) -> Path:
    """Write `<out_dir>/report.html` for a retrieval run: the worst-ranked queries first (`rows` as
    `write_top_queries` returns them), each with its top `top` hits, the ground truth marked with its rank."""
    from lxmert_pl.drawing import draw_detections, image_data_uri
    from lxmert_pl.report import RetrievalQuery
    from lxmert_pl.report.cards import card_detections

    report = cfg.report
    vocabulary = run_vocabulary(cfg, source)
    images = ImageLookup(cfg.data.images) if cfg.data.get("images") else None
    pictures: dict[int, str | None] = {}

    def picture(index: int) -> str | None:
        if index not in pictures:
            try:
                record = source.get(img_ids[index])
            except (KeyError, OSError, ValueError):
                pictures[index] = None
                return None
            image = images.open(record.img_id)[0] if images is not None else None
            det = card_detections(record, vocabulary, image, int(report.boxes))
            drawn = draw_detections(det.image, det.boxes, det.labels, max_boxes=int(report.boxes),
                                    long_side=int(report.thumbnail))
            pictures[index] = image_data_uri(drawn, long_side=int(report.thumbnail))
        return pictures[index]

    queries = []
    for row in rows[: int(report.retrieval_queries)]:
        relevant = set(row["relevant"])
        image_hits = row["direction"] == "t2i"
        hits = [{"text": hit["text"], "score": hit["score"] or float("nan"), "truth": hit["index"] in relevant,
                 "picture_uri": picture(hit["index"]) if image_hits else None} for hit in row["top"][:top]]
        queries.append(RetrievalQuery(
            title=f"“{row['query_text']}”" if image_hits else f"image {row['query_text']}",
            rank=row["rank"] or 0, direction="caption → images" if image_hits else "image → captions", hits=hits,
            picture_uri=None if image_hits else picture(row["query"])))
    page = ReportPage(
        title=f"{name}: retrieval with {cfg.ckpt}",
        header=header_lines(cfg, resolved, source, vocabulary, None,
                            [("captions", f"{shown_path(cfg.retrieval.captions)} ({len(img_ids)} images)")]),
        metrics={k: v for k, v in metrics.items() if v is not None}, retrieval=queries,
        notes=[] if images is not None else ["No images for this run: boxes are drawn on a blank canvas of each "
                                             "image's recorded size (pass --images DIR to see the pictures)."],
    )
    path = Path(out_dir) / REPORT_NAME
    write_atomically(path, render(page))
    return path
