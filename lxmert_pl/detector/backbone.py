"""ResNet "C4" backbone of the caffe MSRA variant (SPEC.md §2) and the bottleneck pieces the RoI head reuses.

Differences from torchvision's `ResNet` that keep its `Bottleneck` from being used as is: the stride of a
down-sampling block sits in the first 1x1 conv (`stride_in_1x1`, MSRA/caffe), the stem's max-pool is caffe's
(pad 0, ceil mode), every conv is bias-free and every norm is a frozen BatchNorm. The conv helpers are torchvision's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import conv1x1, conv3x3

from .config import FrcnnConfig


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics: `weight * (x - running_mean) / sqrt(running_var + eps) + bias`.

    Computed with `F.batch_norm(training=False)`, i.e. the very kernel of an `nn.BatchNorm2d` in eval mode (what the
    golden data were made with). torchvision's `FrozenBatchNorm2d` folds the statistics into one scale and shift,
    which moves proposals by ~2e-3 px (SPEC.md §11); this module avoids that drift and never updates its buffers.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 residual block with frozen BN (ReLU after the first two and after the sum).

    Args:
        in_channels, bottleneck_channels, out_channels: widths.
        stride: spatial stride of the block (in the 1x1 conv if `stride_in_1x1`, else in the 3x3).
        dilation: dilation (and padding) of the 3x3 conv.
        groups: groups of the 3x3 conv.
        stride_in_1x1: MSRA/caffe placement of the stride.
    A projection shortcut (1x1 conv with the block's stride + BN) is built when the widths or the stride change.
    """

    def __init__(
        self,
        in_channels: int,
        bottleneck_channels: int,
        out_channels: int,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        stride_in_1x1: bool = True,
    ) -> None:
        super().__init__()
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = conv1x1(in_channels, bottleneck_channels, stride_1x1)
        self.bn1 = FrozenBatchNorm2d(bottleneck_channels)
        self.conv2 = conv3x3(bottleneck_channels, bottleneck_channels, stride_3x3, groups=groups, dilation=dilation)
        self.bn2 = FrozenBatchNorm2d(bottleneck_channels)
        self.conv3 = conv1x1(bottleneck_channels, out_channels)
        self.bn3 = FrozenBatchNorm2d(out_channels)
        self.downsample: nn.Sequential | None = None
        if in_channels != out_channels or stride != 1:
            self.downsample = nn.Sequential(conv1x1(in_channels, out_channels, stride), FrozenBatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


def make_stage(
    num_blocks: int,
    in_channels: int,
    bottleneck_channels: int,
    out_channels: int,
    first_stride: int,
    dilation: int = 1,
    groups: int = 1,
    stride_in_1x1: bool = True,
) -> nn.Sequential:
    """A stage of `num_blocks` bottlenecks; only block 0 strides (and projects)."""
    blocks = [
        Bottleneck(
            in_channels if i == 0 else out_channels,
            bottleneck_channels,
            out_channels,
            stride=first_stride if i == 0 else 1,
            dilation=dilation,
            groups=groups,
            stride_in_1x1=stride_in_1x1,
        )
        for i in range(num_blocks)
    ]
    return nn.Sequential(*blocks)


class CaffeStem(nn.Module):
    """conv 7x7/2 (no bias) -> frozen BN -> ReLU -> max-pool 3x3/2.

    Args:
        out_channels: stem width (64).
        caffe_maxpool: caffe pooling (pad 0, ceil mode: output sizes rounded up) instead of pad 1, floor mode.
    """

    def __init__(self, out_channels: int, in_channels: int = 3, caffe_maxpool: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(out_channels)
        self.caffe_maxpool = caffe_maxpool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        if self.caffe_maxpool:
            return F.max_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class ResNetC4(nn.Module):
    """Stem + res2, res3, res4; returns res4 (stride 16), which feeds both the RPN and the RoI pooling."""

    def __init__(
        self, stem: CaffeStem, res2: nn.Sequential, res3: nn.Sequential, res4: nn.Sequential, out_channels: int
    ) -> None:
        super().__init__()
        self.stem = stem
        self.res2 = res2
        self.res3 = res3
        self.res4 = res4
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res4(self.res3(self.res2(self.stem(x))))


def build_backbone(cfg: FrcnnConfig) -> ResNetC4:
    """ResNet-{50,101,152} C4 with the config's widths (res2 block 0 has stride 1, res3/res4 block 0 stride 2)."""
    stages = []
    in_ch, out_ch, mid_ch = cfg.stem_out_channels, cfg.res2_out_channels, cfg.bottleneck_channels
    for index, num_blocks in enumerate(cfg.blocks_per_stage):
        stages.append(
            make_stage(
                num_blocks,
                in_ch,
                mid_ch,
                out_ch,
                first_stride=1 if index == 0 else 2,
                groups=cfg.num_groups,
                stride_in_1x1=cfg.stride_in_1x1,
            )
        )
        in_ch, out_ch, mid_ch = out_ch, out_ch * 2, mid_ch * 2
    stem = CaffeStem(cfg.stem_out_channels, caffe_maxpool=cfg.caffe_maxpool)
    return ResNetC4(stem, *stages, out_channels=cfg.res4_channels)
