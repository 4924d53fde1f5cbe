"""The Python scoring API and factorized scoring (same outputs as pairwise)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lxmert_pl.model import LxmertMatchingModel, get_preset
from lxmert_pl.scoring import Scorer, forward_batch, forward_factorized, forward_pairs
from lxmert_pl.tokenizer import LxmertTokenizer

from helpers_features import random_images


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = LxmertMatchingModel(get_preset("tiny"))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m.eval()


def test_scorer_variable_boxes_equals_one_by_one(model):
    scorer = Scorer(model, batch_size=3)
    feats, boxes = random_images(5, min_boxes=3)
    sents = ["a red circle", "two dogs", "a blue square on the left", "nothing", "a cat"]
    res = scorer.score(sents, feats, boxes)
    assert res.match_logits.shape == (5, 2) and res.match_prob.shape == (5,)
    np.testing.assert_allclose(res.match_prob, torch.softmax(torch.from_numpy(res.match_logits), -1)[:, 1].numpy(),
                               atol=1e-6)
    for i in range(5):
        one = scorer.score([sents[i]], feats[i][None], boxes[i][None])
        np.testing.assert_allclose(one.match_logits[0], res.match_logits[i], atol=1e-5)
        np.testing.assert_allclose(one.cosine[0], res.cosine[i], atol=1e-5)
    assert (res.scores("cosine") == res.cosine).all()


def test_factorized_equals_pairwise_on_a_grid(model):
    tok = LxmertTokenizer()
    feats, boxes = random_images(4, seed=1, min_boxes=3)
    sents = ["a red circle", "a green triangle and a dog", "two cats", "blue"]
    grid = [(t, i) for t in range(4) for i in range(4)]
    from lxmert_pl.scoring import pad_boxes

    f, b, m = pad_boxes([feats[i] for _, i in grid], [boxes[i] for _, i in grid])
    batch = tok([sents[t] for t, _ in grid])
    batch.update(features=f, boxes=b, box_mask=m, img_id=[f"img{i}" for _, i in grid])
    with torch.no_grad():
        pair = forward_pairs(model, batch)
        fact = forward_factorized(model, batch, [t for t, _ in grid], [i for _, i in grid])
        auto = forward_batch(model, batch)
    for a, b_ in [(pair.match_logits, fact.match_logits), (pair.cosine, fact.cosine),
                  (pair.pooled_output, fact.pooled_output), (pair.match_logits, auto.match_logits)]:
        assert float((a - b_).abs().max()) <= 1e-5


def test_scorer_without_matching_head_gives_cosine(model):
    vqa_like = LxmertMatchingModel(get_preset("tiny"), heads=())
    vqa_like.bert.load_state_dict(model.bert.state_dict())
    feats, boxes = random_images(2, min_boxes=3)
    res = Scorer(vqa_like).score(["a", "b"], feats, boxes)
    ref = Scorer(model).score(["a", "b"], feats, boxes)
    assert res.match_logits is None and res.match_prob is None
    np.testing.assert_allclose(res.cosine, ref.cosine, atol=1e-6)
    with pytest.raises(RuntimeError, match="cosine"):
        res.scores("itm")


def test_feature_width_mismatch_is_a_user_error():
    import dataclasses

    from lxmert_pl.errors import UserInputError

    model = LxmertMatchingModel(dataclasses.replace(get_preset("tiny"), visual_feat_dim=8)).eval()
    batch = {"img_id": ["img_0"], "features": torch.zeros(1, 3, 5), "boxes": torch.zeros(1, 3, 4),
             "box_mask": torch.ones(1, 3, dtype=torch.long), "input_ids": torch.zeros(1, 4, dtype=torch.long),
             "attention_mask": torch.ones(1, 4, dtype=torch.long), "token_type_ids": torch.zeros(1, 4, dtype=torch.long)}
    with pytest.raises(UserInputError, match="5 wide .*img_0.*visual_feat_dim=8"):
        forward_batch(model, batch)
