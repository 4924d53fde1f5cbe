"""RoI head: RoI max pool 14x14 on res4 -> res5 (dilated, stride 1) -> spatial mean -> class and attribute predictors.

SPEC.md §4. Pooling is per image (each image keeps its own unpadded res4 map); res5 and the predictors then run on
the crops of all images at once, which is where nearly all the compute goes (92% of the full model's FLOPs at
600x800) and needs no padding.

Speed without changing results:
- pooling is `RoIMaxPool` (bit-identical to torchvision's single-threaded RoIPool, in parallel tensor ops), straight
  to the dtype res5 computes in and in the channels-last layout res5 reads;
- RoIs that round to the same feature cells pool the same crop (6-8 of 300 on the golden images): such crops are
  pooled and run through res5 once;
- res5 runs on channels-last tensors, on CPU in chunks of RoIs whose activations stay within 16 MiB: glibc hands
  larger blocks back to the OS when they are freed, and faulting in fresh pages for each ~0.5 GB activation of 300
  RoIs cost about a fifth of res5's time (a chunk size changes results by float rounding at most: the convolution
  library may pick another algorithm for another batch size; at full size they were bit-identical);
- optionally (`set_dtype(torch.bfloat16)`, the detector's `precision="bf16"`) res5 in bfloat16, while the spatial
  mean and the predictors stay in float32, so `RoIOutputs` are always float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from .backbone import make_stage, refuse_cpu_channels_last_training
from .roi_pool import RoIMaxPool

# On CPU, res5 runs on as many RoIs at once as keep its widest activation within this many bytes (module doc).
CPU_ACTIVATION_BYTES = 16 * 2**20
# Elsewhere (CUDA's caching allocator reuses memory), on at most this many RoIs at once.
DEVICE_ROI_CHUNK = 512


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
    """RoI max pooling + res5 + predictor.

    Args:
        pooler: `RoIMaxPool` (14x14, spatial scale 1/16 for the published model).
        res5: the res5 stage (stride 1, dilation 2 for the VG model).
        predictor: `AttributePredictor`.
        roi_chunk_size: res5 runs on at most this many RoIs at once; None: on CPU as many as keep each activation
            within `CPU_ACTIVATION_BYTES` (10 float32 / 20 bfloat16 RoIs of the full model), elsewhere 512. Chunking
            bounds memory (300 RoIs of the full model need ~0.5 GB per float32 activation); results change by float
            rounding at most.
        channels_last: run res5 on NHWC tensors (1.26x faster on CPU with oneDNN; tensor cores want it too).
    """

    def __init__(
        self,
        pooler: RoIMaxPool,
        res5: nn.Sequential,
        predictor: AttributePredictor,
        roi_chunk_size: int | None = None,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        if roi_chunk_size is not None and roi_chunk_size < 1:
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

    def pool(self, features: torch.Tensor, boxes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Crops (R, C, 14, 14) in `dtype`, channels-last, of one image's res4 map (1, C, h, w) at boxes (R, 4) in
        network pixels.

        Pools the map's float32 values whatever its dtype (under autocast it may be bfloat16) and never rounds the
        boxes to a lower precision (bfloat16 has 4 px steps at 800 px); RoIPool is a max, so pooling to bfloat16
        equals pooling in float32 then casting.
        """
        return self.pooler(features, boxes.float(), dtype=dtype)

    def pool_unique(self, features: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`pool` in the head's dtype with equal crops pooled once: (crops (U, C, k, k), index (R,)) with
        `pool(features, boxes, head.dtype) == crops[index]`.

        A crop is a function of the feature cells its box rounds to (`RoIMaxPool.cells`), so RoIs with the same
        cells share one crop, exactly. Kept crops are in the order of their first RoI.
        """
        count = boxes.shape[0]
        order = torch.arange(count, device=boxes.device)
        if count < 2:
            return self.pool(features, boxes, self.dtype), order
        _, group = torch.unique(self.pooler.cells(boxes), dim=0, return_inverse=True)
        first = torch.full((int(group.max()) + 1,), count, device=boxes.device, dtype=torch.long)
        first = first.scatter_reduce(0, group, order, reduce="amin")
        kept, index = torch.unique(first[group], return_inverse=True)
        return self.pool(features, boxes[kept], self.dtype), index

    def forward(self, crops: torch.Tensor, index: torch.Tensor | None = None) -> RoIOutputs:
        """res5, mean and predictors on pooled crops (U, C, 14, 14) from any number of images.

        Args:
            crops: crops in any float dtype (`pool` / `pool_unique`); res5 casts them to its dtype.
            index: (R,) row of `crops` for each RoI (from `pool_unique`); None: one RoI per crop.
        res5 runs in `self.dtype` (and under an outer autocast as that autocast says); the spatial mean and the
        predictors always run in float32 with autocast off.
        """
        pooled = torch.cat([self._res5_mean(chunk) for chunk in crops.split(self.chunk_size(crops.device))])
        if index is not None:
            pooled = pooled[index]
        with torch.autocast(device_type=pooled.device.type, enabled=False):
            cls_logits, attr_logits = self.predictor(pooled)
        return RoIOutputs(pooled=pooled, cls_logits=cls_logits, attr_logits=attr_logits)

    def chunk_size(self, device: torch.device) -> int:
        """RoIs per res5 call on `device`: `roi_chunk_size`, or the automatic size when that is None."""
        if self.roi_chunk_size is not None:
            return self.roi_chunk_size
        if device.type != "cpu":
            return DEVICE_ROI_CHUNK
        widest = max(module.out_channels for module in self.res5.modules() if isinstance(module, nn.Conv2d))
        side = self.pooler.output_size  # res5 keeps the crop's side (the VG model) or halves it
        bytes_per_roi = widest * side * side * torch.empty((), dtype=self.dtype).element_size()
        return max(1, CPU_ACTIVATION_BYTES // bytes_per_roi)

    def _res5_mean(self, crops: torch.Tensor) -> torch.Tensor:
        """res5 of (N, C, 14, 14) crops, averaged over space in float32: (N, D)."""
        if self.channels_last:
            refuse_cpu_channels_last_training(self.res5, crops)
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
