"""The extraction run behind `extract.py`: images -> detector -> obj36 TSV (resumable, shardable).

    cfg = compose("extract", flags={"images": "imgs/", "out": "f.tsv", "detector.ckpt": "demo-frcnn"})
    result = run_extract(cfg)

The work runs on Lightning's predict loop (`lxmert_pl.detector.sharded`): `trainer.devices` x `trainer.num_nodes`
processes (DDP), each extracting its share of the images; under torchrun or SLURM every process runs this function.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig

from lxmert_pl.detector.extraction import ExtractionResult, list_images, load_given_boxes, run_extraction
from lxmert_pl.detector.geometry import choose_geometry
from lxmert_pl.detector.selection import BoxSelection
from lxmert_pl.errors import UserInputError
from lxmert_pl.registry import resolve_checkpoint
from lxmert_pl.runs.console import say
from lxmert_pl.runs.errors import lightning_settings
from lxmert_pl.runs.placement import choose_strategy

# Lightning's start-up chatter (accelerator lines, tips) is not what the user ran extract for.
logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)


def box_selection(detector_cfg: DictConfig) -> BoxSelection:
    """The box counts of the `detector` config block (min_boxes / max_boxes)."""
    return BoxSelection(int(detector_cfg.min_boxes), int(detector_cfg.max_boxes))


def detector_device(accelerator: str) -> str:
    """Where the detector runs for a `trainer.accelerator` value: cuda for gpu (and for auto with a GPU), else cpu."""
    if accelerator == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if accelerator == "gpu" else "cpu"


def build_trainer(trainer_cfg: DictConfig) -> pl.Trainer:
    """The Trainer that places the extraction: accelerator, devices per node, nodes, strategy (no logger, no bar:
    each process shows its own progress in images)."""
    with lightning_settings():
        return pl.Trainer(
            accelerator=trainer_cfg.accelerator, devices=trainer_cfg.devices, num_nodes=trainer_cfg.num_nodes,
            strategy=choose_strategy(trainer_cfg), logger=False, enable_progress_bar=False,
            enable_checkpointing=False, enable_model_summary=False, use_distributed_sampler=False,
        )  # fmt: skip


def run_extract(cfg: DictConfig) -> ExtractionResult:
    if not cfg.images:
        raise UserInputError("no images: pass --images DIR_OR_LISTFILE")
    if not cfg.out:
        raise UserInputError("no output file: pass --out FILE.tsv")
    if not cfg.detector.ckpt:
        raise UserInputError("no detector: pass --detector ALIAS_OR_DIR (e.g. frcnn-vg-finetuned, demo-frcnn)")
    trainer = build_trainer(cfg.trainer)
    detector = resolve_checkpoint(str(cfg.detector.ckpt))
    if trainer.is_global_zero:
        say(f"Detector: {detector.describe()}")
    geometry = choose_geometry(cfg.detector.geometry, detector.geometry, "--geometry")
    paths = list_images(cfg.images)
    if not paths:
        raise UserInputError(f"no images found in {cfg.images} (image files directly in the folder, or a list file)")
    result = run_extraction(
        paths,
        cfg.out,
        detector.path,
        box_selection(cfg.detector),
        given_boxes=None if cfg.given_boxes is None else load_given_boxes(cfg.given_boxes),
        batch_size=int(cfg.detector.batch_size),
        trainer=trainer,
        detector_config=cfg.detector.config,
        geometry=geometry,
        precision=cfg.detector.precision,
    )
    if result.written + result.already_done == 0 and result.skipped:
        raise UserInputError(f"no image could be extracted ({len(result.skipped)} skipped, see the list above)")
    if int(cfg.get("show") or 0) > 0 and trainer.is_global_zero:
        show_extracted(cfg, paths, detector.path)
    return result


def show_extracted(cfg: DictConfig, paths: list, detector_path) -> None:
    """`--show N`: the first N rows of the TSV drawn with their labelled boxes into `<out>.show/`."""
    from lxmert_pl.detector.extraction import image_id
    from lxmert_pl.features.show import show_features
    from lxmert_pl.report.cards import ImageLookup

    folder = Path(str(cfg.out) + ".show")
    images = ImageLookup(paths={image_id(p): p for p in paths})
    written = show_features([cfg.out], folder, images=images, first=int(cfg.show), detector=str(detector_path))
    say(f"Drew {len(written)} image(s) with their boxes into {folder}")
