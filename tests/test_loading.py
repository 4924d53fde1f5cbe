"""Checkpoint formats, the load report, and the errors a user meets."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from lxmert_pl.model import CheckpointError, LxmertMatchingModel, get_preset, load_lxmert
from lxmert_pl.model.loading import save_hf_directory


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return LxmertMatchingModel(get_preset("tiny")).eval()


def _pretrain_snapshot(model, path):
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, path)
    (path.parent / (path.name + ".config.json")).write_text(json.dumps(model.config.to_dict()))
    return path


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pretrain_snapshot_round_trip(tiny_model, tmp_path):
    path = _pretrain_snapshot(tiny_model, tmp_path / "model_LXRT.pth")
    model, report = load_lxmert(path, require=("matching",))
    assert report.format == "lxrt-pretrain" and report.config_source.endswith(".config.json")
    assert _same_weights(model, tiny_model)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight  # still tied
    assert "loaded" in report.summary()


def test_summary_names_heads_the_file_lacks(tiny_model, tmp_path):
    """A matching-only file: the absent optional heads are named as not built, not counted as missing tensors."""
    matching_only = LxmertMatchingModel(tiny_model.config, heads=("matching",))
    _, report = load_lxmert(_pretrain_snapshot(matching_only, tmp_path / "model_LXRT.pth"))
    summary = report.summary()
    assert "heads: matching;" in summary
    assert "not in this file (not built): lm head (cls.predictions.*), obj head" in summary
    _, full = load_lxmert(_pretrain_snapshot(tiny_model, tmp_path / "full_LXRT.pth"))
    assert "not in this file" not in full.summary()


def test_golden_formats_detected(lxrt_golden):
    for name, fmt in [("tiny_LXRT.pth", "lxrt-pretrain"), ("tiny_vqa_BEST.pth", "lxrt-finetuned")]:
        _, report = load_lxmert(lxrt_golden / name, model_config=lxrt_golden / "tiny_config.json")
        assert report.format == fmt


def test_finetuned_snapshot_has_no_matching_head(lxrt_golden):
    with pytest.raises(CheckpointError, match="no matching head.*--mode cosine"):
        load_lxmert(lxrt_golden / "tiny_vqa_BEST.pth", model_config=lxrt_golden / "tiny_config.json",
                    require=("matching",))


def test_finetuned_multigpu_prefix_and_nlvr2_head(tiny_model, tmp_path):
    state = {"lxrt_encoder.model.module." + k: v for k, v in tiny_model.bert.state_dict(prefix="bert.").items()}
    h = tiny_model.config.hidden_size
    state.update({"logit_fc.0.weight": torch.zeros(2 * h, 2 * h), "logit_fc.0.bias": torch.zeros(2 * h),
                  "logit_fc.2.weight": torch.ones(2 * h), "logit_fc.2.bias": torch.zeros(2 * h),
                  "logit_fc.3.weight": torch.zeros(2, 2 * h), "logit_fc.3.bias": torch.zeros(2)})
    torch.save(state, tmp_path / "BEST.pth")
    model, report = load_lxmert(tmp_path / "BEST.pth", model_config=tiny_model.config)
    assert report.heads == () and len(report.ignored) == 6
    assert all("NLVR2" in reason for _, reason in report.ignored)
    assert _same_weights(model.bert, tiny_model.bert)


def test_hf_directory_and_safetensors(tiny_model, tmp_path):
    directory = save_hf_directory(tiny_model, tmp_path / "hf")
    model, report = load_lxmert(directory)
    assert report.format == "hf" and _same_weights(model, tiny_model)
    from safetensors.torch import save_file

    state = torch.load(directory / "pytorch_model.bin", weights_only=True)
    state.pop("cls.predictions.decoder.weight")  # safetensors refuses shared storage; HF drops the tied copy
    (directory / "pytorch_model.bin").unlink()
    save_file(state, str(directory / "model.safetensors"))
    model, report = load_lxmert(directory)
    assert _same_weights(model, tiny_model)


def test_lightning_checkpoint(tiny_model, tmp_path):
    ckpt = {"state_dict": {"model." + k: v for k, v in tiny_model.state_dict().items()},
            "hyper_parameters": {"model_config": tiny_model.config.to_dict()}, "pytorch-lightning_version": "2"}
    torch.save(ckpt, tmp_path / "last.ckpt")
    model, report = load_lxmert(tmp_path / "last.ckpt")
    assert report.format == "lightning" and report.config_source == "lightning hyper-parameters"
    assert _same_weights(model, tiny_model)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_lxmert(tmp_path / "nope.pth")


def test_wrong_format(tmp_path):
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="unrecognised key layout"):
        load_lxmert(tmp_path / "x.pth")
    (tmp_path / "y.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="y.pth"):
        load_lxmert(tmp_path / "y.pth")


def test_shape_mismatch_names_key(tiny_model, tmp_path):
    state = {"module." + k: v.clone() for k, v in tiny_model.state_dict().items()}
    state["module.cls.seq_relationship.weight"] = torch.zeros(3, tiny_model.config.hidden_size)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"module\.cls\.seq_relationship\.weight.*\(3, 32\)"):
        load_lxmert(tmp_path / "bad.pth", model_config=tiny_model.config)


def test_config_disagreeing_with_weights(tiny_model, tmp_path):
    state = {"module." + k: v for k, v in tiny_model.state_dict().items()}
    torch.save(state, tmp_path / "model.pth")  # no config beside: the lxr955 preset is assumed
    with pytest.raises(CheckpointError, match="(?s)l_layers: config 9, checkpoint 2.*--model-config"):
        load_lxmert(tmp_path / "model.pth")


def test_missing_backbone_tensor(tiny_model, tmp_path):
    state = {"module." + k: v for k, v in tiny_model.state_dict().items() if "pooler" not in k}
    torch.save(state, tmp_path / "model.pth")
    with pytest.raises(CheckpointError, match="(?s)missing.*pooler"):
        load_lxmert(tmp_path / "model.pth", model_config=tiny_model.config)


def test_unknown_keys_reported_not_fatal(tiny_model, tmp_path):
    state = {"module." + k: v for k, v in tiny_model.state_dict().items()}
    state["module.bert.extra_thing.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "model.pth")
    model, report = load_lxmert(tmp_path / "model.pth", model_config=tiny_model.config)
    assert report.ignored == [("module.bert.extra_thing.weight", "unknown key")]
    assert "ignored 1" in report.summary()


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickle_needing_code_execution_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"module.bert.x": _Evil()}, f)
    with pytest.raises(CheckpointError, match="refused"):
        load_lxmert(path)


@pytest.mark.parametrize(
    "content,expected",
    [
        (b"", r"empty \(0 bytes\)"),
        (b"<!DOCTYPE html><html><body>Sign in</body></html>", r"web page \(HTML\)"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n", "Git LFS pointer"),
        (b"PK\x03\x04garbage", "not a readable PyTorch checkpoint"),
    ],
)
def test_not_a_checkpoint_says_what_the_file_is(tmp_path, content, expected):
    from lxmert_pl.errors import CheckpointError
    from lxmert_pl.model.loading import load_lxmert

    path = tmp_path / "model_LXRT.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=expected) as info:
        load_lxmert(path)
    assert str(path) in str(info.value)
