"""Original caffe weights (`.caffemodel`): parsing, the layer -> port key map, the load report's errors, `convert`,
the registry aliases, and parity with ../shared/golden/frcnn/tiny_caffemodel_outputs.npz (CAFFEMODEL.md).

Tolerances are CAFFEMODEL.md §6: proposals <= 5e-3 px in the same order; proposal scores and probabilities <= 2e-5;
logits and pooled features <= 1e-4; boxes <= 1e-2 px; keep (order included), object and attribute ids exact.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lxmert_pl.detector import CheckpointError, load_detector
from lxmert_pl.detector.caffe_proto import NetParameter
from lxmert_pl.detector.caffemodel import (
    CAFFE_RESNET101,
    CaffemodelGeometryError,
    _batchnorm,
    block_name,
    caffe_layer_map,
    read_caffemodel,
    read_caffemodel_state,
)
from lxmert_pl.detector.loading import port_key, read_state_dict
from lxmert_pl.detector.preprocess import read_image
from lxmert_pl.detector.selection import select_boxes
from lxmert_pl.registry import CheckpointUnavailableError, load_registry, resolve_checkpoint

from conftest import golden_path
from helpers_detector import SELECTIONS

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _files() -> tuple[Path, Path]:
    directory = golden_path("frcnn")
    return directory / "tiny_frcnn.caffemodel", directory / "tiny_config.yaml"


def _message() -> NetParameter:
    return NetParameter.FromString(_files()[0].read_bytes())


def _write(message: NetParameter, path: Path) -> Path:
    path.write_bytes(message.SerializeToString())
    return path


def _layer(message: NetParameter, name: str):
    return next(layer for layer in message.layer if layer.name == name)


# ------------------------------------------------------------------------------------------------ parsing, the map


def test_golden_file_parses_with_the_protobuf_messages():
    """CAFFEMODEL.md §1, §5: 247 layers, 167 with blobs, 333 blobs, 1,197,117 float32 values."""
    net = read_caffemodel(_files()[0])
    assert net.name == "tiny-ResNet-50" and len(net.layers) == 247
    with_blobs = [layer for layer in net.layers if layer.blobs]
    assert len(with_blobs) == 167 and sum(len(layer.blobs) for layer in with_blobs) == 333
    assert sum(blob.data.size for layer in with_blobs for blob in layer.blobs) == 1_197_117
    layers = net.by_name()
    assert layers["rpn_cls_score"].blobs[0].data.shape == (30, 32, 1, 1)  # 2A channels, A = 15
    assert layers["bbox_pred"].blobs[0].data.shape == (6404, 128)
    assert layers["bn_conv1"].type == "BatchNorm" and layers["bn_conv1"].blobs[2].data.shape == (1,)


def test_mapped_blobs_equal_the_golden_safetensors():
    """Every port tensor comes back from the caffe layout: bit-exact (BatchNorm divided by f != 1, background rows
    moved last, anchors re-ordered), except fg - bg (<= 6e-8) and bbox_pred x (10, 10, 5, 5) (<= 3e-8)."""
    caffemodel, config = _files()
    _, state, report = read_caffemodel_state(caffemodel, config)
    reference = read_state_dict(caffemodel.parent / "tiny_frcnn.safetensors")
    assert set(reference) - set(state) == {k for k in reference if k.endswith("num_batches_tracked")}
    inexact = {
        "proposal_generator.rpn_head.objectness_logits.weight": 6e-8,
        "proposal_generator.rpn_head.objectness_logits.bias": 6e-8,
        "roi_heads.box_predictor.bbox_pred.weight": 3e-8,
        "roi_heads.box_predictor.bbox_pred.bias": 3e-8,
    }
    for key, value in state.items():
        if key in inexact:
            torch.testing.assert_close(value, reference[key], atol=inexact[key], rtol=0, msg=key)
        else:
            assert torch.equal(value, reference[key]), key
    assert len(report.loaded) == 167 and not report.unexpected and len(report.ignored) == 80
    low, high = report.batchnorm_factors
    assert low < 0.51 and high > 1000  # the file's factors (never 1): dividing them out is what made the above exact


def test_batchnorm_factor_zero_gives_zero_statistics():
    """caffe batch_norm_layer.cpp: scale = (f == 0) ? 0 : 1 / f."""
    blobs = [torch.tensor([2.0, 4.0]), torch.tensor([8.0, 6.0]), torch.tensor([0.0])]
    zero = _batchnorm(blobs, CAFFE_RESNET101)
    assert torch.equal(zero["norm.running_mean"], torch.zeros(2))
    assert torch.equal(zero["norm.running_var"], torch.zeros(2))
    blobs[2] = torch.tensor([2.0])
    assert torch.equal(_batchnorm(blobs, CAFFE_RESNET101)["norm.running_var"], torch.tensor([4.0, 3.0]))


def test_real_preset_uses_the_test_prototxt_names():
    """ResNet-101: a, b1 ... in res3 / res4 (res4b22 feeds the RPN), letters in res2 / res5; 320 parameterised
    layers: conv1 + bn + scale, 33 blocks x 3 branches x 3, 4 shortcuts x 3, 3 RPN, 5 head."""
    names = [mapping.layer for mapping in caffe_layer_map(CAFFE_RESNET101)]
    assert len(names) == len(set(names)) == 3 + 33 * 9 + 4 * 3 + 3 + 5
    for name in ("res3b3_branch2c", "bn4b22_branch2c", "scale4b22_branch2a", "res4a_branch1", "res5c_branch2b",
                 "bn2c_branch2a", "rpn_conv/3x3", "cls_embedding", "attr_score"):
        assert name in names, name
    assert "res4b23_branch2a" not in names and "res4w_branch2a" not in names
    assert [block_name(3, i, 50) for i in range(4)] == ["res3a", "res3b", "res3c", "res3d"]
    assert [block_name(4, i, 101) for i in (0, 1, 22)] == ["res4a", "res4b1", "res4b22"]
    assert block_name(5, 2, 101) == "res5c"


def test_real_preset_map_fills_every_tensor_of_the_model():
    """The built-in preset's map covers every tensor of the real-size detector (ResNet-101, 12 anchors), with the
    caffe shapes of test.prototxt: rpn_cls_score 24 rows, bbox_pred 6404, cls_embedding 1601 x 256."""
    from lxmert_pl.detector import build_detector
    from lxmert_pl.detector.caffemodel import _CONVERTERS

    model = build_detector(CAFFE_RESNET101, geometry="caffe")
    targets = {port_key(key): tuple(value.shape) for key, value in model.state_dict().items()}
    covered, shapes = set(), {}
    for mapping in caffe_layer_map(CAFFE_RESNET101):
        shapes[mapping.layer] = _CONVERTERS[mapping.kind][0](targets, mapping.target)
        covered.update(key for key in targets if key.startswith(mapping.target + "."))
    assert covered == set(targets)
    assert shapes["rpn_cls_score"] == [(24, 512, 1, 1), (24,)] and shapes["rpn_bbox_pred"][0] == (48, 512, 1, 1)
    assert shapes["bbox_pred"] == [(6404, 2048), (6404,)] and shapes["cls_embedding"] == [(1601, 256)]
    assert shapes["fc_attr"][0] == (512, 2304) and shapes["attr_score"][0] == (401, 512)
    assert shapes["bn_conv1"] == [(64,), (64,), (1,)]


# ------------------------------------------------------------------------------------------------ report and errors


def test_missing_layer_is_an_error_naming_it(tmp_path):
    message = _message()
    message.layer.remove(_layer(message, "res4b_branch2b"))
    path = _write(message, tmp_path / "missing.caffemodel")
    with pytest.raises(CheckpointError, match=r"1 missing layers: res4b_branch2b") as error:
        load_detector(path, _files()[1])
    assert str(path) in str(error.value)


def test_misshapen_blob_is_an_error_naming_the_layer(tmp_path):
    message = _message()
    blob = _layer(message, "cls_score").blobs[0]
    blob.shape.dim[:] = [1601 * 2, 64]
    path = _write(message, tmp_path / "misshapen.caffemodel")
    with pytest.raises(CheckpointError, match=r"cls_score: blob shapes 3202x64, 1601, the config implies 1601x128"):
        load_detector(path, _files()[1])


def test_blob_whose_values_do_not_fill_its_shape_is_an_error(tmp_path):
    message = _message()
    _layer(message, "fc_attr").blobs[1].data.append(1.0)
    path = _write(message, tmp_path / "damaged.caffemodel")
    with pytest.raises(CheckpointError, match=r"layer 'fc_attr' blob 1 holds 33 values for its shape \(32,\)"):
        load_detector(path, _files()[1])


def test_layer_of_another_type_is_an_error(tmp_path):
    message = _message()
    _layer(message, "bn3a_branch1").type = "Scale"
    path = _write(message, tmp_path / "type.caffemodel")
    with pytest.raises(CheckpointError, match=r"bn3a_branch1: a Scale layer, expected BatchNorm"):
        load_detector(path, _files()[1])


def test_unknown_layer_with_blobs_is_reported_not_fatal(tmp_path):
    message = _message()
    extra = message.layer.add(name="fc_extra", type="InnerProduct")
    blob = extra.blobs.add()
    blob.data.extend([0.5] * 6)
    blob.shape.dim.extend([2, 3])
    path = _write(message, tmp_path / "extra.caffemodel")
    model, report = load_detector(path, _files()[1])
    assert report.unexpected == ["fc_extra (InnerProduct, 2x3)"]
    assert "unknown layers with blobs 1" in report.summary() and "fc_extra" in report.summary()
    assert model.geometry == "caffe"


def test_legacy_4d_blob_dims_are_accepted(tmp_path):
    """Old files: no `shape`, num/channels/height/width with the layer shape right-aligned (bias 1x1x1xN)."""
    message = _message()
    for blob in _layer(message, "attr_score").blobs:
        dims = list(blob.shape.dim)
        blob.ClearField("shape")
        blob.num, blob.channels = 1, 1
        blob.height, blob.width = ([1] + dims)[-2:]
    path = _write(message, tmp_path / "legacy.caffemodel")
    _, state, _ = read_caffemodel_state(path, _files()[1])
    _, reference, _ = read_caffemodel_state(_files()[0], _files()[1])
    for suffix in ("weight", "bias"):
        key = f"roi_heads.box_predictor.attr_score.{suffix}"
        assert torch.equal(state[key], reference[key])


def test_legacy_v1_layers_are_read(tmp_path):
    message = NetParameter(name="old")
    layer = message.layers.add(name="conv", type=4)  # V1 LayerType CONVOLUTION
    blob = layer.blobs.add(num=2, channels=1, height=1, width=1)
    blob.data.extend([1.0, 2.0])
    net = read_caffemodel(_write(message, tmp_path / "v1.caffemodel"))
    assert [(layer.name, layer.type) for layer in net.layers] == [("conv", "Convolution")]
    assert net.layers[0].blobs[0].data.shape == (2, 1, 1, 1) and net.layers[0].blobs[0].legacy


@pytest.mark.parametrize("cut", [0.5, 0.999])
def test_truncated_file_is_an_error_naming_it(tmp_path, cut):
    data = _files()[0].read_bytes()
    path = tmp_path / "truncated.caffemodel"
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(CheckpointError, match="truncated") as error:
        load_detector(path, _files()[1])
    assert str(path) in str(error.value)


@pytest.mark.parametrize("source", ["astronaut.png", "tiny_config.yaml", "tiny_frcnn.safetensors", None])
def test_file_that_is_not_a_caffemodel_is_an_error_naming_it(tmp_path, source):
    path = tmp_path / "other.caffemodel"
    path.write_bytes(b"" if source is None else (golden_path("frcnn") / source).read_bytes())
    with pytest.raises(CheckpointError, match="caffemodel") as error:
        load_detector(path, _files()[1])
    assert str(path) in str(error.value)


def test_port_geometry_is_refused_with_the_reason():
    with pytest.raises(CaffemodelGeometryError, match="runs only with geometry 'caffe'"):
        load_detector(_files()[0], _files()[1], geometry="port")


def test_preset_mismatch_points_to_the_config_option():
    with pytest.raises(CheckpointError, match="built-in preset.*--detector-config"):
        load_detector(_files()[0])


# ------------------------------------------------------------------------------------------------ parity


@pytest.fixture(scope="module")
def golden_run():
    caffemodel, config = _files()
    model, report = load_detector(caffemodel, config)
    images = [read_image(caffemodel.parent / name) for name in ("astronaut.png", "coffee.png")]
    return {
        "model": model,
        "report": report,
        "data": np.load(caffemodel.parent / "tiny_caffemodel_outputs.npz"),
        "single": [model.detect([image])[0] for image in images],
        "batch": model.detect(images),
    }


def _max_diff(actual: torch.Tensor, expected: np.ndarray) -> float:
    assert tuple(actual.shape) == expected.shape
    return float((actual.detach().double() - torch.from_numpy(expected).double()).abs().max())


@pytest.mark.parametrize("i", [0, 1])
def test_network_outputs_match_the_caffe_pipeline(golden_run, i):
    data, out = golden_run["data"], golden_run["single"][i]
    p = f"img{i}_"
    assert _max_diff(out.boxes, data[p + "proposals"]) <= 5e-3  # same order: compared row by row
    assert _max_diff(out.proposal_prob, data[p + "proposal_scores"]) <= 2e-5
    for ours, theirs in (("cls_logits", "obj_logits"), ("attr_logits", "attr_logits"), ("pooled", "pooled")):
        assert _max_diff(getattr(out, ours), data[p + theirs]) <= 1e-4, ours
    assert _max_diff(out.rois, data[p + "rois"]) <= 1e-2
    assert _max_diff(out.cls_prob, data[p + "cls_prob"]) <= 2e-5
    assert _max_diff(out.attr_prob, data[p + "attr_prob"]) <= 2e-5


@pytest.mark.parametrize("i", [0, 1])
@pytest.mark.parametrize("tag", ["fixed36", "adaptive"])
def test_selection_matches_the_caffe_pipeline(golden_run, i, tag):
    data, out, model = golden_run["data"], golden_run["single"][i], golden_run["model"]
    p = f"img{i}_{tag}_"
    chosen = select_boxes(out.rois, out.cls_prob, out.attr_prob, SELECTIONS[tag], model.background_first)
    np.testing.assert_array_equal(chosen.keep.numpy(), data[p + "keep"])
    np.testing.assert_array_equal(chosen.objects_id.numpy(), data[p + "objects_id"])
    np.testing.assert_array_equal(chosen.attrs_id.numpy(), data[p + "attrs_id"])
    assert _max_diff(chosen.max_conf[chosen.keep], data[p + "max_conf"][data[p + "keep"]]) <= 2e-5
    assert _max_diff(chosen.objects_conf, data[p + "objects_conf"]) <= 2e-5
    assert _max_diff(chosen.attrs_conf, data[p + "attrs_conf"]) <= 2e-5
    assert _max_diff(chosen.boxes, data[p + "boxes"]) <= 1e-2
    assert _max_diff(out.pooled[chosen.keep], data[p + "features"]) <= 1e-4


@pytest.mark.parametrize("i", [0, 1])
def test_batch_of_two_equals_one_at_a_time(golden_run, i):
    one, both = golden_run["single"][i], golden_run["batch"][i]
    for name in ("boxes", "pooled", "cls_logits", "attr_logits"):
        torch.testing.assert_close(getattr(both, name), getattr(one, name), atol=1e-4, rtol=0, msg=name)


def test_convert_then_load_gives_the_same_network(golden_run, tmp_path):
    from lxmert_pl.detector.__main__ import main

    caffemodel, config = _files()
    out = tmp_path / "converted"
    assert main(["convert", str(caffemodel), "--out", str(out), "--detector-config", str(config)]) == 0
    converted, report = load_detector(out)  # the converted config records the caffe geometry
    assert report.geometry == "caffe" and not report.missing and not report.unexpected
    assert load_detector(out, geometry="port")[0].geometry == "port"  # an explicit choice still wins
    direct = golden_run["model"].state_dict()
    assert converted.state_dict().keys() == direct.keys()
    assert all(torch.equal(value, direct[key]) for key, value in converted.state_dict().items())
    saved = read_state_dict(out / "model.safetensors")
    assert saved["roi_heads.box_predictor.bbox_pred.weight"].shape == (6400, 128)  # kept, in the port's layout


def test_convert_command_reports_a_user_error_in_one_line(tmp_path, capsys):
    from lxmert_pl.detector.__main__ import main

    path = tmp_path / "broken.caffemodel"
    path.write_bytes(b"\x0a\xff\xff")
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(path), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert f"error: {path} is not a readable caffemodel" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ registry


def test_registry_aliases_of_the_original_models(tmp_path):
    entries = load_registry()
    expected = {
        "frcnn-caffe-36": "resnet101_faster_rcnn_final_iter_320000.caffemodel",
        "frcnn-caffe-10-100": "resnet101_faster_rcnn_final.caffemodel",
    }
    for alias, name in expected.items():
        entry = entries[alias]
        assert entry.format == "frcnn-caffe" and Path(entry.file).name == name
        assert entry.downloads[0].url.startswith("https://") and name in entry.downloads[0].url
        assert entry.downloads[0].sha256 is None  # unknown: recorded on first download
        with pytest.raises(CheckpointUnavailableError, match=name):
            resolve_checkpoint(alias, checkpoints_dir=tmp_path, download=False)
    placed = tmp_path / entries["frcnn-caffe-36"].file
    placed.parent.mkdir(parents=True)
    placed.write_bytes(_files()[0].read_bytes())
    resolved = resolve_checkpoint("frcnn-caffe-36", checkpoints_dir=tmp_path, download=False)
    assert resolved.path == placed and resolved.format == "frcnn-caffe"


def test_caffemodel_path_resolves_to_the_caffe_geometry():
    resolved = resolve_checkpoint(_files()[0], download=False)
    assert (resolved.format, resolved.geometry) == ("frcnn-caffe", "caffe")
    assert load_registry()["frcnn-caffe-36"].geometry == "caffe"


def test_extract_cli_reproduces_the_caffe_pipeline(tmp_path):
    """`extract.py --detector FILE.caffemodel --detector-config CONFIG` (no --geometry: a caffemodel means caffe),
    both images in one batch: the golden fixed36 rows. (extract.py's `main` in this process: `run_in_process`.)"""
    from e2e_helpers import run_in_process

    from lxmert_pl.features.tsv import iter_tsv_features

    caffemodel, config = _files()
    images = tmp_path / "images"
    images.mkdir()
    for name in ("astronaut.png", "coffee.png"):
        (images / name).write_bytes((caffemodel.parent / name).read_bytes())
    out = tmp_path / "obj36.tsv"
    done = run_in_process("extract.py", "--images", images, "--out", out, "--detector", caffemodel,
                          "--detector-config", config, "--batch-size", "2")
    assert done.returncode == 0, done.stderr
    assert "geometry: caffe" in done.stdout and "loaded 167 caffe layers" in done.stdout
    data = np.load(caffemodel.parent / "tiny_caffemodel_outputs.npz")
    rows = {row.img_id: row for row in iter_tsv_features(out)}
    for i, name in enumerate(("astronaut", "coffee")):
        row, p = rows[name], f"img{i}_fixed36_"
        np.testing.assert_array_equal(row.objects_id, data[p + "objects_id"])
        np.testing.assert_array_equal(row.attrs_id, data[p + "attrs_id"])
        np.testing.assert_allclose(row.objects_conf, data[p + "objects_conf"], atol=2e-5, rtol=0)
        np.testing.assert_allclose(row.boxes, data[p + "boxes"], atol=1e-2, rtol=0)
        np.testing.assert_allclose(row.features, data[p + "features"], atol=1e-4, rtol=0)


def test_probe_of_a_caffemodel_says_to_convert_first(tmp_path, capsys):
    from lxmert_pl.detector.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["probe", "--detector", str(_files()[0]), "--images", str(tmp_path)])
    assert exit_info.value.code == 2 and "convert it first" in capsys.readouterr().err


@pytest.mark.parametrize("channels_last", [True, False])
def test_caffemodel_honours_the_memory_format(channels_last):
    """`load_detector(x.caffemodel, channels_last=False)` gives NCHW convs, as for port-format weights (the layout
    a CPU fine-tuning needs: `ChannelsLastTrainingError`)."""
    caffemodel, config = _files()
    model, _ = load_detector(caffemodel, config=config, channels_last=channels_last)
    for conv in (model.backbone.res3[0].conv2, model.roi_head.res5[0].conv2):  # 3x3: a 1x1 is both layouts
        nhwc = conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
        assert nhwc == channels_last
