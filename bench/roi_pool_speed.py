"""RoI max pooling: lxmert_pl's `RoIMaxPool` against torchvision's `roi_pool` kernel on the full-size detector's shapes.

    python bench/roi_pool_speed.py [--threads N] [--rounds 5] [--rois 300] [--device cpu|cuda]

A 1024 x 38 x 50 res4 map (a 600x800 image at stride 16) and 300 proposal-like boxes (random corners inside the image),
14x14 bins. Alternating rounds in one process, the fastest of each reported, and a ratio against torchvision measured
in the same run. Also checks that both give the same crops bit for bit (float32, and bfloat16 = float32 rounded).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torchvision.ops import roi_pool

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bf16_speed import timed  # noqa: E402

from lxmert_pl.detector.roi_pool import RoIMaxPool  # noqa: E402


def proposal_like_boxes(count: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    corners = torch.rand(count, 2, 2, generator=generator) * torch.tensor([width, height], dtype=torch.float32)
    return torch.cat([corners.min(dim=1).values, corners.max(dim=1).values], dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rois", type=int, default=300)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    generator = torch.Generator().manual_seed(0)
    feature_map = torch.relu(torch.randn(1, 1024, 38, 50, generator=generator)).to(args.device)
    feature_map = feature_map.contiguous(memory_format=torch.channels_last)  # as the backbone hands it over
    boxes = proposal_like_boxes(args.rois, 600, 800, generator).to(args.device)
    rois = torch.cat([boxes.new_zeros(args.rois, 1), boxes], dim=1)
    pool = RoIMaxPool(14, spatial_scale=1.0 / 16)
    contenders = {
        "torchvision roi_pool fp32": lambda: roi_pool(feature_map, rois, (14, 14), 1.0 / 16),
        "RoIMaxPool fp32": lambda: pool(feature_map, boxes),
        "RoIMaxPool to bf16": lambda: pool(feature_map, boxes, dtype=torch.bfloat16),
    }
    reference = contenders["torchvision roi_pool fp32"]()
    same_fp32 = torch.equal(contenders["RoIMaxPool fp32"](), reference)
    same_bf16 = torch.equal(contenders["RoIMaxPool to bf16"](), reference.bfloat16())
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.rounds):
        for name, fn in contenders.items():
            times[name].append(timed(fn, sync))
    best = {name: min(t) for name, t in times.items()}
    print(f"device {args.device}, {torch.get_num_threads()} threads, {args.rois} RoIs on a 1024x38x50 map, 14x14 bins")
    for name, seconds in best.items():
        print(f"{name:28s} {1000 * seconds:8.1f} ms  {best['torchvision roi_pool fp32'] / seconds:5.2f}x torchvision")
    print(f"bit-identical to torchvision: fp32 {same_fp32}, bf16 (= fp32 rounded) {same_bf16}")
    if not (same_fp32 and same_bf16):
        sys.exit("RoIMaxPool differs from torchvision's roi_pool")


if __name__ == "__main__":
    main()
