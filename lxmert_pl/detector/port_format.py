"""The HF port's detector checkpoint format, shared by both detector loaders (`loading` for port-format weights,
`caffemodel` for the original caffe weights, which it converts to this format): the port's key names (`port_key`),
the load report (`DetectorLoadReport`, `raise_if_unfit`), the proposal geometry a `config.yaml` records, and the
export of a model under the port's keys. Neither loader imports the other's internals through this module's names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ..errors import CheckpointError
from ..fileio import atomic_writer
from .config import FrcnnConfig
from .geometry import CAFFE, DEFAULT_GEOMETRY, PORT, check_geometry
from .model import BottomUpFasterRCNN

CONFIG_NAME = "config.yaml"

# (prefix in this module, prefix in the port's checkpoint), first match wins.
_PREFIX_MAP = (
    ("backbone.", "backbone."),
    ("rpn.anchor_generator.cell_anchors", "proposal_generator.anchor_generator.cell_anchors.0"),
    ("rpn.head.conv.", "proposal_generator.rpn_head.conv."),
    ("rpn.head.cls_logits.", "proposal_generator.rpn_head.objectness_logits."),
    ("rpn.head.bbox_pred.", "proposal_generator.rpn_head.anchor_deltas."),
    ("roi_head.res5.", "roi_heads.res5."),
    ("roi_head.predictor.", "roi_heads.box_predictor."),
)
# Inside ResNet blocks: torchvision-style names here, detectron2-style (norm inside the conv) in the port.
_BLOCK_RENAMES = (
    (re.compile(r"(^|\.)bn([123])\."), r"\1conv\2.norm."),
    (re.compile(r"(^|\.)downsample\.0\."), r"\1shortcut."),
    (re.compile(r"(^|\.)downsample\.1\."), r"\1shortcut.norm."),
)


def port_key(key: str) -> str:
    """The port's checkpoint key for a state-dict key of `BottomUpFasterRCNN`.

    e.g. `backbone.res4.0.downsample.1.running_var` -> `backbone.res4.0.shortcut.norm.running_var`,
    `rpn.head.cls_logits.weight` -> `proposal_generator.rpn_head.objectness_logits.weight`.
    """
    for ours, theirs in _PREFIX_MAP:
        if key.startswith(ours):
            rest = key[len(ours) :]
            for pattern, replacement in _BLOCK_RENAMES:
                rest = pattern.sub(replacement, rest)
            return theirs + rest
    raise KeyError(f"no checkpoint key is defined for {key!r}")


@dataclass
class DetectorLoadReport:
    """What `load_detector` did. `missing` / `mismatched` are always empty in a returned report (they raise)."""

    config_path: Path
    weights_path: Path
    loaded: list[str] = field(default_factory=list)
    num_values: int = 0
    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    architecture: str = ""
    geometry: str = DEFAULT_GEOMETRY

    def summary(self) -> str:
        unused = "num_batches_tracked, bbox_pred" + (", cell_anchors" if self.geometry == CAFFE else "")
        lines = [
            f"detector weights: {self.weights_path}",
            f"detector config:  {self.config_path} ({self.architecture})",
            f"detector geometry: {self.geometry} ({_GEOMETRY_WORDS[self.geometry]})",
            f"loaded {len(self.loaded)} tensors ({self.num_values:,} values); missing {len(self.missing)}; "
            f"unexpected {len(self.unexpected)}; ignored {len(self.ignored)} ({unused}: unused at test time)",
        ]
        if self.unexpected:
            lines.append("unexpected keys (not used): " + abbreviate(self.unexpected))
        lines.extend(self.notes)
        return "\n".join(lines)


def raise_if_unfit(report: DetectorLoadReport, what: str, unit: str = "") -> None:
    """CheckpointError `what: N missing ...; M with another shape ...` when the report lists missing or misshapen
    tensors (`unit`, e.g. "layers ", names what the lists hold)."""
    if not (report.missing or report.mismatched):
        return
    problems = []
    if report.missing:
        problems.append(f"{len(report.missing)} missing {unit}".rstrip() + ": " + abbreviate(report.missing))
    if report.mismatched:
        problems.append(f"{len(report.mismatched)} {unit}with another shape: " + abbreviate(report.mismatched))
    raise CheckpointError(f"{what}: " + "; ".join(problems))


# Our own section of a port-format config.yaml (the port ignores unknown sections): the proposal geometry the weights
# were made for, written by `convert_caffemodel`, so a converted directory runs with `caffe` without being told.
OWN_SECTION, GEOMETRY_KEY = "LXMERT_PL", "PROPOSAL_GEOMETRY"


def recorded_geometry(config_path: Path | None) -> str | None:
    """The geometry a config.yaml records for its weights (`LXMERT_PL.PROPOSAL_GEOMETRY`), or None."""
    if config_path is None or not Path(config_path).is_file():
        return None
    with open(config_path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    section = data.get(OWN_SECTION) if isinstance(data, dict) else None
    value = section.get(GEOMETRY_KEY) if isinstance(section, dict) else None
    return None if value is None else check_geometry(str(value), f"{config_path}: {OWN_SECTION}.{GEOMETRY_KEY}")


def record_geometry(config_path: Path, geometry: str) -> None:
    """Add `LXMERT_PL.PROPOSAL_GEOMETRY: geometry` to a config.yaml (see `recorded_geometry`)."""
    with open(config_path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    section = data.get(OWN_SECTION) if isinstance(data.get(OWN_SECTION), dict) else {}
    data[OWN_SECTION] = {**section, GEOMETRY_KEY: check_geometry(geometry, "geometry")}  # keeps a vocabulary there
    with atomic_writer(config_path) as f:
        yaml.safe_dump(data, f, sort_keys=False)


def export_port_state_dict(model: BottomUpFasterRCNN, cfg: FrcnnConfig) -> dict[str, torch.Tensor]:
    """The model's tensors under the port's key names, completed with the port-only keys (zero `bbox_pred`, zero
    `num_batches_tracked`) so that the result also loads strictly into the HF port itself."""
    state = {port_key(key): value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    for key in [k for k in state if k.endswith(".norm.running_var")]:
        state[key.replace(".running_var", ".num_batches_tracked")] = torch.tensor(0, dtype=torch.int64)
    state["roi_heads.box_predictor.bbox_pred.weight"] = torch.zeros(cfg.num_classes * 4, cfg.pooled_dim)
    state["roi_heads.box_predictor.bbox_pred.bias"] = torch.zeros(cfg.num_classes * 4)
    return state


_GEOMETRY_WORDS = {
    PORT: "the HF port's proposal layer",
    CAFFE: "the original caffe proposal layer on the port's RPN head",
}


def abbreviate(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
