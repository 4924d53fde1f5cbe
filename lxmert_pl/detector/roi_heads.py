"""RoI head: RoIPool 14x14 on res4 -> res5 (dilated, stride 1) -> spatial mean -> class and attribute predictors.

SPEC.md §4. Pooling is per image (each image keeps its own unpadded res4 map); res5 and the predictors then run on
the crops of all images at once, which is where nearly all the compute goes and needs no padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import RoIPool

from .backbone import make_stage


@dataclass
class RoIOutputs:
    """Per-RoI results of the head for a set of RoIs.

    `pooled` (R, D): spatial mean of res5, the TSV feature; `cls_logits` (R, num_classes + 1) and
    `attr_logits` (R, num_attrs + 1) in the checkpoint's column layout (port: background / no-attribute LAST).
    """

    pooled: torch.Tensor
    cls_logits: torch.Tensor
    attr_logits: torch.Tensor


class AttributePredictor(nn.Module):
    """Class scores and the attribute branch of bottom-up attention.

    Attributes are predicted from [pooled feature, embedding of the argmax class (background included)]:
    Linear(D + E -> H) -> ReLU -> Linear(H -> num_attrs + 1). The port sets E = D // 8, H = D // 4.
    """

    def __init__(self, in_dim: int, num_classes: int, num_attrs: int) -> None:
        super().__init__()
        embed_dim, hidden_dim = in_dim // 8, in_dim // 4
        self.cls_score = nn.Linear(in_dim, num_classes + 1)
        self.cls_embedding = nn.Embedding(num_classes + 1, embed_dim)
        self.fc_attr = nn.Linear(in_dim + embed_dim, hidden_dim)
        self.attr_score = nn.Linear(hidden_dim, num_attrs + 1)

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cls_logits = self.cls_score(pooled)
        embedding = self.cls_embedding(cls_logits.argmax(dim=-1))
        hidden = F.relu(self.fc_attr(torch.cat([pooled, embedding], dim=-1)))
        return cls_logits, self.attr_score(hidden)


class Res5RoIHead(nn.Module):
    """RoIPool + res5 + predictor.

    Args:
        pooler: a torchvision `RoIPool` (14x14, spatial scale 1/16 for the published model).
        res5: the res5 stage (stride 1, dilation 2 for the VG model).
        predictor: `AttributePredictor`.
        roi_chunk_size: res5 runs on at most this many RoIs at once (bounds memory: 300 RoIs of the full model need
            ~0.5 GB per activation tensor); chunking does not change any RoI's result beyond float rounding.
    """

    def __init__(
        self, pooler: RoIPool, res5: nn.Sequential, predictor: AttributePredictor, roi_chunk_size: int = 512
    ) -> None:
        super().__init__()
        if roi_chunk_size < 1:
            raise ValueError(f"roi_chunk_size must be >= 1, got {roi_chunk_size}")
        self.pooler = pooler
        self.res5 = res5
        self.predictor = predictor
        self.roi_chunk_size = roi_chunk_size

    def pool(self, features: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Crops (R, C, 14, 14) of one image's res4 map (1, C, h, w) at boxes (R, 4) in network pixels."""
        rois = torch.cat([boxes.new_zeros(boxes.shape[0], 1), boxes], dim=1)
        return self.pooler(features, rois)

    def forward(self, crops: torch.Tensor) -> RoIOutputs:
        """res5, mean and predictors on pooled crops (R, C, 14, 14) from any number of images."""
        pooled = torch.cat([self.res5(chunk).mean(dim=[2, 3]) for chunk in crops.split(self.roi_chunk_size)])
        cls_logits, attr_logits = self.predictor(pooled)
        return RoIOutputs(pooled=pooled, cls_logits=cls_logits, attr_logits=attr_logits)


def build_res5(
    in_channels: int, bottleneck_channels: int, out_channels: int, halve: bool, stride_in_1x1: bool, groups: int
) -> nn.Sequential:
    """res5 for the RoI head: 3 blocks; the VG model (`halve=False`) keeps 14x14 (stride 1) with dilation 2 / pad 2.

    With `halve=True` (detectron2's default) block 0 strides by 2 and the 3x3 convs are plain.
    """
    return make_stage(
        3,
        in_channels,
        bottleneck_channels,
        out_channels,
        first_stride=2 if halve else 1,
        dilation=1 if halve else 2,
        groups=groups,
        stride_in_1x1=stride_in_1x1,
    )
