"""Architecture and test-time settings of the bottom-up-attention Faster R-CNN, read from the HF port's `config.yaml`.

The port (`unc-nlp/frcnn-vg-finetuned`, transformers `examples/research_projects/lxmert`) stores a detectron2-style
YAML with upper-case sections (`MODEL`, `INPUT`, `RESNETS`, `RPN`, ...). `FrcnnConfig.from_yaml` reads the keys this
re-implementation needs, ignores every other key, and falls back to the full model's values (ResNet-101 C4, 12 anchors,
1600 classes / 400 attributes, 600/1000 resizing) for keys that are absent. Settings the network cannot honour
(another backbone depth, FPN, no attribute head, ...) raise `ValueError` naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..fileio import atomic_writer

# Bottleneck blocks in res2, res3, res4 (res5 always has 3 and lives in the RoI head).
BLOCKS_PER_STAGE = {50: (3, 4, 6), 101: (3, 4, 23), 152: (3, 8, 36)}


@dataclass(frozen=True)
class FrcnnConfig:
    """Everything that fixes the detector's tensors and its test-time proposal behaviour.

    Defaults are the full bottom-up-attention model (SPEC.md §1-§4). Box *selection* (per-class NMS 0.3, confidence
    0.2, 36 or 10-100 boxes) is not part of this config: it belongs to the extraction (`selection.BoxSelection`).
    """

    # MODEL / INPUT: preprocessing
    pixel_mean: tuple[float, float, float] = (102.9801, 115.9465, 122.7717)
    pixel_std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    input_format: str = "BGR"
    min_size_test: int = 600
    max_size_test: int = 1000
    # MODEL.MAX_POOL: caffe's stem pooling (3x3, stride 2, pad 0, ceil mode) instead of pad 1, floor mode.
    caffe_maxpool: bool = True
    # RESNETS
    depth: int = 101
    num_groups: int = 1
    width_per_group: int = 64
    stem_out_channels: int = 64
    res2_out_channels: int = 256
    stride_in_1x1: bool = True
    # PROPOSAL_GENERATOR / ANCHOR_GENERATOR / RPN (test-time values)
    rpn_hidden_channels: int = 512
    rpn_min_size: float = 0.0
    anchor_sizes: tuple[float, ...] = (64.0, 128.0, 256.0, 512.0)
    anchor_aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    anchor_offset: float = 0.0
    rpn_nms_thresh: float = 0.7
    rpn_pre_nms_topk: int = 6000
    rpn_post_nms_topk: int = 300
    rpn_bbox_reg_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    # ROI_HEADS / ROI_BOX_HEAD
    num_classes: int = 1600
    num_attrs: int = 400
    pooler_resolution: int = 14
    res5_halve: bool = False

    # ---- derived sizes -------------------------------------------------------------------------------------------
    @property
    def blocks_per_stage(self) -> tuple[int, int, int]:
        return BLOCKS_PER_STAGE[self.depth]

    @property
    def bottleneck_channels(self) -> int:
        """Bottleneck width of res2 (doubles per stage)."""
        return self.num_groups * self.width_per_group

    @property
    def res4_channels(self) -> int:
        return self.res2_out_channels * 4

    @property
    def pooled_dim(self) -> int:
        """Width D of the pooled RoI feature (res5 output): 2048 for the full model."""
        return self.res2_out_channels * 8

    @property
    def num_anchors(self) -> int:
        """Anchors per feature-map location: len(sizes) x len(aspect ratios)."""
        return len(self.anchor_sizes) * len(self.anchor_aspect_ratios)

    @property
    def feature_stride(self) -> int:
        """Stride of res4 relative to the network input: stem 4, res3 x2, res4 x2."""
        return 16

    # ---- YAML ------------------------------------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path) -> FrcnnConfig:
        """Read the port's `config.yaml` (upper-case sections; unknown keys are ignored)."""
        path = Path(path)
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a YAML mapping with upper-case sections, got {type(data).__name__}")
        return cls.from_port_dict(data, source=str(path))

    @classmethod
    def from_port_dict(cls, data: dict[str, Any], source: str = "dict") -> FrcnnConfig:
        """Build from the port's nested config mapping (see `from_yaml`)."""

        def get(section: str, key: str, default: Any) -> Any:
            block = data.get(section) or {}
            return block.get(key, default) if isinstance(block, dict) else default

        d = cls()
        sizes = get("ANCHOR_GENERATOR", "SIZES", [list(d.anchor_sizes)])
        ratios = get("ANCHOR_GENERATOR", "ASPECT_RATIOS", [list(d.anchor_aspect_ratios)])
        sizes, ratios = (
            _single_level(sizes, "ANCHOR_GENERATOR.SIZES"),
            _single_level(ratios, "ANCHOR_GENERATOR.ASPECT_RATIOS"),
        )

        for section, key, allowed in (
            ("RESNETS", "OUT_FEATURES", (["res4"],)),
            ("RPN", "IN_FEATURES", (["res4"],)),
            ("ROI_HEADS", "IN_FEATURES", (["res4"],)),
            ("RESNETS", "NORM", ("BN", "FrozenBN")),
            ("ROI_BOX_HEAD", "ATTR", (True,)),
        ):
            value = get(section, key, allowed[0])
            if value not in allowed:
                raise ValueError(f"{source}: {section}.{key} = {value!r} is not supported (expected one of {allowed})")
        depth = int(get("RESNETS", "DEPTH", d.depth))
        if depth not in BLOCKS_PER_STAGE:
            raise ValueError(
                f"{source}: RESNETS.DEPTH = {depth} is not supported (bottleneck depths {sorted(BLOCKS_PER_STAGE)})"
            )
        input_format = str(get("INPUT", "FORMAT", d.input_format)).upper()
        if input_format not in ("BGR", "RGB"):
            raise ValueError(f"{source}: INPUT.FORMAT = {input_format!r} is not supported (BGR or RGB)")

        return cls(
            pixel_mean=_triple(get("MODEL", "PIXEL_MEAN", d.pixel_mean), "MODEL.PIXEL_MEAN", source),
            pixel_std=_triple(get("MODEL", "PIXEL_STD", d.pixel_std), "MODEL.PIXEL_STD", source),
            input_format=input_format,
            min_size_test=int(get("INPUT", "MIN_SIZE_TEST", d.min_size_test)),
            max_size_test=int(get("INPUT", "MAX_SIZE_TEST", d.max_size_test)),
            caffe_maxpool=bool(get("MODEL", "MAX_POOL", d.caffe_maxpool)),
            depth=depth,
            num_groups=int(get("RESNETS", "NUM_GROUPS", d.num_groups)),
            width_per_group=int(get("RESNETS", "WIDTH_PER_GROUP", d.width_per_group)),
            stem_out_channels=int(get("RESNETS", "STEM_OUT_CHANNELS", d.stem_out_channels)),
            res2_out_channels=int(get("RESNETS", "RES2_OUT_CHANNELS", d.res2_out_channels)),
            stride_in_1x1=bool(get("RESNETS", "STRIDE_IN_1X1", d.stride_in_1x1)),
            rpn_hidden_channels=int(get("PROPOSAL_GENERATOR", "HIDDEN_CHANNELS", d.rpn_hidden_channels)),
            rpn_min_size=float(get("PROPOSAL_GENERATOR", "MIN_SIZE", d.rpn_min_size)),
            anchor_sizes=tuple(float(s) for s in sizes),
            anchor_aspect_ratios=tuple(float(r) for r in ratios),
            anchor_offset=float(get("ANCHOR_GENERATOR", "OFFSET", d.anchor_offset)),
            rpn_nms_thresh=float(get("RPN", "NMS_THRESH", d.rpn_nms_thresh)),
            rpn_pre_nms_topk=int(get("RPN", "PRE_NMS_TOPK_TEST", d.rpn_pre_nms_topk)),
            rpn_post_nms_topk=int(get("RPN", "POST_NMS_TOPK_TEST", d.rpn_post_nms_topk)),
            rpn_bbox_reg_weights=tuple(float(w) for w in get("RPN", "BBOX_REG_WEIGHTS", d.rpn_bbox_reg_weights)),
            num_classes=int(get("ROI_HEADS", "NUM_CLASSES", d.num_classes)),
            num_attrs=int(get("ROI_BOX_HEAD", "NUM_ATTRS", d.num_attrs)),
            pooler_resolution=int(get("ROI_BOX_HEAD", "POOLER_RESOLUTION", d.pooler_resolution)),
            res5_halve=bool(get("ROI_BOX_HEAD", "RES5HALVE", d.res5_halve)),
        )

    def to_port_dict(self) -> dict[str, Any]:
        """The port's nested config mapping for these settings (what `save_yaml` writes; `from_port_dict` inverts it).

        Keys the port needs to build the same network but this module does not read are written with the port's
        test-time values too, so a saved directory also loads into the HF port itself.
        """
        return {
            "MODEL": {
                "DEVICE": "cpu",
                "MAX_POOL": self.caffe_maxpool,
                "PIXEL_MEAN": list(self.pixel_mean),
                "PIXEL_STD": list(self.pixel_std),
            },
            "INPUT": {
                "FORMAT": self.input_format,
                "MIN_SIZE_TEST": self.min_size_test,
                "MAX_SIZE_TEST": self.max_size_test,
            },
            "SIZE_DIVISIBILITY": 0,
            "PAD_VALUE": 0.0,
            "MAX_DETECTIONS": 36,
            "MIN_DETECTIONS": 36,
            "BACKBONE": {"FREEZE_AT": 2},
            "RESNETS": {
                "DEPTH": self.depth,
                "NORM": "BN",
                "NUM_GROUPS": self.num_groups,
                "WIDTH_PER_GROUP": self.width_per_group,
                "STEM_OUT_CHANNELS": self.stem_out_channels,
                "RES2_OUT_CHANNELS": self.res2_out_channels,
                "STRIDE_IN_1X1": self.stride_in_1x1,
                "RES5_DILATION": 1,
                "OUT_FEATURES": ["res4"],
            },
            "PROPOSAL_GENERATOR": {"HIDDEN_CHANNELS": self.rpn_hidden_channels, "MIN_SIZE": self.rpn_min_size},
            "ANCHOR_GENERATOR": {
                "SIZES": [list(self.anchor_sizes)],
                "ASPECT_RATIOS": [list(self.anchor_aspect_ratios)],
                "OFFSET": self.anchor_offset,
            },
            "RPN": {
                "IN_FEATURES": ["res4"],
                "NMS_THRESH": self.rpn_nms_thresh,
                "PRE_NMS_TOPK_TEST": self.rpn_pre_nms_topk,
                "POST_NMS_TOPK_TEST": self.rpn_post_nms_topk,
                "BBOX_REG_WEIGHTS": list(self.rpn_bbox_reg_weights),
            },
            "ROI_HEADS": {
                "IN_FEATURES": ["res4"],
                "NUM_CLASSES": self.num_classes,
                "NMS_THRESH_TEST": 0.3,
                "SCORE_THRESH_TEST": 0.2,
            },
            "ROI_BOX_HEAD": {
                "POOLER_RESOLUTION": self.pooler_resolution,
                "POOLER_SAMPLING_RATIO": 0,
                "RES5HALVE": self.res5_halve,
                "ATTR": True,
                "NUM_ATTRS": self.num_attrs,
                "CLS_AGNOSTIC_BBOX_REG": False,
                "BBOX_REG_WEIGHTS": [10.0, 10.0, 5.0, 5.0],
            },
        }

    def save_yaml(self, path: str | Path) -> None:
        """Write the port-format `config.yaml`."""
        with atomic_writer(path) as f:  # replaced whole, or left as it was
            yaml.safe_dump(self.to_port_dict(), f, sort_keys=False)

    def summary(self) -> str:
        """One line naming the sizes that matter, for logs."""
        return (
            f"ResNet-{self.depth} C4 (stem {self.stem_out_channels}, res2 {self.res2_out_channels}, "
            f"pooled {self.pooled_dim}), {self.num_anchors} anchors, {self.num_classes}+1 classes, "
            f"{self.num_attrs}+1 attributes, resize {self.min_size_test}/{self.max_size_test}"
        )


def _single_level(value: Any, key: str) -> list:
    """Anchor sizes/ratios are `[[...]]` (one list per feature level); this detector has exactly one level."""
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple)):
        if len(value) != 1:
            raise ValueError(f"{key} has {len(value)} levels; the C4 detector has one feature level")
        value = value[0]
    return list(value)


def _triple(value: Any, key: str, source: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"{source}: {key} must have 3 values, got {len(values)}")
    return values  # type: ignore[return-value]
