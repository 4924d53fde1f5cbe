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


class ChannelsLastTrainingError(RuntimeError):
    """A backward pass was about to run through NHWC convolutions on the CPU
    (see `refuse_cpu_channels_last_training`)."""


def refuse_cpu_channels_last_training(module: nn.Module, x: torch.Tensor) -> None:
    """Raise `ChannelsLastTrainingError` when `module`'s NHWC convs on the CPU would be differentiated.

    PyTorch 2.14's oneDNN backward of a channels-last 1x1 stride-2 convolution with few channels (4->8, 8->16)
    writes outside its buffers for some input sizes (64x86, for one): glibc then aborts with "corrupted
    double-linked list" or the process segfaults, later and elsewhere. Inference never takes that path (it has no
    backward), so the detector stays NHWC by default and refuses to be trained that way; to train it, load it with
    `channels_last=False` (NCHW convs: no such fault seen). Checked only while autograd records on the CPU.
    """
    if x.device.type != "cpu" or not torch.is_grad_enabled():
        return
    if x.requires_grad or any(p.requires_grad for p in module.parameters()):
        raise ChannelsLastTrainingError(
            f"{type(module).__name__} runs channels-last (NHWC) convolutions, whose CPU backward corrupts memory in "
            "this PyTorch (oneDNN); to train or differentiate the detector on the CPU, load it with "
            "channels_last=False, or run it under torch.inference_mode() / with frozen parameters"
        )


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics: `weight * (x - running_mean) / sqrt(running_var + eps) + bias`.

    Computed with `F.batch_norm(training=False)`, i.e. the very kernel of an `nn.BatchNorm2d` in eval mode (what the
    golden data were made with) and never updates its buffers. `load_detector` folds it into the preceding conv
    by default (`fuse_conv_bn`: one conv less per block); folding moves proposals by ~2e-3 px (SPEC.md §11), inside
    the golden tolerances. Unfolded, the network matches the golden data more tightly.
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


def fuse_conv_bn(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """`conv` followed by the frozen BatchNorm `bn` as one conv with a bias (test time only).

    weight' = weight * s, bias' = (bias - running_mean) * s + bn.bias with s = bn.weight / sqrt(running_var + eps),
    computed in float64 and rounded once to the conv's dtype. Not bit-identical to conv + BN (the rounding moves),
    but well inside the golden tolerances (README of ../shared/golden/frcnn: a BN-folded network differs by
    proposals 2e-3 px, pooled features 2e-5, with every selection identical); the golden parity tests run on the
    folded network. Returns a new conv in the memory format, on the device and with the `requires_grad` of `conv`;
    `bn` is not changed.
    `bn` may already be an `nn.Identity` (folded before): then `conv` is returned as is.
    """
    if isinstance(bn, nn.Identity):
        return conv
    if not isinstance(bn, FrozenBatchNorm2d):
        raise TypeError(f"can only fold a FrozenBatchNorm2d into a conv, got {type(bn).__name__}")
    scale = bn.weight.double() * torch.rsqrt(bn.running_var.double() + bn.eps)
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
    )
    with torch.no_grad():
        weight = (conv.weight.double() * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype)
        fused.weight.copy_(weight)  # the conv's dtype, contiguous; memory format below
        fused.bias.copy_(((bias - bn.running_mean.double()) * scale + bn.bias.double()).to(conv.weight.dtype))
    channels_last = conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    fused = fused.to(device=conv.weight.device, dtype=conv.weight.dtype).requires_grad_(conv.weight.requires_grad)
    return fused.to(memory_format=torch.channels_last) if channels_last else fused


def fuse_batchnorms(module: nn.Module) -> int:
    """Fold the frozen BatchNorms of every `Bottleneck` and `CaffeStem` inside `module` into their convs (in place);
    returns the number of blocks folded. The state dict changes (no `bn*` keys, convs gain a bias): load checkpoints
    before folding."""
    blocks = [m for m in module.modules() if isinstance(m, (Bottleneck, CaffeStem))]
    for block in blocks:
        block.fuse_batchnorm()
    return len(blocks)


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
        # ReLU and the residual sum in place: each acts on a tensor this block just made (never on `x`), with the
        # same arithmetic as the out-of-place ops; on the RoI head's 300 x C x 14 x 14 maps every out-of-place op
        # allocated and filled ~0.5 GB more.
        out = self.bn1(self.conv1(x)).relu_()
        out = self.bn2(self.conv2(out)).relu_()
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out.add_(shortcut).relu_()

    def fuse_batchnorm(self) -> None:
        """Fold every frozen BatchNorm of the block into the conv before it (see `fuse_conv_bn`)."""
        self.conv1, self.bn1 = fuse_conv_bn(self.conv1, self.bn1), nn.Identity()
        self.conv2, self.bn2 = fuse_conv_bn(self.conv2, self.bn2), nn.Identity()
        self.conv3, self.bn3 = fuse_conv_bn(self.conv3, self.bn3), nn.Identity()
        if self.downsample is not None:
            self.downsample = nn.Sequential(fuse_conv_bn(self.downsample[0], self.downsample[1]), nn.Identity())


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
        x = self.bn1(self.conv1(x)).relu_()
        if self.caffe_maxpool:
            return F.max_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)

    def fuse_batchnorm(self) -> None:
        """Fold the stem's frozen BatchNorm into its conv (see `fuse_conv_bn`)."""
        self.conv1, self.bn1 = fuse_conv_bn(self.conv1, self.bn1), nn.Identity()


class ResNetC4(nn.Module):
    """Stem + res2, res3, res4; returns res4 (stride 16), which feeds both the RPN and the RoI pooling.

    Args:
        channels_last: run the convs on NHWC tensors (weights and input converted; ~1.15x faster on CPU with
            oneDNN, and the layout tensor cores want); the returned res4 map is always a contiguous NCHW tensor.
    """

    def __init__(
        self,
        stem: CaffeStem,
        res2: nn.Sequential,
        res3: nn.Sequential,
        res4: nn.Sequential,
        out_channels: int,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        self.stem = stem
        self.res2 = res2
        self.res3 = res3
        self.res4 = res4
        self.out_channels = out_channels
        self.channels_last = channels_last
        self.apply_memory_format()

    def apply_memory_format(self) -> None:
        """Put the conv weights in the layout `channels_last` asks for (again after convs were replaced)."""
        self.to(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def fuse_batchnorm(self) -> None:
        """Fold the frozen BatchNorms of res3 and res4 into their convs (`fuse_conv_bn`); the stem and res2 keep them.

        Measured on the golden images: folding the stem (7x7 conv on pixel values of +-128) moves proposal logits by
        1.3e-4 and swaps two near-tied proposals; with res2 folded proposals move 3.4e-3 px (tolerance 5e-3), with
        res3 and res4 1.5e-3 px. The stem and res2 hold ~15% of the backbone's and ~1% of the model's FLOPs.
        """
        fuse_batchnorms(self.res3)
        fuse_batchnorms(self.res4)
        self.apply_memory_format()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            refuse_cpu_channels_last_training(self, x)
            x = x.contiguous(memory_format=torch.channels_last)
        return self.res4(self.res3(self.res2(self.stem(x)))).contiguous()


def build_backbone(cfg: FrcnnConfig, channels_last: bool = True) -> ResNetC4:
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
    return ResNetC4(stem, *stages, out_channels=cfg.res4_channels, channels_last=channels_last)
