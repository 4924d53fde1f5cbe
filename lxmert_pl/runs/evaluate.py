"""The evaluation run behind `eval.py`: pairs + features -> datamodule -> MatchingModule -> metrics/predictions.

    cfg = compose("eval", test="matching_val", flags={"ckpt": "lxr955"})
    results = run_eval(cfg)          # dict with "metrics", "out_dir", "predictions" (list of rows)
"""

from __future__ import annotations

import logging
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback

from lxmert_pl.data.datamodule import MatchingDataModule
from lxmert_pl.data.sampler import UnpaddedDistributedSampler
from lxmert_pl.errors import InterruptedRunError, UserInputError
from lxmert_pl.features.sources import expand_feature_paths, open_feature_source
from lxmert_pl.runs.config import REPO_ROOT
from lxmert_pl.runs.console import say
from lxmert_pl.runs.errors import lightning_settings
from lxmert_pl.runs.placement import choose_strategy
from lxmert_pl.runs.module import MatchingModule
from lxmert_pl.runs.loggers import PairsPerSecondBar, build_loggers, wandb_logger
from lxmert_pl.model.compile import compile_layers, run_device
from lxmert_pl.model.loading import load_lxmert
from lxmert_pl.pairs.io import Pair
from lxmert_pl.runs.outputs import (
    StagedResults,
    metrics_table,
    prediction_rows,
    write_metrics,
    write_plots,
    write_predictions,
)
from lxmert_pl.registry import resolve_checkpoint
from lxmert_pl.export import EvaluationResult, add_evaluation
from lxmert_pl.runs.report import REPORT_NAME, report_enabled, write_eval_report
from lxmert_pl.runs.wandb_images import log_report_images
from lxmert_pl.export.model_card import check_card

# Lightning's start-up chatter (accelerator lines, tips) is not what the user ran eval for.
logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)


def run_name(cfg: DictConfig) -> str:
    """--name, else the test split's name, else the pairs file's name; "_cosine" marks cosine runs."""
    base = str(cfg.name or cfg.get("test") or Path(cfg.data.pairs).stem)
    return base if cfg.name or cfg.mode == "itm" else f"{base}_{cfg.mode}"


def _require_file(path: str, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {p}")
    if p.is_dir():
        raise IsADirectoryError(f"{what} is a directory, expected a file: {p}")
    return p


def build_feature_source(cfg: DictConfig, out_dir: Path, writes_cache: bool = True):
    """Features from TSV files / stores (paths or globs), or extracted from raw images by the detector (one-step;
    `writes_cache=False`: a source that will follow the cache another process writes, see `PrefetchImages`)."""
    data = cfg.data
    source = data.source
    if source not in ("auto", "features", "images"):
        raise UserInputError(f"data.source must be auto|features|images, got {source!r}")
    if source == "auto":
        source = "features" if data.features and not data.images else ("images" if data.images else "features")
    if source == "features":
        if not data.features:
            raise UserInputError("no feature files: pass --features TSV_OR_STORE (or --images DIR for one-step "
                                 "matching)")
        paths = [str(p) for p in expand_feature_paths(list(data.features))]
        return open_feature_source(paths), f"features: {', '.join(paths)}"

    from lxmert_pl.detector import ImageFolderFeatureSource, choose_geometry, load_detector
    from lxmert_pl.detector.extraction import detector_file_digests, load_given_boxes
    from lxmert_pl.runs.extraction import box_selection, detector_device

    if not data.images:
        raise UserInputError("no images: pass --images DIR (or --features TSV for pre-extracted features)")
    images = Path(data.images)
    if not images.exists():
        raise FileNotFoundError(f"image folder not found: {images}")
    # a file is a list of image paths (one per line, relative to it), as for extract.py: list_images checks it
    boxes = load_given_boxes(data.given_boxes) if data.given_boxes else None
    detector_ckpt = resolve_checkpoint(str(cfg.detector.ckpt))
    geometry = choose_geometry(cfg.detector.geometry, detector_ckpt.geometry, "detector.geometry")
    detector, report = load_detector(
        detector_ckpt.path,
        config=cfg.detector.config,
        geometry=geometry,
        device=detector_device(cfg.trainer.accelerator),
        precision=cfg.detector.precision,
    )
    say(f"Detector: {detector_ckpt.describe()}\n  {report.summary()}")
    cache = image_cache_path(cfg, out_dir) if writes_cache else None
    selection = box_selection(cfg.detector)
    source = ImageFolderFeatureSource(images, detector, selection=selection, given_boxes=boxes, cache_path=cache,
                                      detector_sha256=detector_file_digests(report))
    mode = "at the given boxes of " + str(data.given_boxes) if boxes else selection.describe()
    return source, f"images: {images} (features extracted by the detector, {mode})"


class PrefetchImages(Callback):
    """One-step matching: extract every image the test pairs need (each once) before the test loop reads them.

    Runs in `setup`, where the DDP process group exists. One process: all the images. Several (devices, nodes): the
    distinct images are split over the processes as extract.py splits them (`ImageFolderFeatureSource.
    prefetch_shared`): each global rank detects its share, with the cache (`detector.cache`, `<out>/image_features.tsv`,
    on a file system every node sees, like --out) into its shard file, which rank 0 merges into the cache for all
    to read; without the cache, the features go to the ranks whose pairs need them. `wanted`, when set, is
    (source, img_ids) for a run that is not over pairs (retrieval: every process reads every image)."""

    def __init__(self, batch_size: int, cache_path: Path | None) -> None:
        self.batch_size = batch_size
        self.cache_path = cache_path
        self.wanted: tuple[Any, list[str]] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        source = self.wanted[0] if self.wanted is not None else trainer.datamodule.feature_source
        if not hasattr(source, "prefetch"):
            return
        if self.wanted is not None:
            every = needed = self.wanted[1]
        else:
            dataset = trainer.datamodule.datasets[stage]
            every = [pair.img_id for pair in dataset.pairs]
            mine = UnpaddedDistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank)
            needed = [dataset.pairs[i].img_id for i in mine]
        if trainer.world_size == 1:
            source.prefetch(every, batch_size=self.batch_size)
            return
        rates = source.prefetch_shared(every, self.batch_size, trainer, cache_path=self.cache_path, needed=needed)
        if trainer.is_global_zero:
            say(rates.describe("detected"))


def image_cache_path(cfg: DictConfig, out_dir: Path) -> Path | None:
    """The one-step feature cache, `<out>/image_features.tsv` (None with detector.cache=false)."""
    return out_dir / "image_features.tsv" if cfg.detector.cache else None


def build_trainer(cfg: DictConfig, loggers: list, callbacks: Sequence[Callback] = ()) -> pl.Trainer:
    with lightning_settings():
        return pl.Trainer(
            accelerator=cfg.trainer.accelerator,
            devices=cfg.trainer.devices,
            num_nodes=cfg.trainer.num_nodes,
            strategy=choose_strategy(cfg.trainer),
            precision=cfg.trainer.precision,
            logger=loggers,
            callbacks=[PairsPerSecondBar(), *callbacks],
            use_distributed_sampler=False,  # the datamodule shards pairs itself, without padded duplicates
            enable_checkpointing=False,
            enable_model_summary=False,
            inference_mode=True,
        )


def run_eval(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate; an interrupt (Ctrl-C) becomes `InterruptedRunError` saying what was (not) written."""
    if not cfg.data.pairs:
        raise UserInputError("no pairs: pass --pairs FILE or --test NAME")
    _require_file(cfg.data.pairs, "pairs file")
    if cfg.get("card"):  # checked before the run, not after all results are written
        check_labelled_for_card(check_card(cfg.card), cfg.data.pairs)
    name = run_name(cfg)
    out_dir = Path(cfg.out) if cfg.out else REPO_ROOT / "outputs" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _evaluate(cfg, name, out_dir)
    except KeyboardInterrupt:
        cache = out_dir / "image_features.tsv"
        shards = sorted(out_dir.glob("image_features.tsv.shard*.tsv"))  # several processes: their shares so far
        kept = ""
        if cache.exists() or shards:
            with_shards = f" and its {len(shards)} shard files" if shards else ""
            kept = f"; the image-feature cache {cache}{with_shards} keep the images extracted so far"
        raise InterruptedRunError(f"no results were written to {out_dir} (an earlier run's results there are "
                                  f"unchanged){kept}. Run the same command again to start over") from None


@dataclass
class ScoringRun:
    """What scoring pairs needs, built once per run: weights, loggers, the Trainer, the feature source, the module."""

    resolved: Any  # the checkpoint as resolved (registry alias, path, hub)
    loggers: list
    trainer: pl.Trainer
    source: Any  # the feature source (`in` says whether it has an img_id)
    source_text: str
    module: MatchingModule


def build_scorer(cfg: DictConfig, name: str, out_dir: Path) -> ScoringRun:
    """Load the weights and build the Trainer, the feature source (features or images) and the MatchingModule."""
    resolved = resolve_checkpoint(str(cfg.ckpt))
    require = ("matching",) if cfg.mode == "itm" else ()
    model, report = load_lxmert(resolved.path, model_config=cfg.model_config, require=require)
    compile_layers(model, bool(cfg.model.compile), run_device(str(cfg.trainer.accelerator)))
    say(f"Weights: {resolved.describe()}\n  {report.summary()}")

    resolved_cfg = OmegaConf.to_container(cfg, resolve=True)
    loggers = build_loggers(cfg.logger, out_dir, name, resolved_cfg)
    cache = image_cache_path(cfg, out_dir)
    trainer = build_trainer(cfg, loggers, [PrefetchImages(cfg.detector.batch_size, cache)])
    source, source_text = build_feature_source(cfg, out_dir, writes_cache=trainer.is_global_zero)
    module = MatchingModule(model_config=model.config.to_dict(), heads=model.heads, mode=cfg.mode,
                            threshold=cfg.threshold, factorize=cfg.factorize, model=model)
    return ScoringRun(resolved, loggers, trainer, source, source_text, module)


def score_pairs(cfg: DictConfig, scorer: ScoringRun, pairs: str | Path | list[Pair]) -> MatchingDataModule:
    """Score `pairs` (a pair file or a list of `Pair`) on the Trainer (DDP-sharded, each pair once); the gathered
    results are in `scorer.module.results` on global rank 0. Returns the datamodule (its `test_pairs`, `skipped`)."""
    datamodule = MatchingDataModule(
        feature_source=scorer.source, test_pairs=pairs, batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers, max_seq_length=cfg.data.max_seq_length,
        skip_missing=cfg.data.skip_missing,
    )
    try:
        scorer.trainer.test(scorer.module, datamodule=datamodule, verbose=False)
    except SystemExit:
        if scorer.trainer.interrupted:  # Lightning turns Ctrl-C into a graceful shutdown and sys.exit(1)
            raise KeyboardInterrupt from None
        raise
    return datamodule


def _evaluate(cfg: DictConfig, name: str, out_dir: Path) -> dict[str, Any]:
    scorer = build_scorer(cfg, name, out_dir)
    resolved, loggers, trainer, module = scorer.resolved, scorer.loggers, scorer.trainer, scorer.module
    source_text = scorer.source_text
    say(f"Pairs: {cfg.data.pairs}\nFeatures: {source_text}\nScoring: {cfg.mode} "
        f"(threshold {module.threshold:g}), output: {out_dir}")
    datamodule = score_pairs(cfg, scorer, cfg.data.pairs)
    results = module.results or {}
    if not trainer.is_global_zero:
        return {"out_dir": out_dir, "metrics": results.get("metrics", {})}

    pairs = datamodule.test_pairs
    if results.get("index") is None:
        raise RuntimeError("no pairs were scored")
    skipped = datamodule.skipped
    nonfinite = nonfinite_pairs(pairs, results.get("nonfinite") or [], bool(cfg.skip_nonfinite))
    finite = torch.isfinite(results["score"])
    rows = prediction_rows(pairs, results["index"][finite], results["score"][finite], module.threshold,
                           [*skipped, *nonfinite])
    metrics = results.get("metrics") or {}
    cards, staged_plots, report_seconds = {}, [], 0.0
    with StagedResults(out_dir) as stage:
        write_predictions(stage.path, rows)
        OmegaConf.save(cfg, stage.path / "config.yaml")
        if metrics:
            labelled = (results["label"] >= 0) & finite
            staged_plots = write_plots(stage.path, results["score"][labelled], results["label"][labelled],
                                       module.threshold, cfg.mode)
            write_metrics(stage.path, metrics, {
                "ckpt": str(cfg.ckpt), "weights": str(resolved.path), "mode": cfg.mode, "pairs": str(cfg.data.pairs),
                "num_pairs_total": len(pairs), "num_skipped": len(skipped), "num_nonfinite": len(nonfinite),
            })
        if report_enabled(cfg):
            started = time.perf_counter()
            try:  # a display: its failure must not take the predictions and metrics with it
                cards = write_eval_report(stage.path, cfg, rows=rows, metrics=metrics, plots=staged_plots,
                                          threshold=module.threshold, resolved=resolved, source=scorer.source,
                                          model=module.model, name=name)
            except Exception as err:  # noqa: BLE001 (reported, with its traceback in the log)
                logging.getLogger(__name__).debug("report.html failed", exc_info=True)
                say(f"report.html was not written ({type(err).__name__}: {err}); the other results are.")
            report_seconds = time.perf_counter() - started
    plots = sorted((out_dir / "plots").glob("*.png")) if metrics else []
    if stage.replaced:
        say(f"Replaced the results of an earlier run in {out_dir}: {', '.join(stage.replaced)}")
    for logger in loggers:
        logger.log_metrics({f"test/{k}": v for k, v in metrics.items() if v == v})  # NaN dropped
        logger.save()
    _log_wandb(loggers, metrics, plots, rows, int(cfg.logger.wandb.table_rows), cards,
               out_dir / REPORT_NAME if report_enabled(cfg) else None)
    if skipped:
        say(f"Skipped {len(skipped)} pairs whose img_id no feature source has (data.skip_missing=true).")
    if nonfinite:
        say(f"Excluded {len(nonfinite)} pairs whose score is not finite (skip_nonfinite=true), e.g. "
            f"{describe_pairs(nonfinite)}")
    if metrics:
        say(f"Metrics on {int(metrics['num_pairs'])} labelled pairs ({cfg.mode}):\n{metrics_table(metrics)}")
    else:
        say(f"No labels in {cfg.data.pairs}: predictions only.")
    say(f"Predictions: {out_dir / 'predictions.json'} (and .csv)"
        + (f"\nMetrics: {out_dir / 'metrics.json'}\nPlots: {out_dir / 'plots'}" if metrics else "")
        + (f"\nReport: {out_dir / REPORT_NAME} (written in {report_seconds:.2f} s)"
           if (out_dir / REPORT_NAME).is_file() and report_enabled(cfg) else ""))
    if cfg.get("card") and metrics:
        protocol = f"{cfg.mode} scoring, threshold {module.threshold:g}, weights {resolved.describe()}; {source_text}"
        result = EvaluationResult(name, str(cfg.data.pairs), protocol, metrics, shlex.join(["eval.py", *sys.argv[1:]]))
        say(f"Model card: {add_evaluation(cfg.card, result)} (Evaluation: {name})")
    if resolved.is_bundled_demo:
        say("Note: these are the bundled demo weights and data; see README for --ckpt lxr955.")
    return {"out_dir": out_dir, "metrics": metrics, "predictions": rows}


def check_labelled_for_card(card: Path, pairs_path: str) -> None:
    """`--card` with pairs without labels: no metrics would go into the card, so it is refused up front."""
    from lxmert_pl.pairs.io import load_pairs

    if not any(pair.label is not None for pair in load_pairs(pairs_path)):
        raise UserInputError(f"--card {card}: {pairs_path} has no labels, so this run gives predictions only and no "
                             "metrics for the card; drop --card, or evaluate labelled pairs")


def describe_pairs(pairs: list, limit: int = 5) -> str:
    shown = "; ".join(f"#{p.index} (question_id {p.question_id}, img_id {p.img_id!r})" for p in pairs[:limit])
    return shown + (f" and {len(pairs) - limit} more" if len(pairs) > limit else "")


def nonfinite_pairs(pairs: list, indices: list[int], skip: bool) -> list:
    """The pairs whose score is NaN/inf: an error naming them, unless the user asked to skip (then counted)."""
    if not indices:
        return []
    by_index = {p.index: p for p in pairs}
    bad = [by_index[i] for i in indices]
    if not skip:
        raise UserInputError(
            f"{len(bad)} of {len(pairs)} pairs got a non-finite score (NaN/inf), e.g. {describe_pairs(bad)}: check "
            "their image features (python -m lxmert_pl.features check FILE) or the model; pass skip_nonfinite=true "
            "to leave them out of the predictions and metrics (counted)")
    return bad


def _log_wandb(loggers: list, metrics: dict, plots: list[Path], rows: list[dict], limit: int,
               cards: dict | None = None, report: Path | None = None) -> None:
    """Metrics, plots and the predictions table; `cards` (the report's, by gallery): their pictures with boxes;
    `report`: report.html, shown by wandb's HTML panel."""
    logger = wandb_logger(loggers)
    if logger is None:
        return
    import wandb

    run = logger.experiment
    clean = {f"test/{k}": v for k, v in metrics.items() if v == v}  # drop NaN
    run.summary.update(clean)
    run.log({**clean, **{f"plots/{p.stem}": wandb.Image(str(p)) for p in plots}})
    columns = ["question_id", "img_id", "sent", "score", "answer", "ground"]
    data = [[r.get(c) for c in columns] for r in rows[:limit]]
    if cards:  # the report's cards: their pictures with the detections as wandb boxes
        images = log_report_images(run, cards, limit)
        columns, data = [*columns, "image"], [[*row, images.get(i)] for i, row in enumerate(data)]
    table = wandb.Table(columns=columns, data=data)
    run.log({"predictions": table})
    if report is not None and report.is_file():
        run.log({"report": wandb.Html(report.read_text(encoding="utf-8"), inject=False)})
    logger.finalize("success")
    run.finish()
