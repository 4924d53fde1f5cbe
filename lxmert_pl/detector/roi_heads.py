"""RoI head: RoIPool 14x14 on res4 -> res5 (dilated, stride 1) -> spatial mean -> class and attribute predictors.

SPEC.md §4. Pooling is per image (each image keeps its own unpadded res4 map); res5 and the predictors then run on
the crops of all images at once, which is where nearly all the compute goes (92% of the full model's FLOPs at
600x800) and needs no padding.

Speed without changing results: RoIs whose crops are bit-identical (RoIPool rounds boxes to whole feature cells, so
distinct proposals can pool the same crop: 6-8 of 300 on the golden images) go through res5 once; res5 runs on
channels-last tensors; optionally (`set_dtype(torch.bfloat16)`, the detector's `precision="bf16"`) in bfloat16, while
pooling, the spatial mean and the predictors stay in float32, so `RoIOutputs` are always float32.
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
        channels_last: run res5 on NHWC tensors (1.26x faster on CPU with oneDNN; tensor cores want it too).
    """

    def __init__(
        self,
        pooler: RoIPool,
        res5: nn.Sequential,
        predictor: AttributePredictor,
        roi_chunk_size: int = 512,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        if roi_chunk_size < 1:
            raise ValueError(f"roi_chunk_size must be >= 1, got {roi_chunk_size}")
        self.pooler = pooler
        self.res5 = res5
        self.predictor = predictor
        self.roi_chunk_size = roi_chunk_size
        self.channels_last = channels_last
        self.set_dtype(torch.float32)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype res5 computes in (float32, or bfloat16 for the bf16 head)."""
        return next(self.res5.parameters()).dtype

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def set_dtype(self, dtype: torch.dtype) -> None:
        """Cast res5's weights to `dtype` once (float32 or bfloat16) in the head's memory format; the predictors
        stay float32. Call again after res5's convs were replaced (BatchNorm folding)."""
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"the RoI head computes in float32 or bfloat16, got {dtype}")
        self.res5.to(dtype=dtype, memory_format=self.memory_format)

    def pool(self, features: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Crops (R, C, 14, 14), float32, of one image's res4 map (1, C, h, w) at boxes (R, 4) in network pixels.

        Pools in float32 whatever the dtypes given (under autocast the map may be bfloat16): RoIPool is a max, so
        pooling then casting equals casting then pooling, and boxes must never be rounded to bfloat16 (4 px steps).
        """
        boxes = boxes.float()
        rois = torch.cat([boxes.new_zeros(boxes.shape[0], 1), boxes], dim=1)
        return self.pooler(features.float(), rois)

    def pool_unique(self, features: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`pool` with bit-identical crops kept once: (crops (U, C, k, k), index (R,)), `pool(...) == crops[index]`.

        Candidates are RoIs that RoIPool rounds to the same feature cells (the kernel's `round(coordinate * scale)`,
        half away from zero); a candidate is merged only if its crop is bit-identical to the first one's, so a
        rounding corner case can cost a merge but never change a result. Kept crops are in RoI order.
        """
        crops = self.pool(features, boxes)
        count = boxes.shape[0]
        order = torch.arange(count, device=crops.device)
        if count < 2:
            return crops, order
        scaled = (boxes.float() * self.pooler.spatial_scale).double()
        cells = torch.where(scaled >= 0, torch.floor(scaled + 0.5), torch.ceil(scaled - 0.5)).long()
        _, group = torch.unique(cells, dim=0, return_inverse=True)
        first = torch.full((int(group.max()) + 1,), count, device=crops.device, dtype=torch.long)
        first = first.scatter_reduce(0, group, order, reduce="amin")
        representative = first[group]
        candidates = (representative != order).nonzero().flatten()
        if candidates.numel():
            same = (crops[candidates] == crops[representative[candidates]]).flatten(1).all(dim=1)
            representative[candidates[~same]] = candidates[~same]
        kept, index = torch.unique(representative, return_inverse=True)
        return crops[kept], index

    def forward(self, crops: torch.Tensor, index: torch.Tensor | None = None) -> RoIOutputs:
        """res5, mean and predictors on pooled crops (U, C, 14, 14) from any number of images.

        Args:
            crops: float32 crops (`pool` / `pool_unique`).
            index: (R,) row of `crops` for each RoI (from `pool_unique`); None: one RoI per crop.
        res5 runs in `self.dtype` (and under an outer autocast as that autocast says); the spatial mean and the
        predictors always run in float32 with autocast off.
        """
        pooled = torch.cat([self._res5_mean(chunk) for chunk in crops.split(self.roi_chunk_size)])
        if index is not None:
            pooled = pooled[index]
        with torch.autocast(device_type=pooled.device.type, enabled=False):
            cls_logits, attr_logits = self.predictor(pooled)
        return RoIOutputs(pooled=pooled, cls_logits=cls_logits, attr_logits=attr_logits)

    def _res5_mean(self, crops: torch.Tensor) -> torch.Tensor:
        """res5 of (N, C, 14, 14) crops, averaged over space in float32: (N, D)."""
        x = crops.to(dtype=self.dtype, memory_format=self.memory_format)
        return self.res5(x).mean(dim=[2, 3], dtype=torch.float32)


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
