"""Box selection of the original extraction: golden arrays (exact) and the rules on small synthetic cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import nms

from lxmert_pl.detector.selection import (
    ADAPTIVE_10_100,
    OBJ36,
    BoxSelection,
    caffe_iou,
    per_class_nms_max_conf,
    select_boxes,
)

TAGS = {"fixed36": OBJ36, "adaptive": ADAPTIVE_10_100}


def _select(data, prefix: str, tag: str, background_first: bool):
    return select_boxes(
        torch.from_numpy(data[f"{prefix}rois"]),
        torch.from_numpy(data[f"{prefix}cls_prob"]),
        torch.from_numpy(data[f"{prefix}attr_prob"]),
        TAGS[tag],
        background_first=background_first,
    )


def _assert_matches_golden(chosen, data, key: str) -> None:
    np.testing.assert_array_equal(chosen.keep.numpy(), data[f"{key}_keep"])  # order included
    np.testing.assert_array_equal(chosen.max_conf.numpy(), data[f"{key}_max_conf"])
    np.testing.assert_array_equal(chosen.objects_id.numpy(), data[f"{key}_objects_id"])
    np.testing.assert_array_equal(chosen.attrs_id.numpy(), data[f"{key}_attrs_id"])
    np.testing.assert_array_equal(chosen.objects_conf.numpy(), data[f"{key}_objects_conf"])
    np.testing.assert_array_equal(chosen.attrs_conf.numpy(), data[f"{key}_attrs_conf"])
    np.testing.assert_array_equal(chosen.boxes.numpy(), data[f"{key}_boxes"])


@pytest.mark.parametrize("tag", TAGS)
def test_selection_golden_caffe_layout(frcnn_golden, tag):
    data = np.load(frcnn_golden / "selection.npz")
    _assert_matches_golden(_select(data, "", tag, background_first=True), data, tag)


@pytest.mark.parametrize("case", ["a", "b", "c"])
@pytest.mark.parametrize("tag", TAGS)
def test_selection_edge_cases(frcnn_golden, case, tag):
    """a: +1 convention and tie order matter; b: MIN fallback in descending max_conf; c: exactly 36 above 0.2 stay
    in ascending index order."""
    data = np.load(frcnn_golden / "selection_edge.npz")
    _assert_matches_golden(_select(data, f"{case}_", tag, background_first=True), data, f"{case}_{tag}")


@pytest.mark.parametrize("image", [0, 1])
@pytest.mark.parametrize("tag", TAGS)
def test_selection_on_golden_network_outputs_port_layout(frcnn_golden, image, tag):
    """The tiny model's stored probabilities have background LAST (the port's layout)."""
    data = np.load(frcnn_golden / "tiny_outputs.npz")
    _assert_matches_golden(_select(data, f"img{image}_", tag, background_first=False), data, f"img{image}_{tag}")


def test_background_flag_is_a_column_layout_only(frcnn_golden):
    data = np.load(frcnn_golden / "selection.npz")
    caffe = _select(data, "", "adaptive", background_first=True)
    moved = select_boxes(
        torch.from_numpy(data["rois"]),
        torch.from_numpy(np.roll(data["cls_prob"], -1, axis=1)),
        torch.from_numpy(np.roll(data["attr_prob"], -1, axis=1)),
        ADAPTIVE_10_100,
        background_first=False,
    )
    for name in ("keep", "max_conf", "objects_id", "objects_conf", "attrs_id", "attrs_conf"):
        assert torch.equal(getattr(caffe, name), getattr(moved, name)), name


def _greedy_torchvision(boxes: torch.Tensor, scores: torch.Tensor, thresh: float) -> torch.Tensor:
    """Reference: torchvision NMS with caffe's +1 on x2, y2 (equal keeps on all golden arrays, README)."""
    plus_one = boxes.clone()
    plus_one[:, 2:] += 1
    return nms(plus_one, scores, thresh)


def test_vectorised_per_class_nms_equals_torchvision_nms(frcnn_golden):
    data = np.load(frcnn_golden / "selection_edge.npz")
    rois, cls_prob = torch.from_numpy(data["a_rois"]), torch.from_numpy(data["a_cls_prob"][:, 1:])
    expected = torch.zeros(rois.shape[0])
    for k in range(0, cls_prob.shape[1], 7):  # a sample of classes keeps this fast
        keep = _greedy_torchvision(rois, cls_prob[:, k], 0.3)
        expected[keep] = torch.maximum(expected[keep], cls_prob[keep, k])
    got = per_class_nms_max_conf(rois, cls_prob[:, ::7], 0.3)
    assert torch.equal(got, expected)


def test_caffe_iou_uses_inclusive_pixels():
    boxes = torch.tensor([[0.0, 0.0, 9.0, 9.0], [5.0, 0.0, 14.0, 9.0], [20.0, 20.0, 20.0, 20.0]])
    iou = caffe_iou(boxes)
    assert iou[0, 1] == pytest.approx(50 / 150)  # 10x10 boxes (inclusive), overlap 5x10
    assert iou[2, 2] == 1.0 and iou[0, 2] == 0.0  # a one-pixel box has area 1, not 0


def test_suppression_at_equal_iou_and_tie_order():
    # IoU exactly 0.3 is suppressed (>=); equal scores -> the lower index is visited first and kept.
    boxes = torch.tensor([[0.0, 0.0, 9.0, 9.0], [0.0, 0.0, 9.0, 9.0], [100.0, 100.0, 109.0, 109.0]])
    scores = torch.tensor([[0.5], [0.5], [0.1]])
    assert per_class_nms_max_conf(boxes, scores, 0.3).tolist() == [0.5, 0.0, pytest.approx(0.1)]
    a, b = torch.tensor([0.0, 0.0, 9.0, 9.0]), torch.tensor([0.0, 0.0, 12.0, 9.0])
    threshold = float(caffe_iou(torch.stack([a, b]))[0, 1])  # exactly their IoU (100 / 130): suppressed
    kept = per_class_nms_max_conf(torch.stack([a, b]), torch.tensor([[0.9], [0.8]]), threshold)
    assert kept.tolist() == [pytest.approx(0.9), 0.0]


def _probs(num_rois: int, hot: dict[int, tuple[int, float]], num_classes: int = 5) -> torch.Tensor:
    """Background-first probabilities: row i puts `p` on class column `k` (1-based), the rest on background."""
    prob = torch.zeros(num_rois, num_classes + 1)
    prob[:, 0] = 1.0
    for row, (k, p) in hot.items():
        prob[row, k], prob[row, 0] = p, 1.0 - p
    return prob


def test_min_and_max_branches_rank_by_descending_max_conf():
    disjoint = torch.tensor([[i * 50.0, 0.0, i * 50.0 + 20.0, 20.0] for i in range(6)])
    attr = _probs(6, {})
    cls = _probs(6, {0: (1, 0.1), 1: (2, 0.9), 2: (3, 0.3), 3: (1, 0.3), 4: (4, 0.5), 5: (2, 0.05)})
    threshold_only = select_boxes(disjoint, cls, attr, BoxSelection(1, 10), background_first=True)
    assert threshold_only.keep.tolist() == [1, 2, 3, 4]  # >= 0.2, ascending index
    fewer = select_boxes(disjoint, cls, attr, BoxSelection(5, 10), background_first=True)
    assert fewer.keep.tolist() == [1, 4, 2, 3, 0]  # MIN branch: descending, tie 0.3/0.3 -> lower index first
    more = select_boxes(disjoint, cls, attr, BoxSelection(1, 2), background_first=True)
    assert more.keep.tolist() == [1, 4]
    assert more.objects_id.tolist() == [1, 3]  # column 2 -> id 1, column 4 -> id 3 (background dropped)


def test_box_selection_validates_counts():
    with pytest.raises(ValueError):
        BoxSelection(37, 36)
    assert "fixed 36" in OBJ36.describe() and "10-100" in ADAPTIVE_10_100.describe()
