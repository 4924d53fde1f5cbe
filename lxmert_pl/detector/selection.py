"""Box selection of the original obj36 / 10-100 extraction (SPEC.md §5; airsplay/lxmert `extract_coco_image.py`).

1. For every object class k: greedy NMS over all RoIs scored by `cls_prob[:, k]` (caffe `cpu_nms`: "+1" areas and
   intersections, float32, suppress at IoU >= nms_thresh; equal scores -> lower RoI index first), and
   `max_conf[i] = max(max_conf[i], cls_prob[i, k])` for every kept i.
2. keep = indices with max_conf >= conf_thresh, ascending; fewer than min_boxes -> the min_boxes largest max_conf,
   more than max_boxes -> the max_boxes largest (stable descending: ties -> lower index first).
3. Per kept RoI: best object class (background excluded) and its probability, best attribute ("no attribute"
   excluded) and its probability, all read from the full softmaxes (not renormalised).

The per-class NMS runs for all classes at once: the IoU matrix does not depend on the class, only the visiting
order does, so one pass over the ranks updates every class's suppression mask together.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BoxSelection:
    """How many boxes to keep and the original's thresholds.

    Args:
        min_boxes, max_boxes: 36/36 for obj36 files, 10/100 for the adaptive ones.
        nms_thresh: per-class NMS IoU threshold (caffe TEST.NMS = 0.3).
        conf_thresh: max_conf needed to be kept without the MIN/MAX fallback (0.2).
    """

    min_boxes: int = 36
    max_boxes: int = 36
    nms_thresh: float = 0.3
    conf_thresh: float = 0.2

    def __post_init__(self) -> None:
        if not 1 <= self.min_boxes <= self.max_boxes:
            raise ValueError(f"need 1 <= min_boxes <= max_boxes, got {self.min_boxes}, {self.max_boxes}")

    def describe(self) -> str:
        if self.min_boxes == self.max_boxes:
            return f"fixed {self.max_boxes} boxes"
        return f"adaptive {self.min_boxes}-{self.max_boxes} boxes (conf >= {self.conf_thresh})"


OBJ36 = BoxSelection(36, 36)
ADAPTIVE_10_100 = BoxSelection(10, 100)


@dataclass
class SelectedBoxes:
    """Result of `select_boxes` (tensors on the input's device).

    `keep` (n,) indexes the input RoIs in the order the original writes them; `max_conf` (N,) covers all RoIs;
    ids are 0..num_classes-1 / 0..num_attrs-1 (background / no-attribute removed); `boxes` = rois[keep].
    """

    keep: torch.Tensor
    max_conf: torch.Tensor
    objects_id: torch.Tensor
    objects_conf: torch.Tensor
    attrs_id: torch.Tensor
    attrs_conf: torch.Tensor
    boxes: torch.Tensor


def object_columns(
    cls_prob: torch.Tensor, attr_prob: torch.Tensor, background_first: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The object-class and attribute columns of the full softmaxes (background / "no attribute" column dropped)."""
    if background_first:
        return cls_prob[:, 1:], attr_prob[:, 1:]
    return cls_prob[:, :-1], attr_prob[:, :-1]


def caffe_iou(boxes: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU (N, N) with caffe's pixel-inclusive "+1" convention, float32 as `cpu_nms` computes it."""
    boxes = boxes.to(torch.float32)
    x1, y1, x2, y2 = boxes.unbind(dim=1)
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    w = (torch.minimum(x2[:, None], x2[None, :]) - torch.maximum(x1[:, None], x1[None, :]) + 1).clamp(min=0)
    h = (torch.minimum(y2[:, None], y2[None, :]) - torch.maximum(y1[:, None], y1[None, :]) + 1).clamp(min=0)
    inter = w * h
    return inter / (areas[:, None] + areas[None, :] - inter)


def per_class_nms_max_conf(boxes: torch.Tensor, scores: torch.Tensor, nms_thresh: float) -> torch.Tensor:
    """max over classes k of scores[i, k] where RoI i survives class k's greedy NMS; 0 if it survives none.

    Args:
        boxes: (N, 4) RoIs, x1 y1 x2 y2 (original pixels).
        scores: (N, K) per-class scores (object columns only).
        nms_thresh: suppress a lower-ranked RoI when its IoU with a kept one is >= nms_thresh.
    """
    num_rois, num_classes = scores.shape
    if num_rois == 0:
        return scores.new_zeros(0)
    with _one_cpu_thread(scores.device):
        suppresses = caffe_iou(boxes) >= nms_thresh  # (N, N); symmetric, diagonal True
        order = torch.sort(scores.t(), dim=1, descending=True, stable=True).indices  # (K, N), ties -> lower index
        suppressed = torch.zeros(num_classes, num_rois, dtype=torch.bool, device=scores.device)
        kept = torch.zeros_like(suppressed)
        classes = torch.arange(num_classes, device=scores.device)
        for rank in range(num_rois):
            candidate = order[:, rank]  # (K,) the RoI each class visits at this rank
            alive = ~suppressed[classes, candidate]
            alive_classes, alive_rois = classes[alive], candidate[alive]
            kept[alive_classes, alive_rois] = True
            # A kept RoI suppresses all RoIs overlapping it (visited ones are decided: marking them is harmless).
            suppressed[alive_classes] |= suppresses[alive_rois]
        return torch.where(kept.t(), scores, torch.zeros_like(scores)).amax(dim=1)


@contextmanager
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the per-class NMS's ~2,000 small CPU ops on one thread (torch's process-wide setting, restored after).

    Handing such small ops to a thread pool costs more than it saves, and on a busy machine every hand-off can wait
    milliseconds for a descheduled worker (measured on 2 loaded cores: 0.15 s on one thread vs. 0.4-1.4 s on two).
    """
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def select_boxes(
    rois: torch.Tensor,
    cls_prob: torch.Tensor,
    attr_prob: torch.Tensor,
    selection: BoxSelection,
    background_first: bool,
) -> SelectedBoxes:
    """The original extraction's box selection.

    Args:
        rois: (N, 4) proposals in original-image pixels (cast to float32, as the original's rois are).
        cls_prob: (N, num_classes + 1) softmax over all classes including background.
        attr_prob: (N, num_attrs + 1) softmax over all attributes including "no attribute".
        selection: box counts and thresholds.
        background_first: True for the caffe layout (background / no-attribute in column 0), False for the HF
            port's checkpoints (the LAST column).
    """
    rois = rois.to(torch.float32)
    object_prob, attribute_prob = object_columns(cls_prob, attr_prob, background_first)
    max_conf = per_class_nms_max_conf(rois, object_prob, selection.nms_thresh)

    keep = torch.nonzero(max_conf >= selection.conf_thresh).flatten()
    if keep.numel() < selection.min_boxes or keep.numel() > selection.max_boxes:
        limit = selection.min_boxes if keep.numel() < selection.min_boxes else selection.max_boxes
        keep = torch.sort(max_conf, descending=True, stable=True).indices[:limit]

    objects_id = object_prob[keep].argmax(dim=1)
    attrs_id = attribute_prob[keep].argmax(dim=1)
    return SelectedBoxes(
        keep=keep,
        max_conf=max_conf,
        objects_id=objects_id,
        objects_conf=object_prob[keep].gather(1, objects_id[:, None]).squeeze(1),
        attrs_id=attrs_id,
        attrs_conf=attribute_prob[keep].gather(1, attrs_id[:, None]).squeeze(1),
        boxes=rois[keep],
    )
