"""Parity with ../shared/golden/frcnn (tiny weights in the port's format, two images) and batch invariance.

Tolerances are the golden README's: proposals <= 5e-3 px in the same order; logits and pooled features <= 1e-4
(1e-5 relative above 10); probabilities and confidences <= 2e-5; boxes <= 1e-2 px; features <= 1e-4; keep order,
object and attribute ids exact; a batch of two equals one image at a time within 1e-4.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from helpers_detector import SELECTIONS, check_golden_row, run_tiny_golden
from lxmert_pl.detector import OBJ36



pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def golden(frcnn_golden):
    return run_tiny_golden(frcnn_golden, "port")


def _close(actual: torch.Tensor, expected: np.ndarray, atol: float, rtol: float = 0.0) -> float:
    actual = actual.numpy()
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol)
    return float(np.abs(actual - expected).max())


@pytest.mark.parametrize("i", [0, 1])
def test_preprocessing_is_bit_exact(golden, i):
    data = golden["data"]
    item = golden["model"].transform(golden["images"][i])
    assert item.scale == pytest.approx(float(data[f"img{i}_im_scale"]))
    assert (item.orig_h, item.orig_w) == (data[f"img{i}_img_h"], data[f"img{i}_img_w"])
    np.testing.assert_array_equal(item.tensor.numpy(), data[f"img{i}_input"])


@pytest.mark.parametrize("i", [0, 1])
def test_network_outputs(golden, i):
    data, out = golden["data"], golden["single"][i]
    _close(out.boxes, data[f"img{i}_proposals"], atol=5e-3)  # same order implied by elementwise comparison
    _close(out.proposal_logits, data[f"img{i}_proposal_logits"], atol=1e-4, rtol=1e-5)
    _close(out.cls_logits, data[f"img{i}_obj_logits"], atol=1e-4, rtol=1e-5)
    _close(out.attr_logits, data[f"img{i}_attr_logits"], atol=1e-4, rtol=1e-5)
    _close(out.pooled, data[f"img{i}_pooled"], atol=1e-4, rtol=1e-5)
    _close(out.rois, data[f"img{i}_rois"], atol=1e-2)
    _close(out.cls_prob, data[f"img{i}_cls_prob"], atol=2e-5)
    _close(out.attr_prob, data[f"img{i}_attr_prob"], atol=2e-5)


@pytest.mark.parametrize("i", [0, 1])
@pytest.mark.parametrize("tag", SELECTIONS)
def test_extracted_rows(golden, i, tag):
    data, model = golden["data"], golden["model"]
    row = model.to_features(str(data[f"img{i}_name"]), golden["single"][i], SELECTIONS[tag])
    key = f"img{i}_{tag}"
    assert (row.img_h, row.img_w) == (data[f"img{i}_img_h"], data[f"img{i}_img_w"])
    check_golden_row(row, data, key)
    assert row.objects_id.dtype == np.int64 and row.features.dtype == np.float32 and row.boxes.dtype == np.float32


@pytest.mark.parametrize("i", [0, 1])
def test_batch_of_two_equals_one_at_a_time(golden, i):
    """The images have different sizes (240x240, 240x360): no padding may leak into either."""
    one, both = golden["single"][i], golden["batch"][i]
    torch.testing.assert_close(both.boxes, one.boxes, atol=1e-4, rtol=0)
    for name in ("pooled", "cls_logits", "attr_logits"):
        torch.testing.assert_close(getattr(both, name), getattr(one, name), atol=1e-4, rtol=0)
    rows_one = golden["model"].to_features("x", one, OBJ36)
    rows_both = golden["model"].to_features("x", both, OBJ36)
    np.testing.assert_array_equal(rows_both.objects_id, rows_one.objects_id)
    np.testing.assert_allclose(rows_both.features, rows_one.features, atol=1e-4, rtol=0)


def test_equal_sized_images_in_one_batch(golden):
    """An image and its mirror image (same size): each result equals the image alone."""
    image = golden["images"][1]
    flipped = np.ascontiguousarray(image[:, ::-1])
    batch = golden["model"].detect([image, flipped])
    alone = golden["model"].detect([flipped])[0]
    for got, want in ((batch[0], golden["single"][1]), (batch[1], alone)):
        torch.testing.assert_close(got.boxes, want.boxes, atol=1e-4, rtol=0)
        torch.testing.assert_close(got.pooled, want.pooled, atol=1e-4, rtol=0)


def test_given_boxes_are_pooled_instead_of_proposals(golden):
    """Given boxes (original pixels) give the same head outputs as those boxes coming from the RPN."""
    data, model, image = golden["data"], golden["model"], golden["images"][0]
    scale = float(data["img0_im_scale"])
    given = data["img0_rois"][:7]
    region = model.detect([image], given_boxes=[given])[0]
    assert region.proposal_logits is None
    np.testing.assert_array_equal(region.rois.numpy(), given)
    with torch.no_grad():
        reference = model([model.transform(image).tensor], [torch.from_numpy(given) * scale])[0]
    torch.testing.assert_close(region.pooled, reference.pooled)
    row = model.extract([image], ["astronaut"], given_boxes=[given])[0]
    assert row.num_boxes == 7
    np.testing.assert_array_equal(row.boxes, given)
    object_prob = region.cls_prob[:, :-1]
    np.testing.assert_array_equal(row.objects_id, object_prob.argmax(dim=1).numpy())
    np.testing.assert_allclose(row.objects_conf, object_prob.max(dim=1).values.numpy(), atol=0)
    np.testing.assert_array_equal(row.attrs_id, region.attr_prob[:, :-1].argmax(dim=1).numpy())


def test_given_boxes_mixed_with_detection_in_one_batch(golden):
    data, model = golden["data"], golden["model"]
    given = data["img1_fixed36_boxes"][:5]
    mixed = model.extract(golden["images"], ["astronaut", "coffee"], OBJ36, given_boxes=[None, given])
    np.testing.assert_array_equal(mixed[0].objects_id, data["img0_fixed36_objects_id"])
    np.testing.assert_allclose(mixed[0].features, data["img0_fixed36_features"], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(mixed[1].boxes, given)


def test_invalid_given_boxes_are_rejected(golden):
    with pytest.raises(ValueError, match="x2 >= x1"):
        golden["model"].detect(golden["images"][:1], given_boxes=[np.array([[10.0, 10.0, 5.0, 20.0]])])
    with pytest.raises(ValueError, match=r"shape \(R, 4\)"):
        golden["model"].detect(golden["images"][:1], given_boxes=[np.zeros((3, 5))])
