"""Parity with the original LXRT code: ../shared/golden/lxrt (see its README for why the "strong" set tests numbers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lxmert_pl.model import load_lxmert
from lxmert_pl.tokenizer import LxmertTokenizer

ATOL = 1e-5


def _load(golden, name):
    model, report = load_lxmert(golden / name, model_config=golden / "tiny_config.json")
    return model, report


def _run(model, d, suffix="", box_mask=None):
    with torch.no_grad():
        return model(
            torch.tensor(d["input_ids" + suffix]), torch.tensor(d["input_mask" + suffix]),
            torch.tensor(d["feats" + suffix]), torch.tensor(d["boxes" + suffix]), box_mask,
            torch.tensor(d["segment_ids" + suffix]),
        )


def _close(got: torch.Tensor, want: np.ndarray, atol: float = ATOL, name: str = "") -> None:
    diff = float((got.float() - torch.from_numpy(want)).abs().max())
    assert diff <= atol, f"{name}: max abs diff {diff:.3g} > {atol}"


@pytest.mark.parametrize("weights", ["", "_strong"])
def test_pretrain_snapshot_outputs(lxrt_golden, weights):
    model, report = _load(lxrt_golden, f"tiny_LXRT{weights}.pth")
    assert report.format == "lxrt-pretrain" and len(report.loaded) == 129 and not report.ignored
    d = np.load(lxrt_golden / f"tiny_io{weights}.npz", allow_pickle=False)
    out = _run(model, d)
    _close(out.lang_output, d["lang_output"], name="lang_output")
    _close(out.visn_output, d["visn_output"], name="visn_output")
    _close(out.pooled_output, d["pooled_output"], name="pooled_output")
    _close(out.match_logits, d["cross_relationship_score"], name="matching logits")
    _close(out.match_prob, torch.softmax(torch.from_numpy(d["cross_relationship_score"]), -1)[:, 1].numpy(),
           name="P(match)")
    _close(out.cosine, d["cos_max_score"], name="cosine")
    with torch.no_grad():
        _close(model.lm_logits(out.lang_output)[:, :2], d["lm_scores_first2"], atol=1e-4, name="LM")
        obj = model.obj_logits(out.visn_output)
        _close(model.qa_logits(out.pooled_output), d["qa_logits"], name="QA")
    _close(obj["obj"][:, :2], d["obj_logits_first2"], name="obj")
    _close(obj["attr"][:, :2], d["attr_logits_first2"], name="attr")


@pytest.mark.parametrize("weights", ["", "_strong"])
def test_vqa_snapshot_pooled_cosine_and_answers(lxrt_golden, weights):
    model, report = _load(lxrt_golden, f"tiny_vqa_BEST{weights}.pth")
    assert report.format == "lxrt-finetuned" and not report.ignored
    assert not model.has_matching_head and "qa" in model.heads
    d = np.load(lxrt_golden / f"tiny_io{weights}.npz", allow_pickle=False)
    out = _run(model, d)
    assert out.match_logits is None
    _close(out.pooled_output, d["pooled_output"], name="pooled_output")
    _close(out.cosine, d["cos_max_score"], name="cosine")
    with torch.no_grad():
        _close(model.qa_logits(out.pooled_output), d["vqa_logits"], name="VQA logits")


@pytest.mark.parametrize("weights", ["", "_strong"])
def test_variable_box_counts_single_and_masked_batch(lxrt_golden, weights):
    model, _ = _load(lxrt_golden, f"tiny_LXRT{weights}.pth")
    d = np.load(lxrt_golden / f"tiny_io_varboxes{weights}.npz", allow_pickle=False)
    for i in (0, 1):
        out = _run(model, d, f"_{i}")
        for key, got in (("lang_output", out.lang_output), ("visn_output", out.visn_output),
                         ("pooled_output", out.pooled_output), ("cross_relationship_score", out.match_logits),
                         ("cos_max_score", out.cosine)):
            _close(got, d[f"{key}_{i}"], name=f"{key}_{i}")
    # Both examples in ONE batch: example 0 (10 boxes) padded to 100 boxes with a mask.
    n0, n1 = d["feats_0"].shape[1], d["feats_1"].shape[1]
    feats = np.zeros((2, n1, d["feats_0"].shape[2]), np.float32)
    boxes = np.zeros((2, n1, 4), np.float32)
    feats[0, :n0], boxes[0, :n0] = d["feats_0"][0], d["boxes_0"][0]
    feats[1], boxes[1] = d["feats_1"][0], d["boxes_1"][0]
    mask = torch.zeros(2, n1, dtype=torch.long)
    mask[0, :n0], mask[1] = 1, 1
    with torch.no_grad():
        out = model(torch.tensor(np.concatenate([d["input_ids_0"], d["input_ids_1"]])),
                    torch.tensor(np.concatenate([d["input_mask_0"], d["input_mask_1"]])),
                    torch.tensor(feats), torch.tensor(boxes), mask)
    for i in (0, 1):
        _close(out.match_logits[i : i + 1], d[f"cross_relationship_score_{i}"], name=f"batched logits {i}")
        _close(out.cosine[i : i + 1], d[f"cos_max_score_{i}"], name=f"batched cosine {i}")
        _close(out.pooled_output[i : i + 1], d[f"pooled_output_{i}"], name=f"batched pooled {i}")
    _close(out.visn_output[0:1, :n0], d["visn_output_0"], name="batched visn_output 0 (real boxes)")


def test_tokenizer_ids_equal_original(lxrt_golden):
    tok = LxmertTokenizer(vocab_path=lxrt_golden / "bert-base-uncased-vocab.txt")
    for name in ("tiny_io.npz", "tiny_io_varboxes.npz"):
        d = np.load(lxrt_golden / name, allow_pickle=False)
        if "sentences" in d:
            enc = tok(list(d["sentences"]))
            np.testing.assert_array_equal(enc["input_ids"].numpy(), d["input_ids"])
            np.testing.assert_array_equal(enc["attention_mask"].numpy(), d["input_mask"])
            np.testing.assert_array_equal(enc["token_type_ids"].numpy(), d["segment_ids"])
        else:
            for i in (0, 1):
                enc = tok(list(d[f"sentence_{i}"]))
                np.testing.assert_array_equal(enc["input_ids"].numpy(), d[f"input_ids_{i}"])


def test_bundled_vocab_is_the_golden_one(lxrt_golden):
    from lxmert_pl.tokenizer import default_vocab_path

    assert default_vocab_path().read_bytes() == (lxrt_golden / "bert-base-uncased-vocab.txt").read_bytes()
