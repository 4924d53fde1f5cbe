"""`RoIMaxPool` against torchvision's `roi_pool` (the reference kernel, caffe's ROIPooling arithmetic): bit for bit."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import roi_pool

from lxmert_pl.detector.roi_pool import RoIMaxPool


def reference(feature_map: torch.Tensor, boxes: torch.Tensor, size: int, scale: float) -> torch.Tensor:
    rois = torch.cat([boxes.new_zeros(boxes.shape[0], 1), boxes], dim=1)
    return roi_pool(feature_map, rois, (size, size), scale)


def awkward_boxes(generator: torch.Generator, count: int, height: int, width: int, stride: int) -> torch.Tensor:
    """Boxes a kernel port gets wrong first: corners on exact half cells (round half away from zero, also below 0),
    boxes past every edge, inverted and degenerate boxes, thin boxes, and plain random ones."""
    span = torch.tensor([width, height, width, height], dtype=torch.float32) * stride
    plain = torch.rand(count, 4, generator=generator) * span * 1.3 - 0.15 * span
    halves = (torch.randint(-4, max(height, width) + 4, (count, 4), generator=generator).float() + 0.5) * stride
    inverted = plain[:, [2, 3, 0, 1]]
    thin = plain.clone()
    thin[:, 2] = thin[:, 0] + torch.rand(count, generator=generator) * stride
    point = plain.clone()
    point[:, 2:] = point[:, :2]
    return torch.cat([plain, halves, inverted, thin, point])


@pytest.mark.parametrize("size", [14, 7, 1])
def test_equals_torchvision_roi_pool_bit_for_bit(size):
    generator = torch.Generator().manual_seed(size)
    pool = RoIMaxPool(size, spatial_scale=1.0 / 16)
    for height, width in [(1, 1), (3, 40), (38, 50), (25, 7), (63, 38)]:
        feature_map = torch.randn(1, 5, height, width, generator=generator)  # negative values too: no ReLU assumed
        boxes = awkward_boxes(generator, 40, height, width, 16)
        expected = reference(feature_map, boxes, size, 1.0 / 16)
        got = pool(feature_map, boxes)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        assert torch.equal(got, expected), (height, width, (got - expected).abs().max())


def test_other_spatial_scales_and_layouts():
    generator = torch.Generator().manual_seed(1)
    feature_map = torch.randn(1, 6, 30, 20, generator=generator)
    boxes = awkward_boxes(generator, 30, 30, 20, 8)
    for scale in (1.0 / 8, 0.3, 1.0):
        expected = reference(feature_map, boxes, 14, scale)
        pool = RoIMaxPool(14, spatial_scale=scale)
        assert torch.equal(pool(feature_map, boxes), expected)
        assert torch.equal(pool(feature_map.contiguous(memory_format=torch.channels_last), boxes), expected)


def test_pooling_to_bfloat16_equals_pooling_then_casting():
    generator = torch.Generator().manual_seed(2)
    feature_map = torch.randn(1, 8, 38, 50, generator=generator)
    boxes = awkward_boxes(generator, 30, 38, 50, 16)
    pool = RoIMaxPool(14, spatial_scale=1.0 / 16)
    crops = pool(feature_map, boxes, dtype=torch.bfloat16)
    assert crops.dtype == torch.bfloat16
    assert crops.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(crops, reference(feature_map, boxes, 14, 1.0 / 16).bfloat16())
    # a bfloat16 map (under autocast) is pooled as its float32 values
    rounded = feature_map.bfloat16()
    assert torch.equal(pool(rounded, boxes), reference(rounded.float(), boxes, 14, 1.0 / 16))


def test_cells_round_half_away_from_zero_like_the_kernel():
    pool = RoIMaxPool(14, spatial_scale=1.0 / 16)
    boxes = torch.tensor([[8.0, 24.0, -8.0, -24.0], [7.99, 8.01, -7.99, -8.01]])
    assert pool.cells(boxes).tolist() == [[1, 2, -1, -2], [0, 1, 0, -1]]


def test_no_boxes_and_bad_shapes():
    pool = RoIMaxPool(14, spatial_scale=1.0 / 16)
    feature_map = torch.randn(1, 3, 5, 5)
    assert pool(feature_map, torch.zeros(0, 4)).shape == (0, 3, 14, 14)
    with pytest.raises(ValueError, match="one feature map"):
        pool(feature_map[0], torch.zeros(1, 4))
    with pytest.raises(ValueError, match="boxes"):
        pool(feature_map, torch.zeros(1, 5))
    with pytest.raises(ValueError, match="output_size"):
        RoIMaxPool(0, spatial_scale=1.0)


def test_bench_script_runs_and_checks_bit_identity(monkeypatch, capsys):
    """bench/roi_pool_speed.py at a few RoIs (its `main` in this process, as tests/test_matcher.py runs
    bench/matcher_rank.py): it exits non-zero if the two poolings ever differ."""
    from pathlib import Path

    from conftest import load_script

    script = Path(__file__).resolve().parents[1] / "bench" / "roi_pool_speed.py"
    bench = load_script(script, "roi_pool_speed_bench")
    monkeypatch.setattr("sys.argv", [str(script), "--rounds", "1", "--rois", "20", "--threads", "1"])
    threads = torch.get_num_threads()
    try:
        bench.main()  # sys.exit("RoIMaxPool differs ...") would end the test with SystemExit
    finally:
        torch.set_num_threads(threads)  # --threads 1 set it for this process
    assert "bit-identical to torchvision: fp32 True, bf16 (= fp32 rounded) True" in capsys.readouterr().out
