"""The composed bottom-up-attention detector and the extraction entry point.

`BottomUpFasterRCNN` is built from swappable parts, torchvision-style: a preprocessing transform, a backbone, a region
proposal network and an RoI head. Several images go through one call; the result equals one image at a time:

* backbone and RPN run per image on its unpadded blob (the original's proposal layer is per image; zero-padding a
  batch changes border activations and with them the proposals, which is the HF port's batching bug);
* RoI pooling runs per image on its own res4 map;
* res5 and the predictors - nearly all of the compute - run on the crops of all images together (bit-identical crops
  once, see `Res5RoIHead.pool_unique`).

Precision (`precision="fp32" | "bf16"`): the backbone and the RPN always compute in float32 (a bf16 RPN reorders
the proposals), also under an autocast the caller opened; "bf16" runs only res5 in bfloat16. Every output is
float32.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..features.record import ImageFeatures
from .backbone import ResNetC4, build_backbone, fuse_batchnorms
from .caffe_proposals import CAFFE_RPN_MIN_SIZE, CaffeAnchorGenerator, CaffeProposalLayer, caffe_fg_probability
from .config import FrcnnConfig
from .geometry import CAFFE, DEFAULT_GEOMETRY, check_geometry
from .preprocess import CaffePreprocess, read_image
from .roi_heads import AttributePredictor, Res5RoIHead, build_res5
from .roi_pool import RoIMaxPool
from .rpn import AnchorGenerator, BoxDecoder, RegionProposalNetwork, RPNHead
from .selection import OBJ36, BoxSelection, object_columns, select_boxes

ImageInput = str | Path | np.ndarray
# Precision names -> dtype of the RoI head's res5 (backbone, RPN and predictors are float32 in both).
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class NetworkOutputs:
    """Network outputs for one image, before box selection.

    `boxes` (N, 4): RoIs in network (resized) pixels - the RPN's proposals, or the given boxes scaled;
    `proposal_logits` (N,): the RPN head's objectness logit of each proposal, in the proposal layer's rank order
    (None for given boxes): descending under the `port` geometry; under `caffe`, ranked by the float32 foreground
    probability (`proposal_prob`), whose exact ties keep caffe's memory order; `pooled` (N, D): the features;
    `cls_logits` (N, num_classes + 1), `attr_logits` (N, num_attrs + 1): in the checkpoint's column layout.
    """

    boxes: torch.Tensor
    proposal_logits: torch.Tensor | None
    pooled: torch.Tensor
    cls_logits: torch.Tensor
    attr_logits: torch.Tensor

    @property
    def proposal_prob(self) -> torch.Tensor | None:
        """Caffe's foreground probability of each proposal (the softmax of (0, logit), float32); None for given
        boxes. The `caffe` geometry ranks by it."""
        return None if self.proposal_logits is None else caffe_fg_probability(self.proposal_logits)


@dataclass
class ImageRegions(NetworkOutputs):
    """`NetworkOutputs` plus the image geometry: `rois` (N, 4) float32 in original pixels (proposals / scale, or the
    given boxes), `scale` (network = original * scale) and the original size."""

    rois: torch.Tensor
    scale: float
    orig_h: int
    orig_w: int

    @property
    def cls_prob(self) -> torch.Tensor:
        """Softmax over all class columns (background included)."""
        return torch.softmax(self.cls_logits, dim=-1)

    @property
    def attr_prob(self) -> torch.Tensor:
        """Softmax over all attribute columns ("no attribute" included)."""
        return torch.softmax(self.attr_logits, dim=-1)


class BottomUpFasterRCNN(nn.Module):
    """ResNet C4 Faster R-CNN with the Visual Genome attribute head, test time only.

    Args:
        transform: image -> network blob (caffe mean subtraction + OpenCV resize).
        backbone: blob (1, 3, H, W) -> res4 map (1, C, H/16, W/16).
        rpn: res4 map -> proposals (network pixels) for one image: the port's `RegionProposalNetwork` or caffe's
            `CaffeProposalLayer`; its `geometry` ("port" / "caffe") is the detector's.
        roi_head: RoI pooling + res5 + class/attribute predictors.
        background_first: column layout of the classifier: False for the HF port's weights (background and
            "no attribute" are the LAST columns), True for caffe-layout weights.
    """

    def __init__(
        self,
        transform: CaffePreprocess,
        backbone: ResNetC4,
        rpn: RegionProposalNetwork | CaffeProposalLayer,
        roi_head: Res5RoIHead,
        background_first: bool = False,
    ) -> None:
        super().__init__()
        self.transform = transform
        self.backbone = backbone
        self.rpn = rpn
        self.roi_head = roi_head
        self.background_first = background_first

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def geometry(self) -> str:
        """The proposal geometry, "port" or "caffe" (see `geometry.py`): record it with what the detector makes."""
        return self.rpn.geometry

    @property
    def precision(self) -> str:
        """"fp32" or "bf16": the dtype of the RoI head's res5 (see the module docstring)."""
        return "bf16" if self.roi_head.dtype == torch.bfloat16 else "fp32"

    def set_precision(self, precision: str) -> BottomUpFasterRCNN:
        """Run res5 in float32 ("fp32") or bfloat16 ("bf16", ~2.5x faster on CPUs with AMX / AVX-512 bf16 and on
        tensor cores). Outputs stay float32 and the proposals are the float32 ones. Returns the model."""
        if precision not in PRECISIONS:
            raise ConfigError(f"unknown detector precision {precision!r}; valid: {', '.join(PRECISIONS)}")
        self.roi_head.set_dtype(PRECISIONS[precision])
        return self

    def fuse_batchnorm(self) -> BottomUpFasterRCNN:
        """Fold the frozen BatchNorms of res3, res4 (see `ResNetC4.fuse_batchnorm` for why not the stem and res2) and
        res5 into the convs before them: one memory pass less per conv, results within the golden tolerances (see
        `backbone.fuse_conv_bn`). Changes the state dict: call after loading weights. Returns the model."""
        self.backbone.fuse_batchnorm()
        fuse_batchnorms(self.roi_head.res5)
        self.roi_head.set_dtype(self.roi_head.dtype)
        return self

    def forward(
        self,
        blobs: Sequence[torch.Tensor],
        boxes: Sequence[torch.Tensor | None] | None = None,
        scales: Sequence[float] | None = None,
    ) -> list[NetworkOutputs]:
        """Network pass over preprocessed blobs (3, H_i, W_i) of any sizes.

        Args:
            blobs: network inputs, one per image.
            boxes: per image, RoIs (R, 4) in network pixels to pool instead of the RPN's proposals, or None.
            scales: per image, the resize factor network / original (the caffe geometry's minimum proposal size is
                16 original pixels); default 1 (the blob is the original image).
        """
        if not blobs:
            return []
        boxes = [None] * len(blobs) if boxes is None else boxes
        scales = [1.0] * len(blobs) if scales is None else scales
        if len(boxes) != len(blobs) or len(scales) != len(blobs):
            raise ValueError(f"got {len(boxes)} box sets and {len(scales)} scales for {len(blobs)} images")
        with ieee_fp32_convolutions(blobs[0].device):
            return self._forward(blobs, boxes, scales)

    def _forward(
        self, blobs: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor | None], scales: Sequence[float]
    ) -> list[NetworkOutputs]:
        crops, crop_index, image_boxes, image_logits = [], [], [], []
        num_crops = 0
        for blob, given, scale in zip(blobs, boxes, scales, strict=True):
            with torch.autocast(device_type=blob.device.type, enabled=False):  # proposals are always float32 ones
                features = self.backbone(blob.float().unsqueeze(0))
                if given is None:
                    rois, logits = self.rpn(features, (blob.shape[-2], blob.shape[-1]), scale)
                else:
                    rois, logits = given.to(features), None
            unique_crops, index = self.roi_head.pool_unique(features, rois)
            crops.append(unique_crops)
            crop_index.append(index + num_crops)
            num_crops += unique_crops.shape[0]
            image_boxes.append(rois)
            image_logits.append(logits)
        head = self.roi_head(torch.cat(crops), torch.cat(crop_index))
        counts = [rois.shape[0] for rois in image_boxes]
        return [
            NetworkOutputs(rois, logits, pooled, cls_logits, attr_logits)
            for rois, logits, pooled, cls_logits, attr_logits in zip(
                image_boxes,
                image_logits,
                head.pooled.split(counts),
                head.cls_logits.split(counts),
                head.attr_logits.split(counts),
                strict=True,
            )
        ]

    @torch.inference_mode()
    def detect(
        self, images: Sequence[np.ndarray], given_boxes: Sequence[np.ndarray | None] | None = None
    ) -> list[ImageRegions]:
        """Preprocess BGR uint8 images (h, w, 3) and run the network on all of them in one pass.

        Args:
            images: BGR images as `read_image` returns them.
            given_boxes: per image, None (use the RPN) or float (R, 4) boxes x1 y1 x2 y2 in ORIGINAL pixels.
        """
        given_boxes = [None] * len(images) if given_boxes is None else list(given_boxes)
        if len(given_boxes) != len(images):
            raise ValueError(f"got {len(given_boxes)} box sets for {len(images)} images")
        device = self.device
        inputs = [self.transform(image) for image in images]
        given = [None if boxes is None else validate_boxes(boxes).to(device) for boxes in given_boxes]
        scales = [torch.tensor(item.scale, dtype=torch.float32, device=device) for item in inputs]
        outputs = self(
            [item.tensor.to(device) for item in inputs],
            [None if boxes is None else boxes * scale for boxes, scale in zip(given, scales, strict=True)],
            [item.scale for item in inputs],
        )
        return [
            ImageRegions(
                **{f.name: getattr(out, f.name) for f in fields(NetworkOutputs)},
                rois=boxes_in_original_pixels(out.boxes, scale, item.orig_h, item.orig_w) if boxes is None else boxes,
                scale=item.scale,
                orig_h=item.orig_h,
                orig_w=item.orig_w,
            )
            for out, boxes, scale, item in zip(outputs, given, scales, inputs, strict=True)
        ]

    def extract(
        self,
        images: Sequence[ImageInput],
        img_ids: Sequence[str] | None = None,
        selection: BoxSelection = OBJ36,
        given_boxes: Sequence[np.ndarray | None] | None = None,
    ) -> list[ImageFeatures]:
        """Features of several images in one forward pass, as obj36 TSV rows.

        Args:
            images: file paths (read with OpenCV, BGR) or BGR uint8 arrays (h, w, 3).
            img_ids: ids of the rows; default: the file name without its extension (required for arrays).
            selection: box counts and thresholds of the original selection (not used for images with given boxes).
            given_boxes: per image, None (detect and select) or (R, 4) boxes in original pixels: their features,
                classes and attributes are returned for all of them, in the given order.
        Raises `ImageReadError` naming a file OpenCV cannot read.
        """
        if img_ids is None:
            if any(isinstance(image, np.ndarray) for image in images):
                raise ValueError("img_ids are required when images are given as arrays")
            img_ids = [Path(image).stem for image in images]  # type: ignore[arg-type]
        if len(img_ids) != len(images):
            raise ValueError(f"got {len(img_ids)} img_ids for {len(images)} images")
        arrays = [image if isinstance(image, np.ndarray) else read_image(image) for image in images]
        regions = self.detect(arrays, given_boxes)
        return [self.to_features(img_id, region, selection) for img_id, region in zip(img_ids, regions, strict=True)]

    def to_features(self, img_id: str, region: ImageRegions, selection: BoxSelection = OBJ36) -> ImageFeatures:
        """One TSV row: the selected proposals (or all given boxes) with ids, confidences, boxes and features."""
        if region.proposal_logits is None:
            object_prob, attr_prob = object_columns(region.cls_prob, region.attr_prob, self.background_first)
            keep = torch.arange(region.rois.shape[0], device=region.rois.device)
            objects_conf, objects_id = object_prob.max(dim=1)
            attrs_conf, attrs_id = attr_prob.max(dim=1)
            boxes = region.rois
        else:
            chosen = select_boxes(region.rois, region.cls_prob, region.attr_prob, selection, self.background_first)
            keep, boxes = chosen.keep, chosen.boxes
            objects_id, objects_conf = chosen.objects_id, chosen.objects_conf
            attrs_id, attrs_conf = chosen.attrs_id, chosen.attrs_conf
        return ImageFeatures(
            img_id=img_id,
            img_h=region.orig_h,
            img_w=region.orig_w,
            objects_id=_np(objects_id, np.int64),
            objects_conf=_np(objects_conf, np.float32),
            attrs_id=_np(attrs_id, np.int64),
            attrs_conf=_np(attrs_conf, np.float32),
            boxes=_np(boxes, np.float32).reshape(-1, 4),
            features=_np(region.pooled[keep], np.float32),
        )


def build_detector(
    cfg: FrcnnConfig, roi_chunk_size: int | None = None, geometry: str = DEFAULT_GEOMETRY, channels_last: bool = True
) -> BottomUpFasterRCNN:
    """The detector with the config's sizes and test-time settings, in eval mode, float32, BatchNorms not folded
    (random weights: see `loading.load_detector` for the checkpoint, which also folds them), parameters frozen
    (`requires_grad=False`: built for inference; a training script unfreezes what it trains).

    `geometry`: "port" (the HF port's proposal layer and float32 means) or "caffe" (the original proposal layer on
    the same RPN head, and caffe's float64 means); see `geometry.py`. Raises `UnknownGeometryError` otherwise.
    `channels_last`: the backbone and res5 compute on NHWC tensors (faster; same results within float rounding).
    On the CPU such a detector refuses to be trained (`backbone.refuse_cpu_channels_last_training`).
    """
    caffe = check_geometry(geometry) == CAFFE
    transform = CaffePreprocess(
        cfg.pixel_mean, cfg.pixel_std, cfg.min_size_test, cfg.max_size_test, cfg.input_format, float64_means=caffe
    )
    head = RPNHead(cfg.res4_channels, cfg.rpn_hidden_channels, cfg.num_anchors)
    rpn: RegionProposalNetwork | CaffeProposalLayer
    if caffe:
        rpn = CaffeProposalLayer(
            CaffeAnchorGenerator(cfg.anchor_sizes, cfg.anchor_aspect_ratios, cfg.feature_stride),
            head,
            pre_nms_topk=cfg.rpn_pre_nms_topk,
            post_nms_topk=cfg.rpn_post_nms_topk,
            nms_thresh=cfg.rpn_nms_thresh,
            min_size=CAFFE_RPN_MIN_SIZE,
        )
    else:
        rpn = RegionProposalNetwork(
            AnchorGenerator(cfg.anchor_sizes, cfg.anchor_aspect_ratios, cfg.feature_stride, cfg.anchor_offset),
            head,
            BoxDecoder(cfg.rpn_bbox_reg_weights),
            pre_nms_topk=cfg.rpn_pre_nms_topk,
            post_nms_topk=cfg.rpn_post_nms_topk,
            nms_thresh=cfg.rpn_nms_thresh,
            min_size=cfg.rpn_min_size,
        )
    res5 = build_res5(
        cfg.res4_channels,
        cfg.bottleneck_channels * 8,
        cfg.pooled_dim,
        halve=cfg.res5_halve,
        stride_in_1x1=cfg.stride_in_1x1,
        groups=cfg.num_groups,
    )
    roi_head = Res5RoIHead(
        RoIMaxPool(cfg.pooler_resolution, spatial_scale=1.0 / cfg.feature_stride),
        res5,
        AttributePredictor(cfg.pooled_dim, cfg.num_classes, cfg.num_attrs),
        roi_chunk_size=roi_chunk_size,
        channels_last=channels_last,
    )
    backbone = build_backbone(cfg, channels_last=channels_last)
    model = BottomUpFasterRCNN(transform, backbone, rpn, roi_head, background_first=False).eval()
    return model.requires_grad_(False)


@contextmanager
def ieee_fp32_convolutions(device: torch.device) -> Iterator[None]:
    """On CUDA, float32 convolutions in full IEEE precision inside the block (cuDNN's default rounds their inputs
    to TF32, a 10-bit mantissa: far outside the golden tolerances); the previous setting is restored after.
    bfloat16 convolutions (the bf16 head) are not affected. Nothing to do on other devices."""
    if device.type != "cuda":
        yield
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    # torch >= 2.9: per-backend `fp32_precision`; older: the legacy `allow_tf32` flag (never mix the two APIs).
    owner, name, exact = (conv, "fp32_precision", "ieee") if hasattr(conv, "fp32_precision") else (
        torch.backends.cudnn, "allow_tf32", False
    )
    previous = getattr(owner, name)
    setattr(owner, name, exact)
    try:
        yield
    finally:
        setattr(owner, name, previous)


def boxes_in_original_pixels(boxes: torch.Tensor, scale: torch.Tensor, orig_h: int, orig_w: int) -> torch.Tensor:
    """Network-pixel proposals mapped back to the original image, clipped to [0, orig_w] x [0, orig_h].

    Proposals are clipped to the *resized* image, whose size is the original times `scale` ROUNDED: dividing by the
    scale can then overshoot the original border by up to 0.5 / scale pixels (e.g. x2 = 166.2 on a 166-pixel-wide
    image), which the original feature reader rejects (it asserts normalised boxes < 1 + 1e-5). The clip only moves
    such overshoots back onto the border; every other coordinate is unchanged.
    """
    original = boxes / scale
    limits = torch.tensor([orig_w, orig_h, orig_w, orig_h], dtype=original.dtype, device=original.device)
    return torch.minimum(original.clamp(min=0), limits)


def validate_boxes(boxes: np.ndarray) -> torch.Tensor:
    """Given boxes as a float32 (R, 4) tensor; ValueError unless finite x1 y1 x2 y2 with x2 >= x1, y2 >= y1."""
    array = np.asarray(boxes, dtype=np.float32)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"given boxes must have shape (R, 4), got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("given boxes contain NaN or infinite values")
    if np.any(array[:, 2] < array[:, 0]) or np.any(array[:, 3] < array[:, 1]):
        raise ValueError("given boxes must be x1 y1 x2 y2 with x2 >= x1 and y2 >= y1")
    return torch.from_numpy(array)


def _np(tensor: torch.Tensor, dtype: type) -> np.ndarray:
    """A tensor of any dtype (bfloat16 included, which numpy lacks) as a numpy array of `dtype`."""
    if tensor.is_floating_point():
        tensor = tensor.float()
    return tensor.detach().cpu().numpy().astype(dtype, copy=False)
