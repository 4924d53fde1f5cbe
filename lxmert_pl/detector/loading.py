"""Loading the HF port's detector checkpoints (`unc-nlp/frcnn-vg-finetuned` layout) into `BottomUpFasterRCNN`.

A detector directory holds `config.yaml` (the port's format, see `config.FrcnnConfig`) and the weights as
`pytorch_model.bin` (a plain state dict, read with `torch.load(weights_only=True)`) or `*.safetensors`. Every tensor
of this module is looked up under the port's key name (`port_key`); the report counts what was loaded, what the
checkpoint lacks (an error), what it has that nothing uses (reported) and what is known but unused at test time
(BatchNorm `num_batches_tracked`, the box-regression layer `bbox_pred`: obj36 boxes are unregressed proposals; the
`caffe` geometry also leaves `cell_anchors` unused: it generates caffe's anchors). `load_box_regressor` reads
`bbox_pred` on its own, for the geometry probe (`probe.py`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from ..errors import CheckpointError  # noqa: F401  (re-exported)
from ..weights_file import read_weights_file
from .config import FrcnnConfig
from .geometry import CAFFE, DEFAULT_GEOMETRY, PORT, check_geometry
from .model import BottomUpFasterRCNN, build_detector
from .rpn import AnchorGenerator

CONFIG_NAME = "config.yaml"
CAFFEMODEL_SUFFIX = ".caffemodel"
WEIGHT_NAMES = ("pytorch_model.bin", "model.safetensors")

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
# Port keys that exist in every checkpoint but have no role at test time.
_IGNORED = re.compile(r"(\.num_batches_tracked$)|(^roi_heads\.box_predictor\.bbox_pred\.(weight|bias)$)")
_CELL_ANCHORS_KEY = "proposal_generator.anchor_generator.cell_anchors.0"
_BOX_REGRESSOR_KEY = "roi_heads.box_predictor.bbox_pred"


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
            lines.append("unexpected keys (not used): " + _abbreviate(self.unexpected))
        lines.extend(self.notes)
        return "\n".join(lines)


def raise_if_unfit(report: DetectorLoadReport, what: str, unit: str = "") -> None:
    """CheckpointError `what: N missing ...; M with another shape ...` when the report lists missing or misshapen
    tensors (`unit`, e.g. "layers ", names what the lists hold)."""
    if not (report.missing or report.mismatched):
        return
    problems = []
    if report.missing:
        problems.append(f"{len(report.missing)} missing {unit}".rstrip() + ": " + _abbreviate(report.missing))
    if report.mismatched:
        problems.append(f"{len(report.mismatched)} {unit}with another shape: " + _abbreviate(report.mismatched))
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
    with open(config_path, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f, sort_keys=False)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file or a torch state-dict file (`torch.load(weights_only=True)`, CPU).

    The port's renaming of old BatchNorm keys is applied (`gamma` -> `weight`, `beta` -> `bias`).
    """
    path = Path(path)
    state = read_weights_file(path)
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"{path} does not hold a flat state dict (str -> Tensor)")
    renamed = {}
    for key, value in state.items():
        key = re.sub(r"\.gamma$", ".weight", key)
        renamed[re.sub(r"\.beta$", ".bias", key)] = value
    return renamed


def resolve_detector_files(path: str | Path, config: str | Path | None = None) -> tuple[Path | None, Path]:
    """(config.yaml, weights file) for a detector directory or a weights file (config defaults to its folder's).

    A `.caffemodel` needs no config (None: the built-in preset of the original models, see `caffemodel.py`)."""
    path = Path(path)
    if path.suffix == CAFFEMODEL_SUFFIX and path.is_file():
        return (Path(config) if config is not None else None), path
    if path.is_dir():
        candidates = [path / name for name in WEIGHT_NAMES if (path / name).is_file()]
        candidates = candidates[:1] or sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
        if len(candidates) != 1:
            found = ", ".join(c.name for c in candidates) or "none"
            raise FileNotFoundError(
                f"expected one detector weights file in {path} ({' or '.join(WEIGHT_NAMES)} or *.safetensors), "
                f"found: {found}"
            )
        weights, folder = candidates[0], path
    elif path.is_file():
        weights, folder = path, path.parent
    else:
        raise FileNotFoundError(f"detector path not found: {path}")
    config_path = Path(config) if config is not None else folder / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"detector config not found: {config_path} (the port's config.yaml)")
    return config_path, weights


def load_detector(
    path: str | Path,
    config: str | Path | None = None,
    device: str | torch.device = "cpu",
    roi_chunk_size: int | None = None,
    geometry: str | None = None,
    precision: str = "fp32",
    fuse_batchnorm: bool = True,
    channels_last: bool = True,
) -> tuple[BottomUpFasterRCNN, DetectorLoadReport]:
    """Build the detector from the port's `config.yaml` and load its checkpoint.

    Args:
        path: a detector directory (`config.yaml` + `pytorch_model.bin` or `*.safetensors`), a weights file, or an
            original caffe `.caffemodel` (`caffemodel.load_caffemodel`).
        config: the config file, if not `config.yaml` next to the weights.
        device: where the model goes.
        roi_chunk_size: RoIs per res5 call; None: automatic (see `Res5RoIHead`).
        geometry: "port" or "caffe" proposal geometry (`geometry.py`); the same port-format weights serve both.
            None: the weights' own, `port` for port-format weights, `caffe` for a `.caffemodel` (which only runs
            with `caffe`).
        precision: "fp32" or "bf16" (res5 of the RoI head in bfloat16; see `BottomUpFasterRCNN.set_precision`).
        fuse_batchnorm: fold the frozen BatchNorms into the convs after loading (faster; within the golden
            tolerances). The report and the key checks are those of the checkpoint as stored.
        channels_last: NHWC convs (faster). With `fuse_batchnorm=False, channels_last=False` the fp32 network
            computes exactly as the HF port does (bit-identical outputs on the same weights, bench/README.md).
    Raises `CheckpointError` naming the keys that are missing or have another shape than the config implies, and
    `UnknownGeometryError` for another geometry name.
    """
    config_path, weights_path = resolve_detector_files(path, config)
    if weights_path.suffix == CAFFEMODEL_SUFFIX:  # the original caffe weights: their own key map (caffemodel.py)
        from .caffemodel import load_caffemodel

        model, caffe_report = load_caffemodel(
            weights_path, config_path, roi_chunk_size=roi_chunk_size, geometry=geometry or CAFFE,
            channels_last=channels_last,
        )
        if fuse_batchnorm:
            model.fuse_batchnorm()
        return model.set_precision(precision).to(device), caffe_report
    geometry = geometry or recorded_geometry(config_path) or DEFAULT_GEOMETRY
    cfg = FrcnnConfig.from_yaml(config_path)
    checkpoint = read_state_dict(weights_path)
    return detector_from_port_state_dict(
        cfg,
        checkpoint,
        config_path,
        weights_path,
        device=device,
        roi_chunk_size=roi_chunk_size,
        geometry=geometry,
        precision=precision,
        fuse_batchnorm=fuse_batchnorm,
        channels_last=channels_last,
    )


def detector_from_port_state_dict(
    cfg: FrcnnConfig,
    checkpoint: dict[str, torch.Tensor],
    config_path: str | Path,
    weights_path: str | Path,
    device: str | torch.device = "cpu",
    roi_chunk_size: int | None = None,
    geometry: str = DEFAULT_GEOMETRY,
    precision: str = "fp32",
    fuse_batchnorm: bool = True,
    channels_last: bool = True,
) -> tuple[BottomUpFasterRCNN, DetectorLoadReport]:
    """The detector for `cfg` with the tensors of `checkpoint`, a state dict under the port's key names (what
    `load_detector` reads from a file, or weights converted from another format, e.g. a .caffemodel mapped to the
    port's keys and layout). `config_path` and `weights_path` only name the sources in the report and errors.
    The `caffe` geometry needs no `cell_anchors` key. Other arguments and errors as `load_detector`.
    """
    config_path, weights_path = Path(config_path), Path(weights_path)
    model = build_detector(cfg, roi_chunk_size=roi_chunk_size, geometry=geometry, channels_last=channels_last)
    report = DetectorLoadReport(
        config_path=config_path, weights_path=weights_path, architecture=cfg.summary(), geometry=model.geometry
    )

    target = model.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key, tensor in target.items():
        source = port_key(key)
        if source not in checkpoint:
            report.missing.append(source)
            continue
        used.add(source)
        value = checkpoint[source]
        if value.shape != tensor.shape:
            report.mismatched.append(f"{source}: checkpoint {tuple(value.shape)}, config implies {tuple(tensor.shape)}")
            continue
        loaded[key] = value.to(tensor.dtype)
    raise_if_unfit(report, f"{weights_path} does not fit {config_path} ({cfg.summary()})")

    for key in checkpoint:
        if key not in used:
            ignored = _IGNORED.search(key) or (model.geometry == CAFFE and key == _CELL_ANCHORS_KEY)
            (report.ignored if ignored else report.unexpected).append(key)
    model.load_state_dict(loaded, strict=True)
    report.loaded = sorted(loaded)
    report.num_values = sum(t.numel() for t in loaded.values())

    generated = AnchorGenerator.generate_cell_anchors(cfg.anchor_sizes, cfg.anchor_aspect_ratios)
    stored = checkpoint.get(_CELL_ANCHORS_KEY)
    if stored is not None and (stored.shape != generated.shape or not torch.allclose(generated, stored, atol=1e-3)):
        used_instead = (
            "the caffe geometry generates caffe's anchors and reads the RPN channels as sizes-outer, ratios-inner "
            "all the same"
            if model.geometry == CAFFE
            else "the checkpoint's are used"
        )
        report.notes.append(
            "note: the checkpoint's cell anchors differ from those ANCHOR_GENERATOR in the config generates; "
            + used_instead
        )
    if fuse_batchnorm:
        model.fuse_batchnorm()
    return model.set_precision(precision).to(device), report


def load_box_regressor(path: str | Path, config: str | Path | None = None) -> nn.Linear:
    """The RoI head's class-specific box regressor `roi_heads.box_predictor.bbox_pred` (Linear D -> 4 x
    num_classes, background dropped; deltas dx, dy, dw, dh per class with decode weights 10, 10, 5, 5), in eval mode
    on the CPU. Not part of the detector: extraction writes unregressed proposals; the geometry probe needs it.

    Raises `CheckpointError` when the checkpoint lacks it or its shape does not fit the config.
    """
    config_path, weights_path = resolve_detector_files(path, config)
    cfg = FrcnnConfig.from_yaml(config_path)
    checkpoint = read_state_dict(weights_path)
    regressor = nn.Linear(cfg.pooled_dim, cfg.num_classes * 4)
    expected = {"weight": tuple(regressor.weight.shape), "bias": tuple(regressor.bias.shape)}
    state = {}
    for name, shape in expected.items():
        key = f"{_BOX_REGRESSOR_KEY}.{name}"
        if key not in checkpoint:
            raise CheckpointError(f"{weights_path} has no {key} (the box regressor the geometry probe needs)")
        if tuple(checkpoint[key].shape) != shape:
            raise CheckpointError(
                f"{weights_path}: {key} has shape {tuple(checkpoint[key].shape)}, {config_path} implies {shape}"
            )
        state[name] = checkpoint[key].to(torch.float32)
    regressor.load_state_dict(state)
    return regressor.eval()


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


def _abbreviate(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
