"""Region proposal network at test time, as the HF port / detectron2 conversion computes it (SPEC.md §3, column [H]).

Anchors: `sizes x aspect_ratios` per location (sizes outer, ratios inner), exact `w = sqrt(size² / r)`, `h = r·w`,
centred on (stride·x + offset·stride, stride·y + offset·stride); flattened (y, x, anchor). Deltas are decoded without
"+1" (widths `x2 - x1`), dw/dh clamped at log(1000/16). Then: top-k by objectness logit, clip to [0, W] x [0, H], drop
boxes with a side <= min_size, torchvision NMS, keep post_nms_topk, in descending logit order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import clip_boxes_to_image, nms

from .geometry import PORT


class AnchorGenerator(nn.Module):
    """Cell anchors (A x 4, x1 y1 x2 y2 around 0) and their tiling over a feature map.

    Args:
        sizes: anchor sides in input pixels (sqrt of the area).
        aspect_ratios: h / w ratios.
        stride: feature-map stride in input pixels.
        offset: anchor centres at (offset + i) * stride.
    The cell anchors are a buffer because the port's checkpoint carries them (`cell_anchors.0`); the loader checks
    and loads them, so the tiling uses exactly the checkpoint's values.
    """

    def __init__(
        self, sizes: tuple[float, ...], aspect_ratios: tuple[float, ...], stride: int, offset: float = 0.0
    ) -> None:
        super().__init__()
        if not 0.0 <= offset < 1.0:
            raise ValueError(f"anchor offset must lie in [0, 1), got {offset}")
        self.stride = stride
        self.offset = offset
        self.register_buffer("cell_anchors", self.generate_cell_anchors(sizes, aspect_ratios))

    @staticmethod
    def generate_cell_anchors(sizes: tuple[float, ...], aspect_ratios: tuple[float, ...]) -> torch.Tensor:
        anchors = []
        for size in sizes:
            area = float(size) ** 2.0
            for ratio in aspect_ratios:
                w = math.sqrt(area / ratio)
                h = ratio * w
                anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
        return torch.tensor(anchors, dtype=torch.float32)

    @property
    def num_anchors(self) -> int:
        return self.cell_anchors.shape[0]

    def forward(self, grid_height: int, grid_width: int) -> torch.Tensor:
        """All anchors of a grid_height x grid_width feature map, shape (grid_height * grid_width * A, 4)."""
        device = self.cell_anchors.device
        start = self.offset * self.stride
        shifts_x = torch.arange(start, grid_width * self.stride, step=self.stride, dtype=torch.float32, device=device)
        shifts_y = torch.arange(start, grid_height * self.stride, step=self.stride, dtype=torch.float32, device=device)
        shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
        shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
        shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
        return (shifts.view(-1, 1, 4) + self.cell_anchors.view(1, -1, 4)).reshape(-1, 4)


class RPNHead(nn.Module):
    """3x3 conv (+bias) -> ReLU, then 1x1 convs for A objectness logits and 4A box deltas (channel a*4 + k)."""

    def __init__(self, in_channels: int, hidden_channels: int, num_anchors: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden_channels, kernel_size=3, stride=1, padding=1)
        self.cls_logits = nn.Conv2d(hidden_channels, num_anchors, kernel_size=1)
        self.bbox_pred = nn.Conv2d(hidden_channels, num_anchors * 4, kernel_size=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = F.relu(self.conv(x))
        return self.cls_logits(t), self.bbox_pred(t)


class BoxDecoder:
    """Applies (dx, dy, dw, dh) deltas to boxes, detectron2 convention (no "+1"; dw/dh clamped).

    Args:
        weights: divisors of (dx, dy, dw, dh).
        scale_clamp: upper bound of dw, dh before exp (log(1000/16) by default).
    """

    def __init__(self, weights: tuple[float, float, float, float], scale_clamp: float = math.log(1000.0 / 16)) -> None:
        self.weights = weights
        self.scale_clamp = scale_clamp

    def decode(self, deltas: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """deltas (N, 4), boxes (N, 4) -> decoded boxes (N, 4)."""
        widths = boxes[:, 2] - boxes[:, 0]
        heights = boxes[:, 3] - boxes[:, 1]
        ctr_x = boxes[:, 0] + 0.5 * widths
        ctr_y = boxes[:, 1] + 0.5 * heights
        wx, wy, ww, wh = self.weights
        dx = deltas[:, 0] / wx
        dy = deltas[:, 1] / wy
        dw = torch.clamp(deltas[:, 2] / ww, max=self.scale_clamp)
        dh = torch.clamp(deltas[:, 3] / wh, max=self.scale_clamp)
        pred_ctr_x = dx * widths + ctr_x
        pred_ctr_y = dy * heights + ctr_y
        pred_w = torch.exp(dw) * widths
        pred_h = torch.exp(dh) * heights
        return torch.stack(
            (
                pred_ctr_x - 0.5 * pred_w,
                pred_ctr_y - 0.5 * pred_h,
                pred_ctr_x + 0.5 * pred_w,
                pred_ctr_y + 0.5 * pred_h,
            ),
            dim=1,
        )


class RegionProposalNetwork(nn.Module):
    """Proposals for ONE image from its res4 map (the proposal layer is per image, as in the original).

    Args:
        anchor_generator, head: the parts above (head.num_anchors must equal the generator's A).
        box_decoder: delta decoding.
        pre_nms_topk: proposals kept by logit before NMS (6000).
        post_nms_topk: proposals kept after NMS (300).
        nms_thresh: IoU above which a lower-scored proposal is suppressed (0.7).
        min_size: proposals with a side <= min_size (network pixels) are dropped (0).
    """

    geometry = PORT

    def __init__(
        self,
        anchor_generator: AnchorGenerator,
        head: RPNHead,
        box_decoder: BoxDecoder,
        pre_nms_topk: int = 6000,
        post_nms_topk: int = 300,
        nms_thresh: float = 0.7,
        min_size: float = 0.0,
    ) -> None:
        super().__init__()
        if head.cls_logits.out_channels != anchor_generator.num_anchors:
            raise ValueError(
                f"RPN head predicts {head.cls_logits.out_channels} anchors per location, "
                f"the anchor generator has {anchor_generator.num_anchors}"
            )
        self.anchor_generator = anchor_generator
        self.head = head
        self.box_decoder = box_decoder
        self.pre_nms_topk = pre_nms_topk
        self.post_nms_topk = post_nms_topk
        self.nms_thresh = nms_thresh
        self.min_size = min_size

    def forward(
        self, features: torch.Tensor, image_size: tuple[int, int], scale: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """features (1, C, h, w) of an image of network size image_size = (H, W); `scale` (network / original) is
        not used: the port's minimum size is in network pixels (it is accepted to share the caffe layer's call).

        Returns (boxes (P, 4) in network pixels, objectness logits (P,)), descending by logit, P <= post_nms_topk.
        """
        if features.shape[0] != 1:
            raise ValueError(f"the RPN takes one image at a time, got a batch of {features.shape[0]}")
        logits, deltas = self.head(features)
        num_anchors, grid_h, grid_w = logits.shape[1:]
        # (1, A, h, w) -> (h*w*A,) and (1, 4A, h, w) -> (h*w*A, 4): flattening order (y, x, anchor).
        logits = logits.permute(0, 2, 3, 1).reshape(-1)
        deltas = deltas.view(1, num_anchors, 4, grid_h, grid_w).permute(0, 3, 4, 1, 2).reshape(-1, 4)
        proposals = self.box_decoder.decode(deltas, self.anchor_generator(grid_h, grid_w))

        num_top = min(self.pre_nms_topk, logits.numel())
        logits, order = logits.sort(descending=True)
        logits, proposals = logits[:num_top], proposals[order[:num_top]]
        proposals = clip_boxes_to_image(proposals, image_size)
        widths, heights = proposals[:, 2] - proposals[:, 0], proposals[:, 3] - proposals[:, 1]
        nonempty = (widths > self.min_size) & (heights > self.min_size)
        proposals, logits = proposals[nonempty], logits[nonempty]
        keep = nms(proposals, logits, self.nms_thresh)[: self.post_nms_topk]
        return proposals[keep], logits[keep]
