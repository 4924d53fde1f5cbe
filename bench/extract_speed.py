"""Extraction speed of the full-size detector (ResNet-101 C4, 1601 classes, 401 attributes, random weights).

    python bench/extract_speed.py [--device cpu|cuda] [--images 4] [--batch-sizes 1 4] [--height 600 --width 800]

Reports images/s of `BottomUpFasterRCNN.detect` + obj36 selection per batch size, and where the time of one image
goes (backbone + RPN vs. RoI pooling + res5 + predictors). Random weights give the same amount of work as the real
ones (300 proposals per image after RPN NMS; the count is printed).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lxmert_pl.detector import OBJ36, FrcnnConfig, build_detector  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--images", type=int, default=4, help="images timed per batch size")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--height", type=int, default=600)
    parser.add_argument("--width", type=int, default=800)
    parser.add_argument("--roi-chunk-size", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    cfg = FrcnnConfig()
    model = build_detector(cfg, roi_chunk_size=args.roi_chunk_size).to(device)
    rng = np.random.default_rng(args.seed)
    images = [rng.integers(0, 256, size=(args.height, args.width, 3), dtype=np.uint8) for _ in range(args.images)]
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(
        f"device {device} ({hardware}), "
        f"torch {torch.__version__}; {cfg.summary()}; image {args.height}x{args.width} -> network "
        f"{tuple(model.transform(images[0]).tensor.shape[1:])}"
    )

    with torch.inference_mode():
        model.detect(images[:1])  # warm-up (allocator, kernels)
        blob = model.transform(images[0]).tensor.to(device)
        _sync(device)
        start = time.perf_counter()
        features = model.backbone(blob.unsqueeze(0))
        boxes, _ = model.rpn(features, tuple(blob.shape[-2:]))
        _sync(device)
        middle = time.perf_counter()
        model.roi_head(model.roi_head.pool(features, boxes))
        _sync(device)
        end = time.perf_counter()
    print(f"one image: backbone + RPN {middle - start:.2f} s, RoI head on {boxes.shape[0]} RoIs {end - middle:.2f} s")

    for batch_size in args.batch_sizes:
        _sync(device)
        start = time.perf_counter()
        for first in range(0, len(images), batch_size):
            for region in model.detect(images[first : first + batch_size]):
                model.to_features("bench", region, OBJ36)
        _sync(device)
        elapsed = time.perf_counter() - start
        print(f"batch {batch_size}: {len(images) / elapsed:.3f} images/s ({elapsed / len(images):.2f} s/image)")


if __name__ == "__main__":
    main()
