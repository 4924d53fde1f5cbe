"""A tiny random detector in the HF port's on-disk format, for tests and demos that cannot ship the 260 MB model.

`save_tiny_detector` writes `config.yaml` + weights exactly as a real detector directory looks, so everything
downstream (`load_detector`, `extract.py`, `ImageFolderFeatureSource`) runs unchanged on it. The weights are random
but well scaled (every frozen BatchNorm's statistics are measured on a synthetic image), so proposals, class
probabilities and the selection behave like a real detector's in kind: varied classes, a few boxes above 0.2.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from .backbone import FrozenBatchNorm2d
from .config import FrcnnConfig
from .loading import CONFIG_NAME, export_port_state_dict
from .model import BottomUpFasterRCNN, build_detector

# ResNet-50 C4 with narrow widths (pooled width 128) and a small input size; classes/attributes as the real model.
TINY_CONFIG = FrcnnConfig(
    depth=50,
    width_per_group=4,
    stem_out_channels=8,
    res2_out_channels=16,
    rpn_hidden_channels=32,
    min_size_test=240,
    max_size_test=400,
)


def synthetic_image(seed: int = 0, height: int = 300, width: int = 400) -> np.ndarray:
    """A smooth random BGR uint8 image with a few flat rectangles (objects for the RPN to find)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(height // 40 + 2, width // 40 + 2, 3)).astype(np.float32)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(6):
        x1, y1 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
        x2, y2 = x1 + int(rng.integers(20, width // 2)), y1 + int(rng.integers(20, height // 2))
        image[y1:y2, x1:x2] = rng.integers(0, 256, size=3)
    return np.clip(image, 0, 255).astype(np.uint8)


def random_detector(cfg: FrcnnConfig = TINY_CONFIG, seed: int = 0) -> BottomUpFasterRCNN:
    """A detector with seeded random weights and BatchNorm statistics calibrated on `synthetic_image(seed)`."""
    model = build_detector(cfg)
    generator = torch.Generator().manual_seed(seed)

    def normal(shape: torch.Size, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * std

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(normal(module.weight.shape, (2.0 / fan_in) ** 0.5))
                if module.bias is not None:
                    module.bias.copy_(normal(module.bias.shape, 0.05))
            elif isinstance(module, FrozenBatchNorm2d):
                module.weight.copy_(1.0 + normal(module.weight.shape, 0.1))
                module.bias.copy_(normal(module.bias.shape, 0.1))
            elif isinstance(module, nn.Linear):
                module.weight.copy_(normal(module.weight.shape, module.in_features**-0.5))
                module.bias.copy_(normal(module.bias.shape, 0.05))
            elif isinstance(module, nn.Embedding):
                module.weight.copy_(normal(module.weight.shape, 0.05))
        model.rpn.head.bbox_pred.weight.mul_(0.1)  # small anchor deltas keep proposals near their anchors
    image = synthetic_image(seed)
    _calibrate_batchnorms(model, image)
    # Centre the class logits on the calibration RoIs' mean feature and scale them to std 3, so that classes vary
    # between RoIs and probabilities are peaked but not saturated.
    pooled = model.detect([image])[0].pooled
    mean_feature = pooled.mean(dim=0)
    cls_score = model.roi_head.predictor.cls_score
    with torch.no_grad():
        cls_score.weight.mul_(3.0 / ((pooled - mean_feature) @ cls_score.weight.t()).std())
        cls_score.bias.sub_(cls_score.weight @ mean_feature)
    return model


def _calibrate_batchnorms(model: BottomUpFasterRCNN, image: np.ndarray) -> None:
    """Set every frozen BatchNorm's statistics to those of its input on `image`, in forward order, so each layer
    sees normalised inputs from already calibrated layers (one pass)."""

    def measure(module: FrozenBatchNorm2d, inputs: tuple[torch.Tensor]) -> None:
        x = inputs[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False).clamp(min=1e-2))

    handles = [m.register_forward_pre_hook(measure) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    try:
        model.detect([image])
    finally:
        for handle in handles:
            handle.remove()


def save_tiny_detector(out_dir: str | Path, seed: int = 0, weights_format: str = "safetensors", **overrides) -> Path:
    """Write a tiny random detector directory: `config.yaml` + `model.safetensors` (or `pytorch_model.bin`).

    Args:
        out_dir: the directory (created).
        seed: weights seed.
        weights_format: "safetensors" or "bin" (a torch state dict, as the HF hub's `pytorch_model.bin`).
        **overrides: `FrcnnConfig` fields replacing the tiny defaults, e.g. `num_classes=20`, `depth=101`.
    Returns the directory.
    """
    if weights_format not in ("safetensors", "bin"):
        raise ValueError(f"weights_format must be 'safetensors' or 'bin', got {weights_format!r}")
    cfg = dataclasses.replace(TINY_CONFIG, **overrides)
    state = export_port_state_dict(random_detector(cfg, seed), cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.save_yaml(out_dir / CONFIG_NAME)
    if weights_format == "safetensors":
        save_file(state, str(out_dir / "model.safetensors"))
    else:
        torch.save(state, out_dir / "pytorch_model.bin")
    return out_dir
