"""Parity with transformers' LxmertForPreTraining on the same random weights (tiny config), masks included."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lxmert_pl.model import LxrtConfig, load_lxmert  # noqa: E402
from lxmert_pl.model.config import PRESETS  # noqa: E402

ATOL = 1e-5


def _hf_model(seed: int = 0):
    cfg = PRESETS["tiny"].to_dict()
    hf_cfg = transformers.LxmertConfig(**cfg)
    torch.manual_seed(seed)
    model = transformers.LxmertForPreTraining(hf_cfg).eval()
    with torch.no_grad():  # O(1) activations: every parameter moves, LayerNorms included
        for name, p in model.named_parameters():
            if "word_embeddings" in name or p.dim() < 2:
                p.add_(torch.randn_like(p) * 0.3)
            else:
                p.normal_(0, p.shape[1] ** -0.5)
    return model


def _inputs(batch=5, boxes=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, 5000, (batch, 20), generator=g)
    mask = torch.ones(batch, 20, dtype=torch.long)
    for i, length in enumerate([20, 7, 12, 3, 16][:batch]):
        mask[i, length:] = 0
        input_ids[i, length:] = 0
    feats = torch.relu(torch.randn(batch, boxes, 2048, generator=g))
    xy = torch.rand(batch, boxes, 2, generator=g) * 0.5
    box = torch.cat([xy, xy + 0.1 + torch.rand(batch, boxes, 2, generator=g) * 0.4], -1)
    box_mask = torch.ones(batch, boxes, dtype=torch.long)
    for i, n in enumerate([12, 4, 9, 1, 12][:batch]):
        box_mask[i, n:] = 0
    return input_ids, mask, feats, box, box_mask


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    hf = _hf_model()
    directory = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(directory, safe_serialization=False)
    ours, report = load_lxmert(directory)
    assert report.format == "hf" and report.config_source.endswith("config.json")
    return hf, ours, report


def test_loads_every_tensor(hf_and_ours):
    _, ours, report = hf_and_ours
    assert not report.ignored and not report.missing
    assert set(ours.heads) == {"matching", "lm", "obj", "qa"}
    assert ours.config == LxrtConfig.from_dict(PRESETS["tiny"].to_dict())


@pytest.mark.parametrize("with_box_mask", [False, True])
def test_outputs_match_transformers(hf_and_ours, with_box_mask):
    hf, ours, _ = hf_and_ours
    ids, mask, feats, boxes, box_mask = _inputs()
    bm = box_mask if with_box_mask else None
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, visual_feats=feats, visual_pos=boxes,
                 visual_attention_mask=bm, token_type_ids=torch.zeros_like(ids), output_hidden_states=True)
        got = ours(ids, mask, feats, boxes, bm)
        base = hf.lxmert(input_ids=ids, attention_mask=mask, visual_feats=feats, visual_pos=boxes,
                         visual_attention_mask=bm)
        qa = ours.qa_logits(got.pooled_output)
        lm = ours.lm_logits(got.lang_output)
    checks = {
        "lang_output": (got.lang_output, base.language_output),
        "visn_output": (got.visn_output, base.vision_output),
        "pooled": (got.pooled_output, base.pooled_output),
        "matching logits": (got.match_logits, ref.cross_relationship_score),
        "qa": (qa, ref.question_answering_score),
    }
    for name, (a, b) in checks.items():
        diff = float((a - b).abs().max())
        assert diff <= ATOL, f"{name}: {diff:.3g}"
    lm_diff = float((lm - ref.prediction_logits).abs().max())
    assert lm_diff <= 1e-4, lm_diff


def test_masked_batch_equals_one_at_a_time(hf_and_ours):
    _, ours, _ = hf_and_ours
    ids, mask, feats, boxes, box_mask = _inputs()
    with torch.no_grad():
        batched = ours(ids, mask, feats, boxes, box_mask)
        for i in range(len(ids)):
            n = int(box_mask[i].sum())
            single = ours(ids[i : i + 1], mask[i : i + 1], feats[i : i + 1, :n], boxes[i : i + 1, :n])
            assert torch.allclose(batched.match_logits[i], single.match_logits[0], atol=ATOL)
            assert torch.allclose(batched.cosine[i], single.cosine[0], atol=ATOL)
            assert torch.allclose(batched.visn_output[i, :n], single.visn_output[0], atol=ATOL)
