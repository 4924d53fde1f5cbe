"""Config parsing, the port's key map, checkpoint loading (report and errors) and the tiny detector helper."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from lxmert_pl.detector import CheckpointError, FrcnnConfig, build_detector, load_detector, save_tiny_detector
from lxmert_pl.detector.loading import port_key, read_state_dict

SMALL = {"min_size_test": 96, "max_size_test": 160}  # a small input keeps the tiny detector's calibration fast


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_detector(tmp_path_factory.mktemp("tiny") / "det", seed=0, **SMALL)


def _copy(tiny_dir, tmp_path):
    target = tmp_path / "det"
    shutil.copytree(tiny_dir, target)
    return target


def test_default_config_is_the_full_model():
    cfg = FrcnnConfig()
    assert (cfg.depth, cfg.blocks_per_stage, cfg.pooled_dim, cfg.res4_channels) == (101, (3, 4, 23), 2048, 1024)
    assert cfg.num_anchors == 12 and (cfg.num_classes, cfg.num_attrs) == (1600, 400)
    assert (cfg.min_size_test, cfg.max_size_test, cfg.pooler_resolution) == (600, 1000, 14)


def test_full_model_has_the_ports_tensor_count():
    """SPEC §8: 640 port entries = ours + 104 num_batches_tracked + 2 bbox_pred; 65,545,318 elements."""
    state = build_detector(FrcnnConfig()).state_dict()
    num_norms = sum(key.endswith("running_var") for key in state)
    assert len(state) + num_norms + 2 == 640
    assert sum(t.numel() for t in state.values()) + num_norms + 6400 * 2048 + 6400 == 65_545_318


def test_golden_config_reads_sizes_and_ignores_unknown_keys(frcnn_golden, tmp_path):
    data = yaml.safe_load((frcnn_golden / "tiny_config.yaml").read_text())
    data["SOMETHING_NEW"] = {"X": 1}
    data["RPN"]["UNKNOWN"] = 3
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    cfg = FrcnnConfig.from_yaml(path)
    assert cfg.num_anchors == 15  # SIZES has 5 entries here: never hard-coded
    assert (cfg.depth, cfg.stem_out_channels, cfg.res2_out_channels, cfg.pooled_dim) == (50, 8, 16, 128)
    assert (cfg.min_size_test, cfg.max_size_test, cfg.rpn_hidden_channels) == (240, 400, 32)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("RESNETS", "DEPTH", 34, "RESNETS.DEPTH"),
        ("RESNETS", "OUT_FEATURES", ["res5"], "RESNETS.OUT_FEATURES"),
        ("ROI_BOX_HEAD", "ATTR", False, "ROI_BOX_HEAD.ATTR"),
        ("ANCHOR_GENERATOR", "SIZES", [[32], [64]], "ANCHOR_GENERATOR.SIZES"),
    ],
)
def test_unsupported_config_values_name_the_key(tmp_path, section, key, value, message):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({section: {key: value}}))
    with pytest.raises(ValueError, match=message):
        FrcnnConfig.from_yaml(path)


def test_config_yaml_round_trip(tmp_path):
    cfg = FrcnnConfig(depth=50, anchor_sizes=(32.0, 64.0), res2_out_channels=32, min_size_test=300)
    cfg.save_yaml(tmp_path / "config.yaml")
    assert FrcnnConfig.from_yaml(tmp_path / "config.yaml") == cfg


def test_port_key_map_examples():
    assert port_key("backbone.stem.conv1.weight") == "backbone.stem.conv1.weight"
    assert port_key("backbone.stem.bn1.running_mean") == "backbone.stem.conv1.norm.running_mean"
    assert port_key("backbone.res4.0.downsample.0.weight") == "backbone.res4.0.shortcut.weight"
    assert port_key("backbone.res4.0.downsample.1.bias") == "backbone.res4.0.shortcut.norm.bias"
    assert port_key("roi_head.res5.2.bn3.weight") == "roi_heads.res5.2.conv3.norm.weight"
    assert port_key("rpn.head.cls_logits.bias") == "proposal_generator.rpn_head.objectness_logits.bias"
    assert port_key("rpn.head.bbox_pred.weight") == "proposal_generator.rpn_head.anchor_deltas.weight"
    assert port_key("rpn.anchor_generator.cell_anchors") == "proposal_generator.anchor_generator.cell_anchors.0"
    assert port_key("roi_head.predictor.fc_attr.weight") == "roi_heads.box_predictor.fc_attr.weight"


def test_golden_checkpoint_loads_with_a_clean_report(frcnn_golden):
    model, report = load_detector(
        frcnn_golden / "tiny_frcnn.safetensors", config=frcnn_golden / "tiny_config.yaml", fuse_batchnorm=False
    )
    assert (len(report.loaded), len(report.missing), len(report.unexpected), len(report.ignored)) == (279, 0, 0, 55)
    assert len(report.loaded) + len(report.ignored) == 334
    assert model.rpn.anchor_generator.num_anchors == 15
    summary = report.summary()
    assert "tiny_frcnn.safetensors" in summary and "missing 0" in summary and "unexpected 0" in summary
    checkpoint = load_file(str(frcnn_golden / "tiny_frcnn.safetensors"))
    assert torch.equal(model.backbone.res3[0].bn2.running_var, checkpoint["backbone.res3.0.conv2.norm.running_var"])


def test_missing_key_is_named(tiny_dir, tmp_path):
    target = _copy(tiny_dir, tmp_path)
    state = load_file(str(target / "model.safetensors"))
    del state["backbone.res3.1.conv2.norm.running_mean"]
    save_file(state, str(target / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 missing: backbone\.res3\.1\.conv2\.norm\.running_mean"):
        load_detector(target)


def test_misshapen_key_is_named_with_both_shapes(tiny_dir, tmp_path):
    target = _copy(tiny_dir, tmp_path)
    state = load_file(str(target / "model.safetensors"))
    state["roi_heads.box_predictor.cls_score.weight"] = torch.zeros(11, 128)
    save_file(state, str(target / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"cls_score\.weight: checkpoint \(11, 128\), config implies \(1601, 128\)"
    ):
        load_detector(target)


def test_anchor_count_comes_from_the_config(tiny_dir, tmp_path):
    """The tiny checkpoint has 12 anchors; a config with 15 must not load it."""
    target = _copy(tiny_dir, tmp_path)
    data = yaml.safe_load((target / "config.yaml").read_text())
    data["ANCHOR_GENERATOR"]["SIZES"] = [[32, 64, 128, 256, 512]]
    (target / "config.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(
        CheckpointError, match="objectness_logits.weight: checkpoint \\(12, 32, 1, 1\\), config implies \\(15"
    ):
        load_detector(target)


def test_unexpected_keys_are_reported_and_old_bn_names_renamed(tiny_dir, tmp_path):
    target = _copy(tiny_dir, tmp_path)
    state = load_file(str(target / "model.safetensors"))
    state["backbone.stem.conv1.norm.gamma"] = state.pop("backbone.stem.conv1.norm.weight")
    state["backbone.stem.conv1.norm.beta"] = state.pop("backbone.stem.conv1.norm.bias")
    state["extra.head.weight"] = torch.zeros(3)
    save_file(state, str(target / "model.safetensors"))
    _, report = load_detector(target)
    assert report.unexpected == ["extra.head.weight"] and not report.missing
    assert "unexpected 1" in report.summary() and "extra.head.weight" in report.summary()


def test_pytorch_model_bin_loads_with_weights_only(tmp_path):
    directory = save_tiny_detector(tmp_path / "bin", seed=1, weights_format="bin", **SMALL)
    assert (directory / "pytorch_model.bin").is_file()
    model, report = load_detector(directory)
    assert report.weights_path.name == "pytorch_model.bin" and not report.missing
    reference = read_state_dict(directory / "pytorch_model.bin")
    assert torch.equal(
        model.roi_head.predictor.attr_score.weight, reference["roi_heads.box_predictor.attr_score.weight"]
    )


def test_pickled_objects_are_refused(tmp_path):
    directory = tmp_path / "evil"
    directory.mkdir()
    FrcnnConfig().save_yaml(directory / "config.yaml")
    torch.save({"model": {"weights": object()}}, directory / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_detector(directory)


def test_missing_files_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="detector path not found"):
        load_detector(tmp_path / "nowhere")
    (tmp_path / "config.yaml").write_text("{}")
    with pytest.raises(FileNotFoundError, match="expected one detector weights file"):
        load_detector(tmp_path)


def test_tiny_detector_is_deterministic_and_loads(tmp_path, tiny_dir):
    again = save_tiny_detector(tmp_path / "again", seed=0, **SMALL)
    first, second = load_file(str(tiny_dir / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    other = save_tiny_detector(tmp_path / "other", seed=0, num_classes=20, num_attrs=7, depth=101, **SMALL)
    model, report = load_detector(other)
    assert model.roi_head.predictor.cls_score.out_features == 21 and len(model.backbone.res4) == 23
    assert model.roi_head.predictor.attr_score.out_features == 8
    assert not report.unexpected and not report.missing
