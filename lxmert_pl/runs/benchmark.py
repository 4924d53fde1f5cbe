"""The benchmark run behind `eval.py --task benchmark`: a benchmark's items -> their distinct (image, text) pairs ->
the same scoring as `--task matching` (`lxmert_pl.runs.evaluate.build_scorer` / `score_pairs`: MatchingDataModule +
MatchingModule on a Lightning Trainer, DDP-sharded, each pair once, factorized where an image or a caption repeats)
-> the benchmark's metrics (`lxmert_pl.benchmarks`).

    python eval.py --task benchmark --benchmark winoground --data examples.jsonl --images images/ --ckpt lxr955

Output folder (one consistent set, see `lxmert_pl.runs.outputs.StagedResults`): `predictions.json` (every pair's
score), `metrics.json` (overall metrics, the per-tag tables, counts, weights), `tables.md` (the tables as Markdown),
`items.json` (each item's scores and outcome), `config.yaml`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from lxmert_pl.benchmarks import Benchmark, PairKey, ScoreTable, load_benchmark
from lxmert_pl.benchmarks.common import split_available
from lxmert_pl.errors import InterruptedRunError, UserInputError
from lxmert_pl.fileio import write_atomically
from lxmert_pl.pairs.io import Pair
from lxmert_pl.runs.config import REPO_ROOT
from lxmert_pl.runs.console import say
from lxmert_pl.runs.evaluate import build_scorer, nonfinite_pairs, score_pairs
from lxmert_pl.runs.loggers import wandb_logger
from lxmert_pl.runs.outputs import RESULT_NAMES as MATCHING_RESULTS
from lxmert_pl.runs.outputs import StagedResults, metrics_table, prediction_rows

# A matching run's result names too: its predictions.csv or plots/ left in the same folder are removed, not mixed in.
RESULT_NAMES = (*MATCHING_RESULTS, "tables.md", "items.json")


def benchmark_run_name(cfg: DictConfig) -> str:
    """--name, else `<benchmark>_<data stem>`; "_cosine" marks cosine runs."""
    if cfg.name:
        return str(cfg.name)
    data = str(cfg.benchmark.data).rstrip("/").split("@")[0]
    base = f"{cfg.benchmark.name}_{Path(data).stem}"
    return base if cfg.mode == "itm" else f"{base}_{cfg.mode}"


def run_benchmark(cfg: DictConfig) -> dict[str, Any]:
    """Score a benchmark; an interrupt (Ctrl-C) becomes `InterruptedRunError` saying that nothing was written."""
    if not cfg.benchmark.name:
        raise UserInputError("no benchmark: pass --benchmark winoground|valse|negatives (and --data PATH)")
    bench = load_benchmark(str(cfg.benchmark.name), cfg.benchmark.data, valid_only=bool(cfg.benchmark.valid_only))
    if not cfg.data.images and not cfg.data.features and bench.image_folder is not None:
        cfg.data.images = str(bench.image_folder)  # the published layout: images/ beside the examples
    name = benchmark_run_name(cfg)
    out_dir = Path(cfg.out) if cfg.out else REPO_ROOT / "outputs" / name
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _run(cfg, bench, name, out_dir)
    except KeyboardInterrupt:
        raise InterruptedRunError(f"no results were written to {out_dir} (an earlier run's results there are "
                                  "unchanged). Run the same command again to start over") from None


def _run(cfg: DictConfig, bench: Benchmark, name: str, out_dir: Path) -> dict[str, Any]:
    scorer = build_scorer(cfg, name, out_dir)
    items, skipped = split_available(bench.items, lambda item: item.images, lambda img_id: img_id in scorer.source,
                                     lambda item: item.describe(), scorer.source_text, bool(cfg.data.skip_missing))
    if not items:
        raise UserInputError(f"none of the {len(bench.items)} {bench.name} items has its images in "
                             f"{scorer.source_text}")
    keys = bench.pairs(items)
    pairs = [Pair(index=i, question_id=i, img_id=key.img_id, sent=key.sent, label=None) for i, key in enumerate(keys)]
    module = scorer.module
    say(f"Benchmark: {bench.name} {bench.data} ({len(items)} items, {len(pairs)} distinct image-text pairs)\n"
        f"Features: {scorer.source_text}\nScoring: {cfg.mode} (threshold {module.threshold:g}), output: {out_dir}")
    score_pairs(cfg, scorer, pairs)
    if not scorer.trainer.is_global_zero:
        return {"out_dir": out_dir}
    results = module.results or {}
    if results.get("index") is None:
        raise RuntimeError("no pairs were scored")
    nonfinite = nonfinite_pairs(pairs, results.get("nonfinite") or [], bool(cfg.skip_nonfinite))
    if nonfinite:  # skip_nonfinite=true: the items that need such a pair are left out, counted
        bad = {PairKey(p.img_id, p.sent) for p in nonfinite}
        dropped = [item for item in items if any(pair in bad for pair in item.pairs())]
        items = [item for item in items if item not in dropped]
        say(f"Left out {len(dropped)} items with a non-finite score (skip_nonfinite=true).")
        if not items:
            raise UserInputError("every item has a non-finite score")
    finite = [math.isfinite(s) for s in results["score"].tolist()]
    keep = [i for i, ok in enumerate(finite) if ok]
    rows = prediction_rows(pairs, results["index"][keep], results["score"][keep], module.threshold, nonfinite)
    score = ScoreTable({PairKey(row["img_id"], row["sent"]): row["score"] for row in rows})
    result = bench.evaluate(score, module.threshold, items)

    counts = {"num_items_total": len(bench.items), "num_items": len(items), "num_skipped_missing": len(skipped),
              "num_not_validated": bench.num_not_valid, "num_pairs": len(pairs)}
    summary = {
        "benchmark": bench.name, "data": bench.data, "ckpt": str(cfg.ckpt), "weights": str(scorer.resolved.path),
        "mode": cfg.mode, "threshold": module.threshold, **counts,
        "metrics": _clean(result.metrics), "tables": [t.to_dict() for t in result.tables],
    }
    with StagedResults(out_dir, RESULT_NAMES) as stage:
        write_atomically(stage.path / "predictions.json", _json(rows))
        write_atomically(stage.path / "metrics.json", _json(summary))
        write_atomically(stage.path / "tables.md", f"# {bench.name}: {bench.data}\n\n{result.markdown()}\n")
        write_atomically(stage.path / "items.json", _json(result.items))
        OmegaConf.save(cfg, stage.path / "config.yaml")
    if stage.replaced:
        say(f"Replaced the results of an earlier run in {out_dir}: {', '.join(stage.replaced)}")
    clean = {f"benchmark/{k}": v for k, v in result.metrics.items() if v == v}  # NaN dropped
    for logger in scorer.loggers:
        logger.log_metrics(clean)
        logger.save()
    wandb = wandb_logger(scorer.loggers)
    if wandb is not None:
        wandb.experiment.summary.update(clean)
        wandb.finalize("success")
        wandb.experiment.finish()
    if skipped:
        say(f"Skipped {len(skipped)} items whose images the feature source lacks (data.skip_missing=true), e.g. "
            f"{skipped[0].describe()}.")
    if bench.num_not_valid:
        say(f"Left out {bench.num_not_valid} items not validated by the annotators (benchmark.valid_only=true).")
    say(f"{bench.name} on {len(items)} items ({cfg.mode}; every comparison is strict: a tie counts as wrong):\n"
        f"{metrics_table(result.metrics)}\n\n{result.markdown()}")
    say(f"Predictions: {out_dir / 'predictions.json'}\nMetrics: {out_dir / 'metrics.json'} "
        f"(tables: {out_dir / 'tables.md'}, items: {out_dir / 'items.json'})")
    if scorer.resolved.is_bundled_demo:
        say("Note: these are the bundled demo weights; they mean nothing on real images. Compare published LXMERT "
            "figures with --ckpt lxr955 (README, Benchmarks).")
    return {"out_dir": out_dir, "metrics": result.metrics, "result": result, "predictions": rows}


def _clean(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}


def _json(data: Any) -> str:
    return json.dumps(data, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
