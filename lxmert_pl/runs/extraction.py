"""The extraction run behind `extract.py`: images -> detector -> obj36 TSV (resumable, shardable).

    cfg = compose("extract", flags={"images": "imgs/", "out": "f.tsv", "detector.ckpt": "demo-frcnn"})
    result = run_extract(cfg)
"""

from __future__ import annotations

from omegaconf import DictConfig

from lxmert_pl.detector.extraction import ExtractionResult, list_images, load_given_boxes, run_extraction
from lxmert_pl.detector.geometry import choose_geometry
from lxmert_pl.detector.selection import BoxSelection
from lxmert_pl.errors import UserInputError
from lxmert_pl.registry import resolve_checkpoint
from lxmert_pl.runs.console import say


def box_selection(detector_cfg: DictConfig) -> BoxSelection:
    """The box counts of the `detector` config block (min_boxes / max_boxes)."""
    return BoxSelection(int(detector_cfg.min_boxes), int(detector_cfg.max_boxes))


def detector_device(accelerator: str) -> str:
    """Where the detector runs for a `trainer.accelerator` value: cuda for gpu (and for auto with a GPU), else cpu."""
    if accelerator == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if accelerator == "gpu" else "cpu"


def run_extract(cfg: DictConfig) -> ExtractionResult:
    if not cfg.images:
        raise UserInputError("no images: pass --images DIR_OR_LISTFILE")
    if not cfg.out:
        raise UserInputError("no output file: pass --out FILE.tsv")
    if not cfg.detector.ckpt:
        raise UserInputError("no detector: pass --detector ALIAS_OR_DIR (e.g. frcnn-vg-finetuned, demo-frcnn)")
    device = detector_device(cfg.trainer.accelerator)
    detector = resolve_checkpoint(str(cfg.detector.ckpt))
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
        devices=int(cfg.trainer.devices),
        device=device,
        detector_config=cfg.detector.config,
        geometry=geometry,
        precision=cfg.detector.precision,
    )
    if result.written + result.already_done == 0 and result.skipped:
        raise UserInputError(f"no image could be extracted ({len(result.skipped)} skipped, see the list above)")
    return result
