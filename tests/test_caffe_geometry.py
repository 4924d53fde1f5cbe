"""The `caffe` detector geometry: parity with ../shared/golden/frcnn/tiny_caffe_outputs.npz (CAFFE.md) through the
public API and through `extract.py --geometry caffe`, batch invariance, the difference from the `port` geometry, the
proposal layer's rules on constructed inputs, and the geometry choice (registry default, explicit flag, errors).

Tolerances are CAFFE.md's: input and anchors exact; proposals <= 5e-3 px in the same order; proposal scores,
probabilities and confidences <= 2e-5; logits and pooled features <= 1e-4; rois and boxes <= 1e-2 px; features
<= 1e-4; keep order, object and attribute ids exact.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers_detector import NAMES, SELECTIONS, check_golden_row, run_tiny_golden
from lxmert_pl.detector import (
    CaffeAnchorGenerator,
    CaffeProposalLayer,
    CheckpointError,
    FrcnnConfig,
    UnknownGeometryError,
    build_detector,
    caffe_fg_probability,
    caffe_nms,
    choose_geometry,
    detector_from_port_state_dict,
    load_detector,
    read_image,
    select_boxes,
)
from lxmert_pl.detector.loading import read_state_dict
from lxmert_pl.detector.rpn import RPNHead
from lxmert_pl.detector.random_weights import TINY_CONFIG
from lxmert_pl.features.tsv import iter_tsv_features
from lxmert_pl.registry import load_registry, resolve_checkpoint

from conftest import load_script

REPO_ROOT = Path(__file__).resolve().parents[1]

extract = load_script(REPO_ROOT / "extract.py")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def golden(frcnn_golden):
    return run_tiny_golden(frcnn_golden, "caffe")


def _first_difference(actual: np.ndarray, expected: np.ndarray, atol: float) -> str:
    """Where two proposal lists first part (CAFFE.md asks tests to say so), for the failure message."""
    rows = np.nonzero(np.abs(actual - expected).max(axis=1) > atol)[0]
    return "none" if rows.size == 0 else f"proposal #{rows[0]}: got {actual[rows[0]]}, expected {expected[rows[0]]}"


def test_model_reports_its_geometry(golden):
    assert golden["model"].geometry == "caffe"
    assert "detector geometry: caffe" in golden["report"].summary()
    # The checkpoint's port cell anchors are not used (ignored, not unexpected); nothing is missing.
    assert "proposal_generator.anchor_generator.cell_anchors.0" in golden["report"].ignored
    assert not golden["report"].unexpected


@pytest.mark.parametrize("i", [0, 1])
def test_input_and_anchors_are_bit_exact(golden, i):
    data, model = golden["data"], golden["model"]
    item = model.transform(golden["images"][i])
    assert item.scale == pytest.approx(float(data[f"img{i}_im_scale"]))
    np.testing.assert_array_equal(item.tensor.numpy(), data[f"img{i}_input"])
    np.testing.assert_array_equal(model.rpn.anchor_generator.cell_anchors.numpy(), data[f"img{i}_anchors"])


@pytest.mark.parametrize("i", [0, 1])
def test_network_outputs(golden, i):
    data, out = golden["data"], golden["single"][i]
    proposals = out.boxes.numpy()
    expected = data[f"img{i}_proposals"]
    assert proposals.shape == expected.shape
    assert np.abs(proposals - expected).max() <= 5e-3, _first_difference(proposals, expected, 5e-3)
    np.testing.assert_allclose(out.proposal_prob.numpy(), data[f"img{i}_proposal_scores"], atol=2e-5, rtol=0)
    for name, key in (("cls_logits", "obj_logits"), ("attr_logits", "attr_logits"), ("pooled", "pooled")):
        np.testing.assert_allclose(getattr(out, name).numpy(), data[f"img{i}_{key}"], atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(out.rois.numpy(), data[f"img{i}_rois"], atol=1e-2, rtol=0)
    np.testing.assert_allclose(out.cls_prob.numpy(), data[f"img{i}_cls_prob"], atol=2e-5, rtol=0)
    np.testing.assert_allclose(out.attr_prob.numpy(), data[f"img{i}_attr_prob"], atol=2e-5, rtol=0)


@pytest.mark.parametrize("i", [0, 1])
@pytest.mark.parametrize("tag", SELECTIONS)
def test_selected_rows(golden, i, tag):
    data, model, region = golden["data"], golden["model"], golden["single"][i]
    chosen = select_boxes(region.rois, region.cls_prob, region.attr_prob, SELECTIONS[tag], background_first=False)
    np.testing.assert_array_equal(chosen.keep.numpy(), data[f"img{i}_{tag}_keep"])
    check_golden_row(model.to_features(str(data[f"img{i}_name"]), region, SELECTIONS[tag]), data, f"img{i}_{tag}")


@pytest.mark.parametrize("i", [0, 1])
def test_batch_of_two_equals_one_at_a_time(golden, i):
    one, both = golden["single"][i], golden["batch"][i]
    torch.testing.assert_close(both.boxes, one.boxes, atol=1e-4, rtol=0)
    for name in ("proposal_logits", "pooled", "cls_logits", "attr_logits"):
        torch.testing.assert_close(getattr(both, name), getattr(one, name), atol=1e-4, rtol=0)


@pytest.mark.parametrize("i", [0, 1])
def test_the_two_geometries_give_different_proposals(golden, frcnn_golden, i):
    """Neither geometry can pass for the other: the port geometry's proposals are not the caffe golden's, and the
    caffe geometry's are not the port golden's."""
    port, _ = load_detector(frcnn_golden / "tiny_frcnn.safetensors", config=frcnn_golden / "tiny_config.yaml")
    assert port.geometry == "port"
    port_boxes = port.detect([golden["images"][i]])[0].boxes.numpy()
    caffe_boxes = golden["single"][i].boxes.numpy()
    np.testing.assert_allclose(port_boxes, golden["data"][f"img{i}_port_proposals"], atol=5e-3, rtol=0)
    for ours, theirs in ((caffe_boxes, port_boxes), (port_boxes, golden["data"][f"img{i}_proposals"])):
        assert ours.shape != theirs.shape or np.abs(ours - theirs).max() > 1.0
    # Not even the same boxes in another order: few caffe proposals have a near-identical port partner.
    shared = {tuple(np.round(box, 1)) for box in caffe_boxes} & {tuple(np.round(box, 1)) for box in port_boxes}
    assert len(shared) < 10


@pytest.mark.parametrize("tag", SELECTIONS)
def test_extract_cli_with_caffe_geometry(frcnn_golden, tmp_path, capsys, tag):
    data = run_tiny_golden(frcnn_golden, "caffe")["data"]
    images = tmp_path / "images"
    images.mkdir()
    for name in NAMES:
        shutil.copy(frcnn_golden / f"{name}.png", images / f"{name}.png")
    out = tmp_path / "caffe.tsv"
    boxes = ["--boxes", "36"] if tag == "fixed36" else ["--min-boxes", "10", "--max-boxes", "100"]
    code = extract.main(
        ["--images", str(images), "--out", str(out), "--detector", str(frcnn_golden / "tiny_frcnn.safetensors"),
         "--detector-config", str(frcnn_golden / "tiny_config.yaml"), "--geometry", "caffe", "--batch-size", "2",
         *boxes]
    )
    assert code == 0
    assert "detector geometry: caffe" in capsys.readouterr().out
    rows = {row.img_id: row for row in iter_tsv_features(out)}
    for i, name in enumerate(NAMES):
        assert rows[name].num_boxes == len(data[f"img{i}_{tag}_keep"])
        check_golden_row(rows[name], data, f"img{i}_{tag}")


# ---- the proposal layer's rules on constructed inputs -----------------------------------------------------------


def test_caffe_anchors_are_rounded_ratios_outer():
    """SPEC §3: 64² at ratio 0.5 is a 92 x 48 anchor around (7.5, 7.5); rows are ratios outer, scales inner."""
    anchors = CaffeAnchorGenerator.generate_cell_anchors((64, 128, 256, 512), (0.5, 1.0, 2.0), 16)
    widths, heights = anchors[:, 2] - anchors[:, 0] + 1, anchors[:, 3] - anchors[:, 1] + 1
    assert (widths[0], heights[0]) == (92, 48)
    np.testing.assert_array_equal((anchors[:, 0] + anchors[:, 2]) / 2, 7.5)
    np.testing.assert_array_equal(widths[4:8], [64, 128, 256, 512])  # ratio 1, scales 4..32
    np.testing.assert_array_equal(heights[8:], [88, 176, 352, 704])  # ratio 2: 11 x 22 base, scaled


def test_fg_probability_is_the_sigmoid_and_saturates_to_ties():
    logits = torch.tensor([-30.0, -2.0, 0.0, 0.5, 3.0, 20.0, 40.0])
    torch.testing.assert_close(caffe_fg_probability(logits), torch.sigmoid(logits), atol=1e-7, rtol=0)
    assert caffe_fg_probability(torch.tensor([20.0, 40.0])).tolist() == [1.0, 1.0]  # float32: an exact tie


def test_nms_suppresses_at_equality_and_compares_with_a_double_threshold():
    boxes = torch.tensor([[0.0, 0.0, 9.0, 9.0], [0.0, 0.0, 9.0, 4.0], [20.0, 20.0, 29.0, 29.0]])
    # IoU of box 1 with box 0 is exactly 50 / 100 = 0.5: suppressed at >= 0.5, kept at > 0.5.
    assert caffe_nms(boxes, 0.5).tolist() == [0, 2]
    # 70 / 100 in float32 is 0.699999988, below the double 0.7: kept (a float32 threshold would suppress it).
    boxes[1] = torch.tensor([0.0, 0.0, 9.0, 6.0])
    assert caffe_nms(boxes, 0.7).tolist() == [0, 1, 2]
    assert caffe_nms(boxes, 0.7, max_keep=2).tolist() == [0, 1]


def _constant_head(sizes: int, ratios: int, favoured: int | None) -> RPNHead:
    """An RPN head on 4 input channels whose outputs do not depend on the image: zero deltas, objectness bias 0
    except port channel `favoured` (bias 5)."""
    head = RPNHead(4, 4, sizes * ratios)
    with torch.no_grad():
        for module in (head.conv, head.cls_logits, head.bbox_pred):
            module.weight.zero_()
            module.bias.zero_()
        if favoured is not None:
            head.cls_logits.bias[favoured] = 5.0
    return head


@pytest.mark.parametrize("sizes", [(64.0, 128.0, 256.0, 512.0), (32.0, 64.0, 128.0, 256.0, 512.0)])
def test_port_channels_map_to_caffe_anchors_and_ties_go_to_the_lower_flat_index(sizes):
    """Port channel a_p = s·R + r carries the caffe anchor a_c = r·S + s (12 and 15 anchors); equal probabilities
    rank in caffe memory order (y, x, a_c), so the first proposal sits at location (0, 0)."""
    ratios = (0.5, 1.0, 2.0)
    generator = CaffeAnchorGenerator(sizes, ratios, 16)
    big = 64 * 16
    features = torch.zeros(1, 4, big // 16, big // 16)
    s, r = 1, 2  # the second size at ratio 2
    layer = CaffeProposalLayer(generator, _constant_head(len(sizes), 3, s * 3 + r), min_size=0.0)
    boxes, logits = layer(features, (big, big), 1.0)
    # Zero deltas decode an anchor to itself with x2, y2 one pixel further (caffe's "+1" widths, no "-1" back);
    # location (0, 0) is clipped at the top-left border.
    decoded = generator.cell_anchors + torch.tensor([0.0, 0.0, 1.0, 1.0])
    torch.testing.assert_close(boxes[0], decoded[r * len(sizes) + s].clamp(min=0.0), atol=0, rtol=0)
    assert logits[0].item() == 5.0
    # With no favoured channel every candidate ties: the first is caffe channel 0 at (0, 0).
    layer = CaffeProposalLayer(generator, _constant_head(len(sizes), 3, None), min_size=0.0)
    boxes, _ = layer(features, (big, big), 1.0)
    torch.testing.assert_close(boxes[0], decoded[0].clamp(min=0.0), atol=0, rtol=0)


def test_min_size_is_in_original_pixels_and_applies_before_ranking():
    """At scale 4 caffe's min size is 64 network px: the favoured 32-px anchors vanish before the ranking."""
    generator = CaffeAnchorGenerator((32.0, 256.0), (1.0,), 16)
    layer = CaffeProposalLayer(generator, _constant_head(2, 1, 0), post_nms_topk=5)
    features = torch.zeros(1, 4, 32, 32)
    boxes, logits = layer(features, (512, 512), 1.0)
    assert logits[0].item() == 5.0  # scale 1: the 32-px anchors (>= 16 px) lead
    boxes, logits = layer(features, (512, 512), 4.0)
    assert (logits == 0.0).all() and ((boxes[:, 2] - boxes[:, 0] + 1) >= 64).all()


# ---- choosing the geometry --------------------------------------------------------------------------------------


def test_unknown_geometry_is_a_user_error_listing_the_valid_ones():
    with pytest.raises(UnknownGeometryError, match=r"'cafe'.*valid geometries: port, caffe"):
        build_detector(dataclasses.replace(TINY_CONFIG), geometry="cafe")
    with pytest.raises(UnknownGeometryError, match=r"^detector.geometry: "):
        choose_geometry("cafe", None, "detector.geometry")


def test_choice_order_explicit_then_registry_then_port():
    assert choose_geometry(None, None) is None  # the weights' own: load_detector decides (port unless recorded)
    assert choose_geometry(None, "caffe") == "caffe"
    assert choose_geometry("port", "caffe") == "port"
    with pytest.raises(UnknownGeometryError, match="checkpoint registry"):
        choose_geometry(None, "detectron")


def test_registry_defaults():
    """caffe for the weights LXMERT's features came from, port for the demo detector trained with port proposals."""
    entries = load_registry()
    assert entries["frcnn-vg-finetuned"].geometry == "caffe"
    assert entries["demo-frcnn"].geometry == "port"
    assert all(e.geometry is None for e in entries.values() if not e.format.startswith("frcnn"))
    if (REPO_ROOT / "checkpoints" / "demo" / "frcnn").exists():
        assert resolve_checkpoint("demo-frcnn").geometry == "port"
    assert resolve_checkpoint(str(REPO_ROOT / "checkpoints")).geometry is None  # a path: no registry default


def test_extract_flag_overrides_the_registry_default(monkeypatch, tmp_path):
    """`--geometry` wins over the registry; without it the alias's registry value is used."""
    if not (REPO_ROOT / "checkpoints" / "demo" / "frcnn" / "config.yaml").exists():
        pytest.skip("bundled demo detector absent (checkpoints/demo/frcnn)")
    from lxmert_pl.runs import extraction as extraction_run

    seen = []
    monkeypatch.setattr(extraction_run, "run_extraction", lambda *a, **k: seen.append(k["geometry"]) or _Result())
    monkeypatch.setattr(extraction_run, "list_images", lambda images: ["x.png"])
    base = ["--images", str(tmp_path), "--out", str(tmp_path / "o.tsv"), "--detector", "demo-frcnn"]
    extract.main(base)
    extract.main([*base, "--geometry", "caffe"])
    assert seen == ["port", "caffe"]
    with pytest.raises(SystemExit):
        extract.COMMAND.compose([*base, "--geometry", "cafe"])


class _Result:
    written, already_done, skipped = 1, 0, []


@pytest.mark.parametrize(("key", "expected"), [(None, "port"), ("caffe", "caffe"), ("port", "port")])
def test_eval_detector_geometry_key(tmp_path, key, expected):
    """eval's `detector.geometry` (null: the registry's value for the alias) reaches the detector."""
    if not (REPO_ROOT / "checkpoints" / "demo" / "frcnn" / "config.yaml").exists():
        pytest.skip("bundled demo detector absent (checkpoints/demo/frcnn)")
    from lxmert_pl.runs.evaluate import build_feature_source

    from lxmert_pl.runs.config import compose

    cfg = compose("eval", flags={"data.source": "images", "detector.geometry": key, "detector.cache": False})
    source, _ = build_feature_source(cfg, tmp_path)
    assert source.detector.geometry == expected


def test_state_dict_without_port_anchors_loads_for_caffe_only(frcnn_golden):
    """Weights converted from another format (no `cell_anchors`) run the caffe geometry; the port one needs them."""
    cfg = FrcnnConfig.from_yaml(frcnn_golden / "tiny_config.yaml")
    state = read_state_dict(frcnn_golden / "tiny_frcnn.safetensors")
    del state["proposal_generator.anchor_generator.cell_anchors.0"]
    model, report = detector_from_port_state_dict(cfg, state, "tiny_config.yaml", "converted", geometry="caffe")
    assert not report.unexpected and report.geometry == "caffe"
    out = model.detect([read_image(frcnn_golden / "astronaut.png")])[0]
    data = run_tiny_golden(frcnn_golden, "caffe")["data"]
    np.testing.assert_allclose(out.boxes.numpy(), data["img0_proposals"], atol=5e-3, rtol=0)
    with pytest.raises(CheckpointError, match="cell_anchors"):
        detector_from_port_state_dict(cfg, state, "tiny_config.yaml", "converted", geometry="port")
