"""The ORIGINAL bottom-up-attention TEST proposal layer, run on the HF port's RPN head (the `caffe` geometry).

SPEC.md §3 (left column) and ../shared/golden/frcnn/CAFFE.md. The port-format weights are read under the
plain-permutation reading: the port's RPN channel a_p = s·R + r (sizes outer, ratios inner; it pairs with the
checkpoint's `cell_anchors` row a_p) is caffe's channel a_c = r·S + s (ratios outer, scales inner); caffe's foreground
probability is the 2-channel softmax of (0, port logit), i.e. its sigmoid, in float32; the deltas move with their
anchor. Then, per image, exactly caffe's `proposal_layer.py`:

1. anchors = `generate_anchors(base 16, ratios, scales = sizes / 16)` (integer-rounded shapes around (7.5, 7.5)),
   shifted by 16·(x, y); candidates in caffe's memory order (y, x, a_c);
2. `bbox_transform_inv`: widths `x2 − x1 + 1`, centre `x1 + 0.5·w`, no clamp on dw/dh; float32, each exp rounded
   exactly to float32;
3. clip to [0, W−1] × [0, H−1];
4. drop boxes with `w + 1 < min_size·im_scale` or `h + 1 < min_size·im_scale` (before ranking);
5. rank by probability, descending, ties → lower flat index first; keep the top `pre_nms_topk`;
6. `cpu_nms`: "+1" areas and intersections in float32, suppress at IoU >= `nms_thresh`; keep `post_nms_topk`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .geometry import CAFFE
from .rpn import RPNHead

# caffe `cfg.TEST.RPN_MIN_SIZE`: proposals narrower or lower than this many ORIGINAL-image pixels are dropped.
CAFFE_RPN_MIN_SIZE = 16.0


class CaffeAnchorGenerator(nn.Module):
    """Caffe's `generate_anchors` cell anchors (A x 4, row a_c = r·S + s) and their tiling over a feature map.

    Args:
        sizes: anchor sides in input pixels (64, 128, 256, 512 for the published model); caffe's scales are
            sizes / base_size.
        aspect_ratios: h / w ratios (0.5, 1, 2).
        stride: feature-map stride in input pixels (16); also caffe's base anchor size.
    The anchors are computed in float64 as numpy does (ratio enumeration with `np.round`, half to even, then the
    scale enumeration) and stored as float32 (their values are half-integers: exact). Not in the state dict: the
    caffe geometry never uses the checkpoint's `cell_anchors`.
    """

    def __init__(self, sizes: tuple[float, ...], aspect_ratios: tuple[float, ...], stride: int = 16) -> None:
        super().__init__()
        self.stride = stride
        self.num_sizes = len(sizes)
        self.num_ratios = len(aspect_ratios)
        anchors = self.generate_cell_anchors(sizes, aspect_ratios, stride)
        self.register_buffer("cell_anchors", torch.from_numpy(anchors).to(torch.float32), persistent=False)

    @staticmethod
    def generate_cell_anchors(
        sizes: tuple[float, ...], aspect_ratios: tuple[float, ...], base_size: int = 16
    ) -> np.ndarray:
        """float64 (R·S, 4) anchors x1 y1 x2 y2, ratios outer and scales inner, as caffe's `generate_anchors`."""
        scales = np.asarray(sizes, dtype=np.float64) / base_size
        ratios = np.asarray(aspect_ratios, dtype=np.float64)
        centre = 0.5 * (base_size - 1)  # the base anchor [0, 0, base-1, base-1]
        area = float(base_size * base_size)
        ratio_ws = np.round(np.sqrt(area / ratios))
        ratio_hs = np.round(ratio_ws * ratios)
        rows = []
        for w, h in zip(ratio_ws, ratio_hs, strict=True):
            ws, hs = w * scales, h * scales
            half_w, half_h = 0.5 * (ws - 1), 0.5 * (hs - 1)
            rows.append(np.stack([centre - half_w, centre - half_h, centre + half_w, centre + half_h], axis=1))
        return np.concatenate(rows, axis=0)

    @property
    def num_anchors(self) -> int:
        return self.cell_anchors.shape[0]

    def port_channel_order(self) -> list[int]:
        """For each caffe channel a_c = r·S + s, the port channel a_p = s·R + r it reads (plain permutation)."""
        return [s * self.num_ratios + r for r in range(self.num_ratios) for s in range(self.num_sizes)]

    def forward(self, grid_height: int, grid_width: int) -> torch.Tensor:
        """All anchors of a grid_height x grid_width map, (grid_height * grid_width * A, 4), order (y, x, a_c)."""
        device = self.cell_anchors.device
        shifts_x = torch.arange(grid_width, dtype=torch.float32, device=device) * self.stride
        shifts_y = torch.arange(grid_height, dtype=torch.float32, device=device) * self.stride
        shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
        shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
        shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
        return (shifts.view(-1, 1, 4) + self.cell_anchors.view(1, -1, 4)).reshape(-1, 4)


def exact_exp(x: torch.Tensor) -> torch.Tensor:
    """exp of a float32 tensor, rounded once to float32 (computed in float64): CAFFE.md's definition of each exp."""
    return torch.exp(x.to(torch.float64)).to(torch.float32)


def caffe_fg_probability(logits: torch.Tensor) -> torch.Tensor:
    """Caffe's foreground probability of port objectness logits: the softmax over (bg 0, fg logit) in float32, in
    caffe's order (subtract the max, exp, divide by the sum). Mathematically the logit's sigmoid."""
    logits = logits.to(torch.float32)
    peak = torch.clamp(logits, min=0.0)
    background = exact_exp(-peak)
    foreground = exact_exp(logits - peak)
    return foreground / (background + foreground)


def caffe_decode(deltas: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """`bbox_transform_inv` in float32: "+1" widths, centre x1 + 0.5·w, no dw/dh clamp. deltas, anchors (N, 4)."""
    anchors = anchors.to(deltas.dtype)
    widths = anchors[:, 2] - anchors[:, 0] + 1.0
    heights = anchors[:, 3] - anchors[:, 1] + 1.0
    ctr_x = anchors[:, 0] + 0.5 * widths
    ctr_y = anchors[:, 1] + 0.5 * heights
    pred_ctr_x = deltas[:, 0] * widths + ctr_x
    pred_ctr_y = deltas[:, 1] * heights + ctr_y
    pred_w = exact_exp(deltas[:, 2]) * widths
    pred_h = exact_exp(deltas[:, 3]) * heights
    return torch.stack(
        (pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h, pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h),
        dim=1,
    )


def caffe_clip(boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """`clip_boxes`: x into [0, W − 1], y into [0, H − 1] (W, H = network image size)."""
    height, width = image_size
    x = boxes[:, 0::2].clamp(min=0.0, max=float(width - 1))
    y = boxes[:, 1::2].clamp(min=0.0, max=float(height - 1))
    return torch.stack((x[:, 0], y[:, 0], x[:, 1], y[:, 1]), dim=1)


def caffe_nms(boxes: torch.Tensor, thresh: float, max_keep: int | None = None) -> torch.Tensor:
    """Greedy NMS of `cpu_nms` on boxes (N, 4) ALREADY in rank order: "+1" areas and intersections in float32,
    a box is suppressed when its IoU with a kept box is >= thresh (compared in float64, as Cython's double
    threshold). Returns the kept indices (at most max_keep), in rank order."""
    count = boxes.shape[0]
    limit = count if max_keep is None else min(max_keep, count)
    x1, y1, x2, y2 = boxes.to(torch.float32).unbind(dim=1)
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    suppressed = torch.zeros(count, dtype=torch.bool, device=boxes.device)
    keep: list[int] = []
    start = 0
    while len(keep) < limit and start < count:
        alive = torch.nonzero(~suppressed[start:])
        if alive.numel() == 0:
            break
        i = start + int(alive[0, 0])
        keep.append(i)
        rest = slice(i + 1, count)
        w = (torch.minimum(x2[i], x2[rest]) - torch.maximum(x1[i], x1[rest]) + 1).clamp(min=0.0)
        h = (torch.minimum(y2[i], y2[rest]) - torch.maximum(y1[i], y1[rest]) + 1).clamp(min=0.0)
        inter = w * h
        overlap = inter / (areas[i] + areas[rest] - inter)
        suppressed[rest] |= overlap.to(torch.float64) >= thresh
        start = i + 1
    return torch.tensor(keep, dtype=torch.long, device=boxes.device)


class CaffeProposalLayer(nn.Module):
    """Proposals for ONE image from its res4 map, with caffe's TEST proposal layer (module docstring).

    Args:
        anchor_generator: caffe's anchors (its sizes x ratios must match the head's channel count).
        head: the port's RPN head (3x3 conv + ReLU, A objectness logits, 4A deltas), loaded unchanged.
        pre_nms_topk: candidates kept by probability before NMS (caffe RPN_PRE_NMS_TOP_N 6000).
        post_nms_topk: proposals kept after NMS (RPN_POST_NMS_TOP_N 300).
        nms_thresh: IoU at or above which a lower-ranked candidate is suppressed (RPN_NMS_THRESH 0.7).
        min_size: candidates with w + 1 or h + 1 below min_size · im_scale network pixels are dropped
            (RPN_MIN_SIZE 16, in original-image pixels).
    """

    geometry = CAFFE

    def __init__(
        self,
        anchor_generator: CaffeAnchorGenerator,
        head: RPNHead,
        pre_nms_topk: int = 6000,
        post_nms_topk: int = 300,
        nms_thresh: float = 0.7,
        min_size: float = CAFFE_RPN_MIN_SIZE,
    ) -> None:
        super().__init__()
        if head.cls_logits.out_channels != anchor_generator.num_anchors:
            raise ValueError(
                f"RPN head predicts {head.cls_logits.out_channels} anchors per location, "
                f"the caffe anchor generator has {anchor_generator.num_anchors}"
            )
        self.anchor_generator = anchor_generator
        self.head = head
        self.pre_nms_topk = pre_nms_topk
        self.post_nms_topk = post_nms_topk
        self.nms_thresh = nms_thresh
        self.min_size = min_size
        order = torch.tensor(anchor_generator.port_channel_order(), dtype=torch.long)
        self.register_buffer("port_channels", order, persistent=False)

    def forward(
        self, features: torch.Tensor, image_size: tuple[int, int], scale: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """features (1, C, h, w) of an image of network size image_size = (H, W), resized by `scale` (caffe's
        im_info[2]; it sets the minimum size).

        Returns (boxes (P, 4) in network pixels, the port objectness logits of those proposals (P,)), ranked by
        caffe's foreground probability (`caffe_fg_probability` of the logits), P <= post_nms_topk.
        """
        if features.shape[0] != 1:
            raise ValueError(f"the RPN takes one image at a time, got a batch of {features.shape[0]}")
        logits, deltas = self.head(features)
        num_anchors, grid_h, grid_w = logits.shape[1:]
        # Port channels -> caffe channels, then caffe's memory order (y, x, a_c).
        logits = logits[:, self.port_channels].permute(0, 2, 3, 1).reshape(-1).to(torch.float32)
        deltas = deltas.view(1, num_anchors, 4, grid_h, grid_w)[:, self.port_channels]
        deltas = deltas.permute(0, 3, 4, 1, 2).reshape(-1, 4).to(torch.float32)

        proposals = caffe_clip(caffe_decode(deltas, self.anchor_generator(grid_h, grid_w)), image_size)
        threshold = float(np.float32(self.min_size) * np.float32(scale))  # float32 arithmetic, as caffe's im_info
        widths = proposals[:, 2] - proposals[:, 0] + 1
        heights = proposals[:, 3] - proposals[:, 1] + 1
        large = torch.nonzero((widths >= threshold) & (heights >= threshold)).flatten()
        proposals, logits = proposals[large], logits[large]

        probability = caffe_fg_probability(logits)
        order = torch.sort(probability, descending=True, stable=True).indices[: self.pre_nms_topk]
        proposals, logits = proposals[order], logits[order]
        keep = caffe_nms(proposals, self.nms_thresh, self.post_nms_topk)
        return proposals[keep], logits[keep]
