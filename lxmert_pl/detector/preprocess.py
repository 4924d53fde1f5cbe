"""Image reading and the caffe test-time preprocessing of bottom-up-attention (SPEC.md §1).

The network input is the mean-subtracted float image resized by one scale `s` with OpenCV
(`cv2.resize(img, None, fx=s, fy=s, INTER_LINEAR)`): no std division (std 1), no padding, no size divisibility.
OpenCV's fx/fy form samples at (x + 0.5) / s - 0.5; `F.interpolate` / PIL / an explicit output size sample with the
size ratio instead and give different pixels (and different proposals), so the resize stays in OpenCV.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from ..errors import LxmertPlError


class ImageReadError(LxmertPlError, OSError):
    """An image file that OpenCV cannot decode (missing, empty, corrupt or not an image)."""


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as OpenCV does for the original extraction: BGR uint8, shape (h, w, 3).

    Grey-scale files are expanded to three channels and an alpha channel is dropped (`cv2.IMREAD_COLOR`).
    Raises `ImageReadError` naming the file when it cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"image file not found: {path}")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None or image.ndim != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ImageReadError(f"cannot decode image {path} (corrupt, empty or not an image format OpenCV reads)")
    return image


@dataclass
class PreprocessedImage:
    """One image ready for the backbone.

    `tensor` is float32 (3, H', W') in the network's channel order; `scale` maps original pixels to network pixels
    (network = original * scale); `orig_h`, `orig_w` are the original size.
    """

    tensor: torch.Tensor
    scale: float
    orig_h: int
    orig_w: int


class CaffePreprocess:
    """Mean subtraction and single-scale resize exactly as the caffe `_get_image_blob` does it.

    Args:
        pixel_mean: per-channel means in the network's channel order (BGR for the published model).
        pixel_std: per-channel divisors (1, 1, 1 for the published model; then no division happens).
        min_size: target length of the shorter side (600).
        max_size: cap on the longer side (1000): if round(s * long side) exceeds it, s = max_size / long side.
        input_format: "BGR" (OpenCV order, the published model) or "RGB" (channels reversed before the means).
        float64_means: subtract the means as caffe's `im -= PIXEL_MEANS` does (float64 arithmetic, stored as
            float32; the `caffe` geometry) instead of in float32 (the port golden data). The inputs differ by one
            float32 ulp at most before the resize.
    """

    def __init__(
        self,
        pixel_mean: tuple[float, float, float],
        pixel_std: tuple[float, float, float] = (1.0, 1.0, 1.0),
        min_size: int = 600,
        max_size: int = 1000,
        input_format: str = "BGR",
        float64_means: bool = False,
    ) -> None:
        if input_format not in ("BGR", "RGB"):
            raise ValueError(f"input_format must be 'BGR' or 'RGB', got {input_format!r}")
        # float32 means: the port golden input is float32(pixel) - float32(mean), bit for bit; float64 means: the
        # caffe golden input is float32(float64(pixel) - float64(mean)), bit for bit.
        self.float64_means = float64_means
        mean_dtype = np.float64 if float64_means else np.float32
        self.pixel_mean = np.asarray(pixel_mean, dtype=mean_dtype).reshape(1, 1, 3)
        self.pixel_std = np.asarray(pixel_std, dtype=np.float32).reshape(1, 1, 3)
        self.min_size = min_size
        self.max_size = max_size
        self.input_format = input_format

    def scale_for(self, height: int, width: int) -> float:
        """The resize factor for an image of this size (caffe rule: shorter side to min_size, longer capped)."""
        scale = self.min_size / min(height, width)
        if np.round(scale * max(height, width)) > self.max_size:
            scale = self.max_size / max(height, width)
        return scale

    def __call__(self, image_bgr: np.ndarray) -> PreprocessedImage:
        """Preprocess one BGR uint8 (h, w, 3) image (as returned by `read_image`)."""
        if image_bgr.ndim != 3 or image_bgr.shape[2] != 3:
            raise ValueError(f"expected a (h, w, 3) BGR image, got shape {image_bgr.shape}")
        height, width = image_bgr.shape[:2]
        image = image_bgr[:, :, ::-1] if self.input_format == "RGB" else image_bgr
        image = (image.astype(np.float32) - self.pixel_mean).astype(np.float32, copy=False)
        if np.any(self.pixel_std != 1.0):
            image = image / self.pixel_std
        scale = self.scale_for(height, width)
        resized = cv2.resize(image, None, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
        tensor = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        return PreprocessedImage(tensor=tensor, scale=scale, orig_h=height, orig_w=width)
