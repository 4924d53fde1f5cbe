"""The "why" of a score (lxmert_pl/explain.py): last cross layer's language -> vision attention from [CLS], mean over
heads, checked against transformers' LXMERT `output_attentions` on the same random weights, masks included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf_parity import _hf_model, _inputs  # noqa: E402

from lxmert_pl.explain import cross_attention_to_boxes, explain_batch  # noqa: E402
from lxmert_pl.model import load_lxmert  # noqa: E402
from lxmert_pl.scoring import Scorer  # noqa: E402


@pytest.fixture(scope="module")
def hf_and_ours(tmp_path_factory):
    hf = _hf_model(seed=3)
    directory = tmp_path_factory.mktemp("hf_explain")
    hf.save_pretrained(directory, safe_serialization=False)
    ours, _ = load_lxmert(directory)
    return hf, ours.eval()


def test_matches_transformers_cross_attentions(hf_and_ours):
    hf, ours = hf_and_ours
    input_ids, mask, feats, boxes, box_mask = _inputs()
    with torch.no_grad():
        want = hf.lxmert(input_ids=input_ids, attention_mask=mask, visual_feats=feats, visual_pos=boxes,
                         visual_attention_mask=box_mask, output_attentions=True).cross_encoder_attentions[-1]
    want = want[:, :, 0, :].mean(dim=1)
    batch = {"input_ids": input_ids, "attention_mask": mask, "features": feats, "boxes": boxes,
             "box_mask": box_mask}
    got = explain_batch(ours, batch)
    assert got.shape == (5, 12)
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    assert torch.all(got[box_mask == 0] == 0)
    assert torch.allclose(got.sum(-1), torch.ones(5), atol=1e-5)
    assert not torch.allclose(got[0], torch.full((12,), 1 / 12), atol=1e-3)  # not uniform: the test can fail


def test_attention_probs_are_what_forward_uses(hf_and_ours):
    """probs @ values through the module's own projections reproduces `forward` (the fused kernel)."""
    _, ours = hf_and_ours
    att = ours.bert.encoder.x_layers[0].visual_attention.att
    g = torch.Generator().manual_seed(0)
    hidden, context = torch.randn(2, 5, 32, generator=g), torch.randn(2, 7, 32, generator=g)
    bias = torch.zeros(2, 1, 1, 7)
    bias[1, ..., 4:] = -10000.0
    probs = att.attention_probs(hidden, context, bias)
    values = att._heads(att.value(context))
    manual = torch.matmul(probs, values).transpose(1, 2).reshape(2, 5, -1)
    assert torch.allclose(manual, att(hidden, context, bias), atol=1e-5)


def test_scorer_explain_real_boxes_only(hf_and_ours):
    _, ours = hf_and_ours
    scorer = Scorer(ours, batch_size=2)
    _, _, feats, boxes, box_mask = _inputs()
    sentences = ["a red circle", "two dogs", "a blue star on the left", "x", "a small green square"]
    counts = box_mask.sum(-1).tolist()
    ragged = scorer.explain(sentences, [feats[i, :n] for i, n in enumerate(counts)],
                            [boxes[i, :n] for i, n in enumerate(counts)])
    assert [len(w) for w in ragged] == counts
    assert all(abs(float(w.sum()) - 1) < 1e-5 for w in ragged)
    padded = scorer.explain(sentences, feats, boxes, box_mask)
    for a, b in zip(ragged, padded):
        np.testing.assert_allclose(a, b, atol=1e-6)
    text = ours.bert.encode_text(*[scorer.tokenizer(sentences[:1])[k] for k in ("input_ids", "attention_mask")])
    image = ours.bert.encode_image(feats[:1], boxes[:1], box_mask[:1])
    np.testing.assert_allclose(cross_attention_to_boxes(ours, text, image)[0, :counts[0]].numpy(), padded[0],
                               atol=1e-6)
