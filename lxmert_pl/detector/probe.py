"""Which proposal geometry do a detector's weights expect? Evidence from their own RoI box regressor.

The RoI head's class-specific box regressor (`bbox_pred`, decode weights 10, 10, 5, 5) was trained on proposals of
the geometry the weights were trained with. On confident detections its mean correction is about zero on proposals
of that geometry, and systematically shifted on proposals of the other one (the anchor centres differ by 7.5 px, so
about 8 px at network scale for the centre). The probe runs the same weights with both geometries on a few images,
decodes the regressor's correction of every confident detection (best object class's deltas), and reports per
geometry the mean and median centre shift (network pixels) and log-size change, and a verdict: the geometry with
the smaller systematic (mean) centre shift, or "inconclusive" when the two are close (e.g. random or untrained
weights) or there are too few confident detections.

    report = probe_detector("checkpoints/unc-nlp/frcnn-vg-finetuned", "images/", max_images=50)
    print(report.summary())
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import UserInputError
from .extraction import list_images
from .geometry import GEOMETRIES
from .loading import load_box_regressor, load_detector
from .model import BottomUpFasterRCNN
from .preprocess import ImageReadError, read_image
from .selection import object_columns

INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class BoxCorrections:
    """The regressor's correction of N boxes: centre shifts `shift_x`, `shift_y` (network pixels) and log-size
    changes `log_w`, `log_h`, each (N,)."""

    shift_x: torch.Tensor
    shift_y: torch.Tensor
    log_w: torch.Tensor
    log_h: torch.Tensor

    @staticmethod
    def cat(parts: Sequence[BoxCorrections]) -> BoxCorrections:
        empty = torch.zeros(0)
        return BoxCorrections(
            *(torch.cat([getattr(p, name).cpu() for p in parts] or [empty]) for name in _CORRECTION_FIELDS)
        )

    def __len__(self) -> int:
        return self.shift_x.numel()


_CORRECTION_FIELDS = ("shift_x", "shift_y", "log_w", "log_h")


def decode_corrections(
    deltas: torch.Tensor,
    classes: torch.Tensor,
    boxes: torch.Tensor,
    weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
) -> BoxCorrections:
    """The correction the regressor applies to each box for its class.

    Args:
        deltas: (N, 4K) regressor outputs, class k's (dx, dy, dw, dh) in columns 4k..4k+3 (the port's layout:
            object classes only, background dropped).
        classes: (N,) object class index 0..K-1 of each box.
        boxes: (N, 4) x1 y1 x2 y2, network pixels.
        weights: divisors of (dx, dy, dw, dh) (the port's ROI_BOX_HEAD.BBOX_REG_WEIGHTS).
    The centre shift is dx·w, dy·h with the port's widths x2 − x1 (caffe's +1 changes it by under 1 %).
    """
    if deltas.shape[0] == 0:
        empty = deltas.new_zeros(0)
        return BoxCorrections(empty, empty, empty, empty)
    per_class = deltas.reshape(deltas.shape[0], -1, 4)[torch.arange(deltas.shape[0]), classes]
    wx, wy, ww, wh = weights
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return BoxCorrections(
        shift_x=per_class[:, 0] / wx * widths,
        shift_y=per_class[:, 1] / wy * heights,
        log_w=per_class[:, 2] / ww,
        log_h=per_class[:, 3] / wh,
    )


@dataclass(frozen=True)
class GeometryStats:
    """Summary of the corrections over one geometry's confident detections (pixels at network scale)."""

    geometry: str
    count: int
    mean_shift: tuple[float, float]
    median_shift: tuple[float, float]
    mean_log_size: tuple[float, float]
    median_log_size: tuple[float, float]

    @classmethod
    def from_corrections(cls, geometry: str, corrections: BoxCorrections) -> GeometryStats:
        def pair(a: torch.Tensor, b: torch.Tensor, reduce: Callable[[np.ndarray], float]) -> tuple[float, float]:
            if a.numel() == 0:
                return (math.nan, math.nan)
            return (float(reduce(a.double().cpu().numpy())), float(reduce(b.double().cpu().numpy())))

        c = corrections
        return cls(
            geometry=geometry,
            count=len(c),
            mean_shift=pair(c.shift_x, c.shift_y, np.mean),
            median_shift=pair(c.shift_x, c.shift_y, np.median),
            mean_log_size=pair(c.log_w, c.log_h, np.mean),
            median_log_size=pair(c.log_w, c.log_h, np.median),
        )

    @property
    def systematic_shift(self) -> float:
        """Length of the mean centre shift vector (network pixels): ≈ 0 on the geometry the weights expect."""
        return math.hypot(*self.mean_shift)

    def describe(self) -> str:
        (mx, my), (dx, dy) = self.mean_shift, self.median_shift
        (mw, mh), (dw, dh) = self.mean_log_size, self.median_log_size
        return (
            f"{self.geometry:>5}: {self.count} confident detections; centre shift mean ({mx:+.2f}, {my:+.2f}) px "
            f"(|mean| {self.systematic_shift:.2f}), median ({dx:+.2f}, {dy:+.2f}) px; log-size change mean "
            f"({mw:+.3f}, {mh:+.3f}), median ({dw:+.3f}, {dh:+.3f})"
        )


@dataclass(frozen=True)
class Verdict:
    """`geometry` the weights expect, or `INCONCLUSIVE`; `reason` says why in one sentence."""

    geometry: str
    reason: str


class GeometryProbe:
    """Measures the regressor's corrections per geometry and decides.

    Args:
        min_confidence: a detection is confident when its best object-class probability reaches this (0.2: the
            original extraction's confidence threshold).
        min_detections: fewer confident detections than this in either geometry -> inconclusive.
        min_difference_px: the two systematic shifts must differ by at least this many network pixels ...
        max_ratio: ... and the smaller must be at most this fraction of the larger; otherwise inconclusive.
        decode_weights: the regressor's (dx, dy, dw, dh) divisors (10, 10, 5, 5 in the port's config).
    """

    def __init__(
        self,
        min_confidence: float = 0.2,
        min_detections: int = 20,
        min_difference_px: float = 2.0,
        max_ratio: float = 0.5,
        decode_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
    ) -> None:
        self.min_confidence = min_confidence
        self.min_detections = min_detections
        self.min_difference_px = min_difference_px
        self.max_ratio = max_ratio
        self.decode_weights = decode_weights

    @torch.inference_mode()
    def corrections(
        self, model: BottomUpFasterRCNN, regressor: nn.Module, images: Sequence[np.ndarray]
    ) -> BoxCorrections:
        """The corrections of every confident detection of `model` on `images` (BGR uint8), one image at a time."""
        regressor = regressor.to(model.device)
        parts = []
        for image in images:
            region = model.detect([image])[0]
            object_prob, _ = object_columns(region.cls_prob, region.attr_prob, model.background_first)
            confidence, classes = object_prob.max(dim=1)
            confident = confidence >= self.min_confidence
            deltas = regressor(region.pooled[confident])
            parts.append(decode_corrections(deltas, classes[confident], region.boxes[confident], self.decode_weights))
        return BoxCorrections.cat(parts)

    def decide(self, stats: Sequence[GeometryStats], regressor_is_zero: bool = False) -> Verdict:
        """The verdict from per-geometry summaries (rules in the class docstring)."""
        if regressor_is_zero:
            return Verdict(INCONCLUSIVE, "the checkpoint's bbox_pred is all zeros (untrained): it carries no evidence")
        few = [s for s in stats if s.count < self.min_detections]
        if few:
            counts = ", ".join(f"{s.geometry} {s.count}" for s in stats)
            return Verdict(
                INCONCLUSIVE,
                f"too few confident detections (probability >= {self.min_confidence}): {counts}; "
                f"at least {self.min_detections} needed (use more images)",
            )
        ranked = sorted(stats, key=lambda s: s.systematic_shift)
        best, worst = ranked[0], ranked[-1]
        gap = worst.systematic_shift - best.systematic_shift
        if gap >= self.min_difference_px and best.systematic_shift <= self.max_ratio * worst.systematic_shift:
            return Verdict(
                best.geometry,
                f"the box regressor corrects {best.geometry} proposals by {best.systematic_shift:.2f} px on average "
                f"and {worst.geometry} proposals by {worst.systematic_shift:.2f} px: the weights expect "
                f"{best.geometry} proposals",
            )
        shifts = ", ".join(f"{s.geometry} {s.systematic_shift:.2f} px" for s in stats)
        return Verdict(
            INCONCLUSIVE,
            f"the systematic centre corrections ({shifts}) are too close to tell "
            f"(needed: a gap >= {self.min_difference_px} px and a ratio <= {self.max_ratio})",
        )


@dataclass(frozen=True)
class ProbeReport:
    """What `probe_detector` found: per-geometry summaries, the verdict, and the images used / skipped."""

    stats: tuple[GeometryStats, ...]
    verdict: Verdict
    num_images: int
    skipped: tuple[str, ...] = ()

    def summary(self) -> str:
        lines = [f"geometry probe on {self.num_images} image(s) (RoI box regressor's correction, network pixels):"]
        lines += ["  " + s.describe() for s in self.stats]
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} unreadable image(s): {', '.join(self.skipped[:5])}")
        lines.append(f"verdict: {self.verdict.geometry} ({self.verdict.reason})")
        return "\n".join(lines)


def probe_detector(
    detector: str | Path,
    images: str | Path | Sequence[str | Path],
    max_images: int | None = 50,
    config: str | Path | None = None,
    device: str = "cpu",
    probe: GeometryProbe | None = None,
) -> ProbeReport:
    """Run `probe` (default settings when None) on a detector directory / weights file with both geometries.

    Args:
        detector: what `load_detector` takes (a registry alias must be resolved first).
        images: an image folder, a list file or paths (`extraction.list_images`); the first `max_images` readable
            ones are used (all when None).
    """
    probe = probe or GeometryProbe()
    paths = list_images(images)
    arrays, skipped = [], []
    for path in paths:
        if max_images is not None and len(arrays) >= max_images:
            break
        try:
            arrays.append(read_image(path))
        except ImageReadError:
            skipped.append(str(path))
    if not arrays:
        raise UserInputError(f"no readable image in {images} for the geometry probe")
    regressor = load_box_regressor(detector, config)
    regressor_is_zero = not any(bool(p.detach().abs().max() > 0) for p in regressor.parameters())
    stats = []
    for geometry in GEOMETRIES:
        model, _ = load_detector(detector, config=config, device=device, geometry=geometry)
        stats.append(GeometryStats.from_corrections(geometry, probe.corrections(model, regressor, arrays)))
        del model
    return ProbeReport(tuple(stats), probe.decide(stats, regressor_is_zero), len(arrays), tuple(skipped))
