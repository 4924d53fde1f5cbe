"""The evaluation run behind `eval.py`: pairs + features -> datamodule -> MatchingModule -> metrics/predictions.

    cfg = compose("eval", test="matching_val", flags={"ckpt": "lxr955"})
    results = run_eval(cfg)          # dict with "metrics", "out_dir", "predictions" (list of rows)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from lxmert_pl.runs.config import REPO_ROOT
from lxmert_pl.data.datamodule import MatchingDataModule
from lxmert_pl.features.sources import open_feature_source
from lxmert_pl.runs.module import MatchingModule
from lxmert_pl.runs.loggers import PairsPerSecondBar, build_loggers, wandb_logger
from lxmert_pl.model.loading import load_lxmert
from lxmert_pl.runs.outputs import metrics_table, prediction_rows, write_metrics, write_plots, write_predictions
from lxmert_pl.registry import resolve_checkpoint

log = logging.getLogger("lxmert_pl")
# Lightning's start-up chatter (accelerator lines, tips) is not what the user ran eval for.
logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)


def say(message: str) -> None:
    """Messages for the person at the terminal (rank 0 only under DDP)."""
    if pl.utilities.rank_zero.rank_zero_only.rank == 0:
        print(message, flush=True)


def run_name(cfg: DictConfig) -> str:
    """--name, else the test split's name, else the pairs file's name; "_cosine" marks cosine runs."""
    base = str(cfg.name or cfg.get("test") or Path(cfg.data.pairs).stem)
    return base if cfg.name or cfg.mode == "itm" else f"{base}_{cfg.mode}"


def _require_file(path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {p}")
    return p


def build_feature_source(cfg: DictConfig, out_dir: Path):
    """Features from TSV files / stores, or extracted from raw images by the detector (one-step)."""
    data = cfg.data
    source = data.source
    if source not in ("auto", "features", "images"):
        raise ValueError(f"data.source must be auto|features|images, got {source!r}")
    if source == "auto":
        source = "features" if data.features and not data.images else ("images" if data.images else "features")
    if source == "features":
        if not data.features:
            raise ValueError("no feature files: pass --features TSV_OR_STORE (or data.images for one-step matching)")
        paths = [str(_require_file(p, "feature file")) for p in data.features]
        return open_feature_source(paths), f"features: {', '.join(paths)}"
    import numpy as np
    import torch

    from lxmert_pl.detector import BoxSelection, ImageFolderFeatureSource, choose_geometry, load_detector

    images = _require_file(data.images, "image folder")
    boxes = None
    if data.boxes:
        with open(_require_file(data.boxes, "boxes file"), encoding="utf-8") as f:
            boxes = {img_id: np.asarray(b, dtype=np.float32).reshape(-1, 4) for img_id, b in json.load(f).items()}
    detector_ckpt = resolve_checkpoint(str(cfg.detector.ckpt))
    geometry = choose_geometry(cfg.detector.geometry, detector_ckpt.geometry, "detector.geometry")
    # The detector runs where the matching model does (trainer.accelerator), in detector.precision.
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="cpu"))
    use_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    detector, report = load_detector(
        detector_ckpt.path,
        geometry=geometry,
        device="cuda" if use_gpu else "cpu",
        precision=str(OmegaConf.select(cfg, "detector.precision", default="fp32")),
    )
    say(f"Detector: {detector_ckpt.describe()}\n  {report.summary()}")
    cache = out_dir / "image_features.tsv" if cfg.detector.cache else None
    selection = BoxSelection(cfg.detector.min_boxes, cfg.detector.max_boxes)
    source = ImageFolderFeatureSource(images, detector, selection=selection, given_boxes=boxes, cache_path=cache)
    mode = "at the given boxes of " + str(data.boxes) if boxes else selection.describe()
    return source, f"images: {images} (features extracted by the detector, {mode})"


def prefetch_images(source, pairs_file: str, batch_size: int) -> None:
    """One-step matching: extract every image the pairs need up front (each once), before any worker reads.

    Under DDP this runs in the launching process before the others start, so they find everything cached."""
    from lxmert_pl.pairs.io import load_pairs

    if hasattr(source, "prefetch"):
        needed = [p.img_id for p in load_pairs(pairs_file) if p.img_id in source]
        source.prefetch(needed, batch_size=batch_size)


def build_trainer(cfg: DictConfig, loggers: list) -> pl.Trainer:
    devices = cfg.trainer.devices
    return pl.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=devices,
        strategy="ddp" if isinstance(devices, int) and devices > 1 else "auto",
        precision=cfg.trainer.precision,
        logger=loggers,
        callbacks=[PairsPerSecondBar()],
        use_distributed_sampler=False,  # the datamodule shards pairs itself, without padded duplicates
        enable_checkpointing=False,
        enable_model_summary=False,
        inference_mode=True,
    )


def run_eval(cfg: DictConfig) -> dict[str, Any]:
    if not cfg.data.pairs:
        raise ValueError("no pairs: pass --pairs FILE or --test NAME")
    _require_file(cfg.data.pairs, "pairs file")
    name = run_name(cfg)
    out_dir = Path(cfg.out) if cfg.out else REPO_ROOT / "outputs" / name
    out_dir.mkdir(parents=True, exist_ok=True)

    resolved = resolve_checkpoint(str(cfg.ckpt))
    require = ("matching",) if cfg.mode == "itm" else ()
    model, report = load_lxmert(resolved.path, model_config=cfg.model_config, require=require)
    say(f"Weights: {resolved.describe()}\n  {report.summary()}")

    source, source_text = build_feature_source(cfg, out_dir)
    prefetch_images(source, cfg.data.pairs, cfg.detector.batch_size)
    datamodule = MatchingDataModule(
        feature_source=source, test_pairs=cfg.data.pairs, batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers, max_seq_length=cfg.data.max_seq_length,
        skip_missing=cfg.data.skip_missing,
    )
    module = MatchingModule(model_config=model.config.to_dict(), heads=model.heads, mode=cfg.mode,
                            threshold=cfg.threshold, factorize=cfg.factorize, model=model)
    resolved_cfg = OmegaConf.to_container(cfg, resolve=True)
    loggers = build_loggers(cfg.logger, out_dir, name, resolved_cfg)
    trainer = build_trainer(cfg, loggers)
    say(f"Pairs: {cfg.data.pairs}\nFeatures: {source_text}\nScoring: {cfg.mode} "
        f"(threshold {module.threshold:g}), output: {out_dir}")
    trainer.test(module, datamodule=datamodule, verbose=False)
    results = module.results or {}
    if not trainer.is_global_zero:
        return {"out_dir": out_dir, "metrics": results.get("metrics", {})}

    pairs = datamodule.test_pairs
    if results.get("index") is None:
        raise RuntimeError("no pairs were scored")
    skipped = datamodule.skipped
    rows = prediction_rows(pairs, results["index"], results["score"], module.threshold, skipped)
    write_predictions(out_dir, rows)
    OmegaConf.save(cfg, out_dir / "config.yaml")
    metrics = results.get("metrics") or {}
    plots = []
    if metrics:
        labelled = results["label"] >= 0
        plots = write_plots(out_dir, results["score"][labelled], results["label"][labelled], module.threshold, cfg.mode)
        write_metrics(out_dir, metrics, {
            "ckpt": str(cfg.ckpt), "weights": str(resolved.path), "mode": cfg.mode, "pairs": str(cfg.data.pairs),
            "num_pairs_total": len(pairs), "num_skipped": len(skipped),
        })
    for logger in loggers:
        logger.log_metrics({f"test/{k}": v for k, v in metrics.items() if v == v})  # NaN dropped
        logger.save()
    _log_wandb(loggers, metrics, plots, rows, int(cfg.logger.wandb.table_rows))
    if skipped:
        say(f"Skipped {len(skipped)} pairs whose img_id no feature source has (data.skip_missing=true).")
    if metrics:
        say(f"Metrics on {int(metrics['num_pairs'])} labelled pairs ({cfg.mode}):\n{metrics_table(metrics)}")
    else:
        say(f"No labels in {cfg.data.pairs}: predictions only.")
    say(f"Predictions: {out_dir / 'predictions.json'} (and .csv)"
        + (f"\nMetrics: {out_dir / 'metrics.json'}\nPlots: {out_dir / 'plots'}" if metrics else ""))
    if "demo" in str(cfg.ckpt):
        say("Note: these are the bundled demo weights and data; see README for --ckpt lxr955.")
    return {"out_dir": out_dir, "metrics": metrics, "predictions": rows}


def _log_wandb(loggers: list, metrics: dict, plots: list[Path], rows: list[dict], limit: int) -> None:
    logger = wandb_logger(loggers)
    if logger is None:
        return
    import wandb

    run = logger.experiment
    clean = {f"test/{k}": v for k, v in metrics.items() if v == v}  # drop NaN
    run.summary.update(clean)
    run.log({**clean, **{f"plots/{p.stem}": wandb.Image(str(p)) for p in plots}})
    columns = ["question_id", "img_id", "sent", "score", "answer", "ground"]
    table = wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows[:limit]])
    run.log({"predictions": table})
    logger.finalize("success")
    run.finish()
